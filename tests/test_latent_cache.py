"""The U-Nets' training data: the same cache however it is built, and the 64/128 px mix."""

import random

import torch

from splitdiff.testing import tiny_vae
from splitdiff.train.latent_cache import build_cache
from splitdiff.train.unet import DenoisingData


def test_a_pool_of_render_workers_builds_the_same_cache():
    vae = tiny_vae().eval()
    serial = build_cache(vae, 10, 64, seed=3, chunk=4, workers=1)
    pooled = build_cache(vae, 10, 64, seed=3, chunk=4, workers=2)
    assert serial["latents"].shape[0] == 10
    assert all(torch.equal(serial[k], pooled[k]) for k in serial)


def _fake_cache(n: int, side: int) -> dict[str, torch.Tensor]:
    return {"latents": torch.randn(n, 4, side, side).half(), "embeds": torch.randn(n, 48, 384).half(),
            "masks": torch.ones(n, 48, dtype=torch.uint8)}


def test_the_share_of_128px_steps_and_their_batch_size_are_options():
    caches = {64: _fake_cache(8, 16), 128: _fake_cache(8, 32)}
    data = DenoisingData(caches, batch_size=8, batch_size_128=3, quarters_128=2)
    shapes = [data.batch(i, random.Random(i), torch.Generator().manual_seed(i))[0].shape for i in range(4)]
    assert shapes == [(8, 4, 16, 16), (8, 4, 16, 16), (3, 4, 32, 32), (3, 4, 32, 32)]
    default = DenoisingData(caches, batch_size=8)
    sizes = [default.batch(i, random.Random(i), torch.Generator().manual_seed(i))[0].shape[-1] for i in range(4)]
    assert sizes == [16, 16, 16, 32]
