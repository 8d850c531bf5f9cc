"""SDXL pipeline folders: two text encoders, pooled embeddings and time ids through the one runner."""

import warnings

import pytest
import torch

from splitdiff import SplitPipeline, Trajectory
from splitdiff.core.trajectory import TrajectoryError
from splitdiff.errors import UserError
from splitdiff.testing import tiny_sdxl_folder

PROMPT = "a large red circle at the top left, on a navy background"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL pipeline folder (save_pretrained), and a second, smaller U-Net beside it (Hybrid SD's pair)."""
    root = tmp_path_factory.mktemp("sdxl")
    return tiny_sdxl_folder(root / "pipe"), tiny_sdxl_folder(root / "small", seed=1, unet_only=True, channels=(32, 32))


def _diffusers(folder):
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative", ["", "a blue square"])
def test_an_sdxl_folder_reproduces_diffusers_sdxl_pipeline(xl, negative):
    folder, _ = xl
    ref = _diffusers(folder)(PROMPT, negative_prompt=negative or None, num_inference_steps=4, guidance_scale=5.0,
                             generator=torch.Generator().manual_seed(3), height=64, width=96,
                             output_type="latent").images
    pipe = SplitPipeline.from_pretrained({"xl": str(folder)})
    out = pipe(PROMPT, plan="xl:4", steps=4, scheduler="folder", seed=3, negative_prompt=negative, height=64, width=96)
    traj = out.trajectories[0]
    assert traj.prompt_added["text_embeds"].shape == (32,) and traj.prompt_added["time_ids"].tolist() == [
        64, 96, 0, 0, 64, 96]
    assert (traj.latents - ref).abs().max() <= 1e-5 * ref.abs().max()  # float rounding on latents up to ~10
    if not negative:  # SDXL's empty negative prompt is zeros (force_zeros_for_empty_prompt)
        assert not traj.negative_embeds.any() and not traj.negative_added["text_embeds"].any()


def test_a_hybrid_sdxl_plan_pauses_travels_and_resumes_bit_for_bit(xl):
    folder, small = xl
    pipe = SplitPipeline.from_pretrained({"big": str(folder), "small": str(small)}, text_encoder=str(folder))
    straight = pipe(PROMPT, plan="big:3,small:3", steps=6, seed=1, size=64).trajectories[0]
    traj = pipe.start(PROMPT, seed=1, steps=6, size=64)[0]
    pipe.run(traj, "big:3", pause=True)
    moved = Trajectory.from_bytes(traj.to_bytes())
    assert torch.equal(moved.prompt_added["text_embeds"], traj.prompt_added["text_embeds"])
    pipe.run(moved, "small:3")
    assert torch.equal(moved.latents, straight.latents)
    assert [(s.model, s.start, s.end) for s in moved.provenance] == [("big", 0, 3), ("small", 3, 6)]


def test_an_sdxl_trajectory_is_refused_by_a_model_without_added_conditioning(xl, tiny_models_dir):
    folder, _ = xl
    traj = SplitPipeline.from_pretrained({"xl": str(folder)}).start(PROMPT, steps=4, size=64)[0]
    sd = SplitPipeline.from_pretrained({"sd": str(tiny_models_dir / "big")}, vae=str(tiny_models_dir / "vae"))
    with pytest.raises(UserError, match="embeddings are 64 wide|pooled"):
        sd.run(traj, "sd:4")
    plain = sd.start(PROMPT, steps=4, size=64)[0]
    xl_pipe = SplitPipeline.from_pretrained({"xl": str(folder)})
    with pytest.raises(UserError):
        xl_pipe.run(plain, "xl:4")


def test_hostile_added_conditioning_is_refused_in_one_line(xl):
    import json

    from safetensors.torch import load as st_load, save as st_save

    folder, _ = xl
    traj = SplitPipeline.from_pretrained({"xl": str(folder)}).start(PROMPT, steps=4, size=64)[0]
    data = traj.to_bytes()
    meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors = st_load(data)
    for change, message in [
        (lambda t: t.pop("negative_added.text_embeds"), "prompt_added and negative_added"),
        (lambda t: t.update({"prompt_added.time_ids": torch.ones(7)}), "prompt_added and negative_added|time_ids"),
        (lambda t: t.update({"prompt_added.other": torch.ones(3), "negative_added.other": torch.ones(3)}),
         "unexpected tensor"),
        (lambda t: t.update({"prompt_added.text_embeds": torch.full((32,), float("nan"))}), "non-finite"),
    ]:
        bad = dict(tensors)
        change(bad)
        with pytest.raises(TrajectoryError, match=message):
            Trajectory.from_bytes(st_save(bad, metadata=meta))
