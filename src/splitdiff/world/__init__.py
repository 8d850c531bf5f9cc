"""The Shapes world: a procedurally generated text-to-image world where quality is exact."""

from .batch import render_images
from .dataset import Batch, batches, prompt_set, sample_batch
from .grammar import PromptError, parse_prompt, scene_to_prompt
from .render import render, to_array
from .scene import Scene, SceneObject, sample_scene

__all__ = [
    "Batch", "batches", "prompt_set", "sample_batch", "PromptError", "parse_prompt",
    "scene_to_prompt", "render", "render_images", "to_array", "Scene", "SceneObject", "sample_scene",
]
