"""The core every axis builds on: trajectories, step plans, the runner and the model registry."""
