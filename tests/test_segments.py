"""One segment executor: every place a segment runs keeps one contract, under one failure policy."""

import copy

import pytest
import torch

from splitdiff import SplitPipeline
from splitdiff.core.plan import fit_plan, parse_plan
from splitdiff.core.runner import advance
from splitdiff.core.segments import Declined, Executor, SegmentFailed, StartRequest
from splitdiff.errors import UserError

PROMPT = "a large red circle at the top left, on a navy background"


@pytest.fixture()
def pipe(tiny_models_dir):
    d = tiny_models_dir
    return SplitPipeline.from_pretrained({"cloud": str(d / "big"), "edge": str(d / "small")}, vae=str(d / "vae"))


class OtherCopy(Executor):
    """Runs a model's steps on a copy of it (as another machine would), failing its first `fail` tries."""

    def __init__(self, unet, tries: int = 1, fail: int = 0):
        self.unet, self.tries, self.fail, self.calls, self.warnings = copy.deepcopy(unet), tries, fail, 0, []
        self.warn = self.warnings.append

    def advance(self, traj, seg):
        self.calls += 1
        if self.calls <= self.fail:
            raise SegmentFailed(f"try {self.calls} failed")
        advance(self.unet, [traj], seg.steps, seg.model, where="elsewhere")


class CloudLike(OtherCopy):
    """Starts trajectories, as a cloud server does: it encodes the prompt on its own pipeline."""

    can_advance = False

    def __init__(self, pipe, fail: int = 0, decline: bool = False, steps: int | None = None):
        super().__init__(pipe.hybrid.unets["cloud"], fail=fail)
        self.pipe, self.decline, self.steps, self.here = pipe, decline, steps, "edge"

    def start(self, request: StartRequest, seg):
        self.calls += 1
        if self.decline:
            raise Declined("admission says: every step on the device")
        if self.calls <= self.fail:
            raise SegmentFailed("cloud unavailable (refused)")
        traj = self.pipe.start(request.prompt, seed=request.seed, steps=request.steps, height=request.height,
                               width=request.width)[0]
        advance(self.unet, [traj], self.steps or seg.steps, "cloud")
        return traj


def plain(pipe, plan: str, steps: int = 6, seed: int = 3):
    return pipe(PROMPT, plan, steps=steps, seed=seed, size=32).trajectories[0]


def test_an_executor_computes_what_here_computes(pipe):
    ref = plain(pipe, "cloud:3,edge:3")
    pipe.executors["cloud"] = away = OtherCopy(pipe.hybrid.unets["cloud"])
    out = plain(pipe, "cloud:3,edge:3")
    assert away.calls == 1 and not out.degraded
    assert torch.equal(out.latents, ref.latents)
    assert [s.where for s in out.provenance] == ["elsewhere", "local"]


def test_failed_tries_then_here_and_degraded(pipe):
    ref = plain(pipe, "cloud:3,edge:3")
    pipe.executors["cloud"] = away = OtherCopy(pipe.hybrid.unets["cloud"], tries=2, fail=5)
    out = plain(pipe, "cloud:3,edge:3")
    assert away.calls == 2 and out.degraded  # both tries, then here
    assert torch.equal(out.latents, ref.latents)  # the same steps, run with the pipeline's own copy
    assert "trying again" in away.warnings[0] and "running 'cloud''s 3 steps here" in away.warnings[1]

    pipe.executors["cloud"] = away = OtherCopy(pipe.hybrid.unets["cloud"], tries=2, fail=1)
    out = plain(pipe, "cloud:3,edge:3")
    assert away.calls == 2 and not out.degraded and torch.equal(out.latents, ref.latents)


def test_a_starting_executor_encodes_the_prompt_and_the_rest_runs_here(pipe):
    ref = plain(pipe, "cloud:2,edge:4")
    cloud = CloudLike(pipe)
    pipe.executors["cloud"] = cloud
    out = plain(pipe, "cloud:2,edge:4")
    assert cloud.calls == 1 and not out.degraded and torch.equal(out.latents, ref.latents)

    cloud.calls, cloud.fail = 0, 1  # unavailable: its steps run here on its `here` model, degraded
    out = plain(pipe, "cloud:2,edge:4")
    assert out.degraded and [(s.model, s.start, s.end) for s in out.provenance] == [("edge", 0, 6)]
    assert "cloud unavailable" in cloud.warnings[-1]


def test_a_split_chosen_by_the_executor_fits_the_rest_of_the_plan(pipe):
    pipe.executors["cloud"] = CloudLike(pipe, steps=4)  # an admission that granted 4 of the asked 2
    out = plain(pipe, "cloud:2,edge:4")
    assert [(s.model, s.start, s.end) for s in out.provenance] == [("cloud", 0, 4), ("edge", 4, 6)]
    pipe.executors["cloud"] = CloudLike(pipe, decline=True)  # declined: every step here, not degraded
    out = plain(pipe, "cloud:2,edge:4")
    assert not out.degraded and [(s.model, s.start, s.end) for s in out.provenance] == [("edge", 0, 6)]
    assert fit_plan(parse_plan("edge:2,edge@ana:4"), 3) == parse_plan("edge@ana:3")


def test_a_start_only_executor_must_come_first(pipe):
    pipe.executors["cloud"] = CloudLike(pipe)
    with pytest.raises(UserError, match="only starts trajectories"):
        plain(pipe, "edge:3,cloud:3")
