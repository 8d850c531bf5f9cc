"""Benchmarks: each writes CSV and PNG plots beside the figures it prints."""
