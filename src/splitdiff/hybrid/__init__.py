"""The time axis (Hybrid SD): a step plan hands one trajectory from model to model."""
