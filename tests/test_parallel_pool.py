"""A rank pool started once runs segment after segment, each as a one-off launch would (gloo, 2 local ranks)."""

import os

import pytest

from splitdiff.core.runner import advance
from splitdiff.core.trajectory import Trajectory
from splitdiff.hybrid.pipeline import load_pipeline
from splitdiff.parallel import advance_parallel
from splitdiff.parallel.pool import RankPool
from splitdiff.parallel.ranks import RankFailure

PROMPT = "a large red circle at the top left, on a navy background"


def test_one_pool_runs_two_segments_like_two_launches(tiny_models_dir):
    d = tiny_models_dir
    pipe = load_pipeline({"cloud": str(d / "big")}, str(d / "vae"))
    traj = pipe.start(PROMPT, steps=8, size=64)
    launched = Trajectory.from_bytes(advance_parallel(str(d / "big"), traj.to_bytes(), 3, "cloud", "pcpp", 2))
    launched = Trajectory.from_bytes(advance_parallel(str(d / "big"), launched.to_bytes(), 3, "cloud", "pcpp", 2))
    with RankPool(str(d / "big"), 2, "pcpp") as pool:
        pooled = Trajectory.from_bytes(pool.advance(traj.to_bytes(), 3, "cloud"))
        pooled = Trajectory.from_bytes(pool.advance(pooled.to_bytes(), 3, "cloud"))
        assert pool.alive and pool.segments == 2
    assert not pool.alive
    assert pooled.step_index == 6
    assert [(s.where, s.start, s.end) for s in pooled.provenance] == [("pcpp x2", 0, 6)]
    assert (pooled.latents - launched.latents).abs().max() == 0  # the same computation, not merely close
    advance(pipe.unets["cloud"], [traj], 6, "cloud")
    assert (pooled.latents - traj.latents).abs().max() < 0.05  # stale patches stay close to the exact run


def test_a_rank_that_dies_fails_the_segment_and_the_pool(tiny_models_dir, monkeypatch):
    from splitdiff.parallel import pool as pool_module

    real = pool_module.advance

    def dies_on_rank_1(unet, trajs, *args, **kwargs):
        import torch.distributed as dist

        if dist.get_rank() == 1:
            os._exit(3)
        return real(unet, trajs, *args, **kwargs)

    monkeypatch.setattr(pool_module, "advance", dies_on_rank_1)
    d = tiny_models_dir
    pipe = load_pipeline({"cloud": str(d / "big")}, str(d / "vae"))
    traj = pipe.start(PROMPT, steps=4, size=64)
    pool = RankPool(str(d / "big"), 2, "sync", timeout_s=20)
    try:
        with pytest.raises(RankFailure, match="rank 1 exited with code 3"):
            pool.advance(traj.to_bytes(), 2, "cloud")
        assert not pool.alive
        with pytest.raises(RankFailure):
            pool.advance(traj.to_bytes(), 2, "cloud")
    finally:
        pool.close()
