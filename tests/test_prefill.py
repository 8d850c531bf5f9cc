"""Prefill batched like the steps: a group of orders starts in one call, bit for bit as each alone."""

import pytest
import torch

from splitdiff.serve.schemas import TrajectoryRequest
from splitdiff.serve.worker import Worker
from splitdiff.world import prompt_set


@pytest.fixture(scope="module")
def worker(tiny_models_dir):
    return Worker.load(str(tiny_models_dir / "big"), vae=str(tiny_models_dir / "vae"))


def _orders(worker, n=6):
    prompts = prompt_set(n)
    reqs = [TrajectoryRequest(prompt=p, seed=i, steps=8, cloud_steps=3, size=32,
                              negative_prompt="blurry" if i % 3 == 0 else "") for i, p in enumerate(prompts)]
    reqs.append(TrajectoryRequest(prompt_embeds=[[0.1] * 384] * 5, negative_embeds=[[0.0] * 384] * 5, seed=9,
                                  steps=8, cloud_steps=3, size=32))
    return [worker.check(r) for r in reqs]


def test_a_batch_of_orders_starts_as_each_would_alone(worker):
    together = worker.prefill_many(_orders(worker))
    alone = [worker.prefill(o) for o in _orders(worker)]
    assert len(together) == len(alone) == 7
    for a, b in zip(together, alone):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)
        assert torch.equal(a.negative_embeds, b.negative_embeds) and a.negative_prompt == b.negative_prompt


def test_a_group_that_fails_starts_again_one_by_one(worker, monkeypatch):
    orders = _orders(worker)
    poison, calls = orders[2].prompt, []
    real = worker.pipe.start_many

    def start_many(prompts, seeds, **options):
        calls.append(len(prompts))
        if poison in prompts:
            raise ValueError("this prompt breaks the model")
        return real(prompts, seeds, **options)

    monkeypatch.setattr(worker.pipe, "start_many", start_many)
    made = worker.prefill_many(orders)
    assert isinstance(made[2], ValueError)
    assert all(not isinstance(m, Exception) for i, m in enumerate(made) if i != 2)
    assert sorted(calls[:2]) == [2, 4] and calls[2:] == [1, 1, 1, 1]  # the two groups, then the failed one alone
