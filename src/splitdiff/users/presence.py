"""Concept presence: how often images generated for a user's prompts show the user's concept.

Prompts come from the concept's own sampler (the concept once, 0 to 2 base objects,
any size, cell and background), written with the token. A shared U-Net runs the first
`steps - adapter_steps` steps and the device U-Net with the adapter the last
`adapter_steps` (all of them by default: the adapter alone). The concept recognizer
then reads each image: presence is the concept found anywhere in it (as DreamBooth's
subject fidelity asks), and, stricter, at the cell its prompt names (where the base
family's own placement errors count too). The rest of the prompt (the background and
each base object's shape, colour and size at its cell) is scored as well, so that a
concept bought by forgetting the world shows.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..world.concepts import ConceptObject, concept_prompt, parse_concept, sample_concept_scene
from .adapters import TRAINING_FILE, AdapterError, AdapterRef, adapter_applied, adapter_timings


def rest_of_prompt(reading, scene) -> float:
    """The fraction of the scene's base attributes read back: background, and shape, colour, size per base object."""
    hits, total = float(reading.background == scene.background), 1
    for o in scene.objects:
        if isinstance(o, ConceptObject):
            continue
        seen = reading.at(o.cell)
        total += 3
        if seen is not None:
            hits += (seen.shape == o.shape and seen.texture == "plain") + (seen.color == o.color) + (seen.size == o.size)
    return hits / total


def concept_prompts(concept, token: str, n: int, seed: int) -> tuple[list, list[str], list[int]]:
    """n scenes from the concept's own sampler, their prompts written with the token, and their seeds."""
    rng = random.Random(seed)
    scenes = [sample_concept_scene(rng, concept) for _ in range(n)]
    return scenes, [concept_prompt(s, concept, token) for s in scenes], [seed * 100_003 + i for i in range(n)]


def generate(pipe, prompts: list[str], seeds: list[int], ref: AdapterRef | None, steps: int = 25,
             adapter_steps: int | None = None, shared: str = "edge", device: str = "edge",
             scheduler: str = "dpmsolver++", guidance: float = 5.0, size: int = 64) -> torch.Tensor:
    """Images (B x 3 x H x W in [-1, 1]): `shared` for the first steps, `device` with the adapter for the last."""
    from ..core.runner import advance, decode

    n = steps if adapter_steps is None else adapter_steps
    trajs = pipe.start_many(prompts, seeds, steps=steps, scheduler=scheduler, guidance_scale=guidance, size=size)
    if steps - n:
        advance(pipe.unets[shared], trajs, steps - n, shared)
    if n:
        with adapter_applied(pipe.unets[device], ref):
            advance(pipe.unets[device], trajs, n, device if ref is None else f"{device}@{ref.user}")
    return decode(pipe.vae, torch.cat([t.latents for t in trajs]))


def concept_presence(ref: AdapterRef, n: int = 32, steps: int = 25, base: str = "edge", vae: str = "vae",
                     seed: int = 0, scheduler: str = "dpmsolver++", guidance: float = 5.0) -> dict:
    """Presence and rest-of-prompt scores for the adapter alone and for the base U-Net alone.

    The adapter is put on the base U-Net before anything is generated, so an adapter that
    does not fit is refused at once.
    """
    from ..eval.concepts import default_reader
    from ..hybrid.pipeline import load_pipeline

    if not ref.concept or not ref.token:
        raise AdapterError(f"adapter {ref.user!r} has no training record naming its concept and token "
                           f"({ref.path / TRAINING_FILE})")
    concept = parse_concept(ref.concept)
    pipe = load_pipeline({"edge": base}, vae)
    timings = adapter_timings(pipe.unets["edge"], ref)  # refuses an adapter that does not fit, before any work
    reader = default_reader()
    scenes, prompts, seeds = concept_prompts(concept, ref.token, n, seed)
    result = {"user": ref.user, "concept": ref.concept, "sha256": ref.sha256, "prompts": n, "steps": steps,
              "scheduler": scheduler, "guidance": guidance}
    for label, adapter in (("adapter", ref), ("base", None)):
        images = generate(pipe, prompts, seeds, adapter, steps, scheduler=scheduler, guidance=guidance)
        readings = reader.read(images)
        result[label] = float(np.mean(reader.presence(images, concept, None, readings)))
        result[f"{label}_at_cell"] = float(np.mean(reader.presence(images, concept, scenes, readings)))
        result[f"rest_{label}"] = float(np.mean([rest_of_prompt(r, s) for r, s in zip(readings, scenes)]))
    return {**result, **timings}
