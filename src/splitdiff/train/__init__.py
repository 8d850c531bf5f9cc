"""Resumable training of the evaluator and the embedded model family."""
