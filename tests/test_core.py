"""The trajectory core against diffusers' own pipeline, and pause/serialize/resume."""

import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline

from splitdiff.core.plan import check_plan, parse_plan
from splitdiff.core.runner import advance, decode, denoise_step
from splitdiff.core.schedulers import SCHEDULERS, make_scheduler
from splitdiff.testing import tiny_unet, tiny_vae
from splitdiff.core.trajectory import Trajectory, TrajectoryError, new_trajectory
from splitdiff.errors import UserError

STEPS = 6
SHAPE = (4, 16, 16)


@pytest.fixture(scope="module")
def models():
    return tiny_unet(seed=1), tiny_unet(seed=2, channels=(32, 32)), tiny_vae()


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 48, 384, generator=g), torch.randn(2, 48, 384, generator=g)


def _traj(embeds, scheduler, seed=3, i=0, guidance=5.0):
    emb, neg = embeds
    return new_trajectory(emb[i], neg[i], latent_shape=SHAPE, scheduler=scheduler, steps=STEPS, seed=seed,
                          guidance_scale=guidance)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_one_model_plan_reproduces_stable_diffusion_pipeline(models, embeds, scheduler):
    unet, _, vae = models
    emb, neg = embeds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                       scheduler=make_scheduler(scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ref = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=STEPS, guidance_scale=5.0,
               generator=gens, height=64, width=64, output_type="latent").images
    trajs = [_traj(embeds, scheduler, seed=3, i=0), _traj(embeds, scheduler, seed=4, i=1)]
    advance(unet, trajs, STEPS)  # both in one batched U-Net call per step
    ours = torch.cat([t.latents for t in trajs])
    assert (ours - ref).abs().max() <= 1e-5
    ref_img = pipe.vae.decode(ref / vae.config.scaling_factor, return_dict=False)[0]
    assert (decode(vae, ours) - ref_img.clamp(-1, 1)).abs().max() <= 1e-5


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_pause_serialize_resume_after_every_step_is_bit_identical(models, embeds, scheduler):
    unet = models[0]
    straight = _traj(embeds, scheduler)
    advance(unet, [straight], STEPS)
    paused = _traj(embeds, scheduler)
    for _ in range(STEPS):
        paused = Trajectory.from_bytes(paused.to_bytes())
        advance(unet, [paused], 1)
    assert torch.equal(paused.latents, straight.latents)
    assert paused.done and paused.provenance[0].end == STEPS


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_a_forked_prefix_equals_separate_runs(models, embeds, scheduler):
    """One shared prefix on the large model, branched into suffixes of different lengths on the small one."""
    large, small, _ = models
    shared = _traj(embeds, scheduler)
    advance(large, [shared], 2, "large")
    branches = shared.fork(3)
    assert len({id(b.scheduler) for b in branches} | {id(shared.scheduler)}) == 4
    for k, branch in enumerate(branches):
        advance(large, [branch], k, "large")
        advance(small, [branch], STEPS - 2 - k, "small")
        separate = _traj(embeds, scheduler)
        advance(large, [separate], 2 + k, "large")
        advance(small, [separate], STEPS - 2 - k, "small")
        assert torch.equal(branch.latents, separate.latents)
        assert [(s.model, s.start, s.end) for s in branch.provenance] == \
            [(s.model, s.start, s.end) for s in separate.provenance]
    assert shared.step_index == 2 and shared.fork(0) == []


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_two_model_plan_equals_hand_written_switch(models, embeds, scheduler):
    big, small, _ = models
    emb, neg = embeds
    traj = _traj(embeds, scheduler)
    advance(big, [traj], 2, "cloud")
    traj = Trajectory.from_bytes(traj.to_bytes())  # handed to another machine
    advance(small, [traj], STEPS - 2, "edge")

    sched = make_scheduler(scheduler, num_inference_steps=STEPS)  # one shared scheduler, switch U-Nets
    g = torch.Generator().manual_seed(3)
    x = torch.randn((1, *SHAPE), generator=g) * sched.init_noise_sigma
    ctx = torch.stack([neg[0], emb[0]])
    for i, t in enumerate(sched.timesteps):
        unet = big if i < 2 else small
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        u, c = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
        x = sched.step(u + 5.0 * (c - u), t, x, generator=g).prev_sample
    assert (traj.latents - x).abs().max() <= 1e-5
    assert [(s.model, s.start, s.end) for s in traj.provenance] == [("cloud", 0, 2), ("edge", 2, STEPS)]


def test_trajectories_at_different_steps_batch_together(models, embeds):
    unet = models[0]
    alone = [_traj(embeds, "dpmsolver++", seed=1), _traj(embeds, "euler-a", seed=2, i=1, guidance=1.0)]
    advance(unet, alone[:1], STEPS)
    advance(unet, alone[1:], STEPS)
    together = [_traj(embeds, "dpmsolver++", seed=1), _traj(embeds, "euler-a", seed=2, i=1, guidance=1.0)]
    advance(unet, together[:1], 2)  # the first is two steps ahead
    while not all(t.done for t in together):
        denoise_step(unet, together)
    for a, b in zip(alone, together):
        assert (a.latents - b.latents).abs().max() <= 1e-5


def test_fp16_state_is_smaller_and_close(models, embeds):
    traj = _traj(embeds, "dpmsolver++")
    advance(models[0], [traj], 3)
    full, half = traj.to_bytes(), traj.to_bytes(half=True)
    back = Trajectory.from_bytes(half)
    assert len(half) < 0.6 * len(full)
    assert back.latents.dtype == torch.float32 and (back.latents - traj.latents).abs().max() < 1e-2
    assert back.step_index == 3 and back.scheduler_name == "dpmsolver++"


def _corrupt(data: bytes) -> list[tuple[str, bytes]]:
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])

    def with_meta(**changes):
        meta = json.loads(header["__metadata__"]["splitdiff"])
        meta.update(changes)
        h = dict(header, __metadata__={"splitdiff": json.dumps(meta)})
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]

    nan = bytearray(data)
    off = header["latents"]["data_offsets"][0] + 8 + n
    nan[off:off + 4] = struct.pack("<f", float("nan"))
    return [
        ("truncated", data[: len(data) // 2]),
        ("corrupt", b"\x00" * 8 + data[8:]),
        ("version", with_meta(version=99)),
        ("format", with_meta(format="other")),
        ("step index", with_meta(step_index=99)),
        ("non-finite", bytes(nan)),
        ("scheduler", with_meta(scheduler={"name": "plms", "config": {}, "num_inference_steps": 6,
                                           "state": {"scalars": {}, "lists": {}}})),
        ("empty", b""),
    ]


def test_bad_state_bytes_raise_one_clear_line(models, embeds):
    traj = _traj(embeds, "dpmsolver++")
    advance(models[0], [traj], 2)
    for label, data in _corrupt(traj.to_bytes()):
        with pytest.raises(TrajectoryError) as e:
            Trajectory.from_bytes(data)
        assert "\n" not in str(e.value), label


def test_plans_parse_and_check():
    plan = parse_plan("cloud:10,edge:10,cloud:5")
    check_plan(plan, 25)
    assert [s.model for s in plan] == ["cloud", "edge", "cloud"]
    for bad in ("cloud", "cloud:x", "cloud:0", ":3", "cloud:10;edge:15"):
        with pytest.raises(UserError):
            parse_plan(bad)
    with pytest.raises(UserError, match="runs 20 steps"):
        check_plan(parse_plan("cloud:10,edge:10"), 25)


def test_provenance_names_each_model_by_its_config_and_the_file_its_diffusers(models, embeds):
    import json

    import diffusers
    from safetensors import safe_open

    from splitdiff.core.runner import model_fingerprint

    large, small, _ = models
    traj = _traj(embeds, "ddim")
    advance(large, [traj], 2, "m")
    advance(small, [traj], 2, "m")  # the same name, another model: two segments, told apart
    assert [(s.model, s.fingerprint) for s in traj.provenance] == [("m", model_fingerprint(large)),
                                                                   ("m", model_fingerprint(small))]
    assert model_fingerprint(large) != model_fingerprint(small)
    data = traj.to_bytes()
    back = Trajectory.from_bytes(data)
    assert [s.fingerprint for s in back.provenance] == [s.fingerprint for s in traj.provenance]
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with safe_open(f.name, framework="pt") as st:
            meta = json.loads(st.metadata()["splitdiff"])
    assert meta["diffusers"] == diffusers.__version__
    old = Trajectory.from_bytes(data)  # a file from before (no version, no fingerprints) still loads
    old.provenance = [type(s)(s.model, s.start, s.end, s.seconds, s.where) for s in old.provenance]
    assert "fingerprint" not in json.dumps([s.as_json() for s in old.provenance])
    assert Trajectory.from_bytes(old.to_bytes()).provenance[0].fingerprint is None
