"""`splitdiff train concept-recognizer`: the concept recognizer on augmented renders of private scenes.

It starts from the shipped evaluator's weights (the same world, a wider vocabulary).
Half the objects of a training scene are private (a private shape, or a texture on a
shape), the rest are base objects, so that it learns both to find concepts and not
to see them in the base world; half the batches go through the family's VAE first.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..core.registry import load_vae
from ..core.runner import decode
from ..eval.augment import augment
from ..eval.concepts import WEIGHTS, ConceptRecognizer, concept_loss, concept_targets
from ..eval.metrics import WEIGHTS as EVALUATOR_WEIGHTS
from ..eval.recognizer import INPUT_SIZE
from ..io import load_tensors, save_tensors
from ..world import render_images
from ..world.concepts import sample_private_scene
from .loop import LoopConfig, optimize, run_training, set_cosine_lr

# Generated images are VAE decodings: soft edges, shifted colours, textures smeared. Half the
# batches are renders through the family's VAE (at 64 px, the size users generate at), so
# that the recognizer reads a shape the way a generation can show it. A textured object's
# texture is not a target there: what is left of it after the VAE is a smear, and learning
# to call smears textures makes the recognizer see textures on every soft generated edge.
VAE_SHARE = 0.5


def _batch(rng: random.Random, batch_size: int, vae=None):
    """A batch of renders; with the family's VAE, VAE_SHARE of batches are its 64 px round trips."""
    scenes = [sample_private_scene(rng) for _ in range(batch_size)]
    through_vae = rng.random() < VAE_SHARE and vae is not None
    size = 64 if through_vae else rng.choice([48, 64, 64, 96, 128])
    x = render_images(scenes, size, rng)
    targets = concept_targets(scenes)
    if through_vae:
        with torch.no_grad():
            x = decode(vae, vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
        targets["texture"][targets["texture"] > 0] = -100  # the VAE smears textures away: no label to learn
    return ConceptRecognizer.prepare(x), targets


def train_concept_recognizer(run_dir: Path, steps: int = 4500, batch_size: int = 64, lr: float = 1e-3,
                             max_minutes: float | None = None, out: Path = WEIGHTS, seed: int = 0,
                             checkpoint_every: int = 100, start_from: Path | None = EVALUATOR_WEIGHTS,
                             vae: str | None = "vae") -> None:
    """`vae`: the VAE whose round trips train the recognizer (None: renders only)."""
    torch.manual_seed(seed)
    vae_model = load_vae(vae) if vae else None
    model = ConceptRecognizer()
    if start_from is not None and Path(start_from).exists():
        model.start_from_evaluator(load_tensors(start_from)[0])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def step(i: int) -> float:
        rng = random.Random(seed * 1_000_003 + i)  # data depends only on the step: resumable
        g = torch.Generator().manual_seed(seed * 7919 + i)
        x, targets = _batch(rng, batch_size, vae_model)
        x = augment(x, g, strength=float(rng.random() < 0.8))
        set_cosine_lr(opt, i, steps, lr, warmup=50)
        return optimize(opt, concept_loss(model(x), targets))

    def export(state, m):
        save_tensors(out, {k: v.half() for k, v in m.state_dict().items()},
                     {"config": {}, "step": state.step, "input_size": INPUT_SIZE, "vae": vae, "vae_share": VAE_SHARE,
                      "wall_seconds": state.extra.get("wall_seconds")})

    run_training(LoopConfig(run_dir, steps, max_minutes, checkpoint_every=checkpoint_every), model, opt, step, export,
                 desc="concept-recognizer")
