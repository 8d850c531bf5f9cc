"""Does the concept recognizer read what it claims? Figures on fresh renders, the base world and noise."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..world import render_images
from ..world.concepts import ConceptObject, parse_concept, sample_concept_scene, sample_private_scene
from ..world.dataset import sample_batch
from .concepts import ConceptReader, Reading, default_reader

# The shipped users' concepts and a few more of each kind (colour open or fixed, private shape or texture).
SPECS = ("red heart", "crescent", "blue arrow", "diamond", "yellow heart", "striped square", "green dotted circle")


def _renders(scenes, size: int, seed: int) -> torch.Tensor:
    return render_images(scenes, size, range(seed, seed + len(scenes)))


def _object_hits(readings: list[Reading], scenes) -> list[bool]:
    hits = []
    for reading, scene in zip(readings, scenes):
        for o in scene.objects:
            seen = reading.at(o.cell)
            hits.append(seen is not None and (seen.shape, seen.texture, seen.color, seen.size)
                        == (o.shape, getattr(o, "texture", "plain"), o.color, o.size))
    return hits


def validate_concepts(n: int = 512, seed: int = 2024, reader: ConceptReader | None = None) -> dict:
    """The figures of docs/users.md; `n` scenes per set, render seeds no training step drew."""
    reader = reader or default_reader()
    rng = random.Random(seed)
    scenes = [sample_private_scene(rng) for _ in range(n)]
    r64, r128 = _renders(scenes, 64, seed * 7 + 1), _renders(scenes, 128, seed * 7 + 2)
    read64 = reader.read(r64)
    private = [(reading.at(o.cell), o) for reading, s in zip(read64, scenes) for o in s.objects
               if isinstance(o, ConceptObject)]
    empty = [reading.at(c) is None for reading, s in zip(read64, scenes)
             for c in set(range(9)) - {o.cell for o in s.objects}]
    noise = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    base = sample_batch(random.Random(seed + 1), n, 64)

    positives, negatives, noise_hits = [], [], []
    k = max(8, n // (2 * len(SPECS)))
    for j, spec in enumerate(SPECS):
        concept = parse_concept(spec)
        crng = random.Random(seed * 31 + j)
        pos = [sample_concept_scene(crng, concept) for _ in range(k)]
        neg = []
        while len(neg) < k:  # other private objects and base ones, never this concept
            s = sample_private_scene(crng)
            if not any(isinstance(o, ConceptObject) and concept.matches(o.shape, o.texture, o.color)
                       for o in s.objects):
                neg.append(s)
        positives += reader.presence(_renders(pos, 64, seed * 13 + j * k), concept)
        negatives += [not p for p in reader.presence(_renders(neg, 64, seed * 17 + j * k), concept)]
        noise_hits += reader.presence(noise, concept)
    shuffled = scenes[1:] + scenes[:1]
    return {
        "n": n,
        "object_accuracy_64": float(np.mean(_object_hits(read64, scenes))),
        "object_accuracy_128": float(np.mean(_object_hits(reader.read(r128), scenes))),
        "empty_cells_64": float(np.mean(empty)),
        "private_class_accuracy_64": float(np.mean([s is not None and (s.shape, s.texture) == (o.shape, o.texture)
                                                    for s, o in private])),
        "presence_accuracy": float(np.mean(positives + negatives)),
        "presence_recall": float(np.mean(positives)),
        "presence_specificity": float(np.mean(negatives)),
        # chance: renders read against the objects of other scenes
        "object_accuracy_chance": float(np.mean(_object_hits(read64, shuffled))),
        "object_accuracy_noise": float(np.mean(_object_hits(reader.read(noise), scenes))),
        "presence_noise": float(np.mean(noise_hits)),
        "private_in_base_world": float(np.mean([any(o.private for o in r.objects) for r in reader.read(base.images)])),
    }
