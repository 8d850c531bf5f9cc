"""Exact quality measurement on the Shapes world: adherence and FSD."""

from .metrics import Evaluator, adherence, default_evaluator, frechet_distance, fsd, reference_renders

__all__ = ["Evaluator", "adherence", "default_evaluator", "frechet_distance", "fsd", "reference_renders"]
