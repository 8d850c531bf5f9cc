"""Checkpoints as users have them: fp16-variant folders, a folder's own scheduler, other dtypes and devices,
non-square images, and a named text encoder for bare U-Net folders."""

import json
import shutil

import pytest
import torch

from splitdiff import SplitPipeline, Trajectory
from splitdiff.core.devices import parse_dtype, resolve_device
from splitdiff.core.registry import load_unet
from splitdiff.core.schedulers import SD_NOISE_SCHEDULE
from splitdiff.errors import UserError
from splitdiff.testing import tiny_unet

PROMPT = "a large red circle at the top left, on a navy background"


@pytest.fixture(scope="module")
def pipe(tiny_models_dir):
    return SplitPipeline.from_pretrained({"cloud": str(tiny_models_dir / "big")}, vae=str(tiny_models_dir / "vae"))


def _sd_folder(tiny_models_dir, path, scheduler: dict | None = None):
    shutil.copytree(tiny_models_dir / "big", path / "unet")
    shutil.copytree(tiny_models_dir / "vae", path / "vae")
    if scheduler is not None:
        (path / "scheduler").mkdir()
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return path


def test_a_folder_with_only_fp16_variant_weights_loads_them(tmp_path):
    unet = tiny_unet(seed=3)
    unet.half().save_pretrained(tmp_path / "unet", variant="fp16")
    assert [p.name for p in (tmp_path / "unet").glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    loaded = load_unet(str(tmp_path / "unet"))
    assert loaded.dtype == torch.float32
    for (name, a), b in zip(unet.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.float(), b), name
    with pytest.raises(UserError, match="has no 'bf16' variant"):
        load_unet(str(tmp_path / "unet"), torch.float32, "bf16")


def test_scheduler_folder_runs_the_folders_own_settings_and_the_trajectory_says_so(tiny_models_dir, tmp_path):
    own = {"_class_name": "DPMSolverMultistepScheduler", **SD_NOISE_SCHEDULE, "use_karras_sigmas": True,
           "solver_order": 3, "some_future_key": 1}
    folder = _sd_folder(tiny_models_dir, tmp_path / "sd", own)
    pipe = SplitPipeline.from_pretrained({"sd": str(folder)})
    ran = pipe(PROMPT, steps=6, scheduler="folder", size=32, seed=1).trajectories[0]
    named = pipe(PROMPT, steps=6, scheduler="dpmsolver++", size=32, seed=1).trajectories[0]
    cfg = ran.scheduler.config
    assert ran.scheduler_name == "dpmsolver++" and cfg.use_karras_sigmas and cfg.solver_order == 3
    assert not torch.equal(ran.latents, named.latents)
    again = Trajectory.from_bytes(ran.to_bytes())  # the whole config travels with the state
    assert again.scheduler.config.use_karras_sigmas and again.scheduler.config.solver_order == 3

    sde = _sd_folder(tiny_models_dir, tmp_path / "sde", {**own, "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(UserError, match="algorithm_type is 'sde-dpmsolver\\+\\+'"):
        SplitPipeline.from_pretrained({"sd": str(sde)})(PROMPT, steps=4, scheduler="folder", size=32)
    other = _sd_folder(tiny_models_dir, tmp_path / "pndm", {"_class_name": "PNDMScheduler", **SD_NOISE_SCHEDULE})
    with pytest.raises(UserError, match="scheduler class 'PNDMScheduler' is not one splitdiff runs"):
        SplitPipeline.from_pretrained({"sd": str(other)})(PROMPT, steps=4, scheduler="folder", size=32)
    bare = SplitPipeline.from_pretrained({"cloud": str(tiny_models_dir / "big")}, vae=str(tiny_models_dir / "vae"))
    with pytest.raises(UserError, match="--scheduler folder needs"):
        bare(PROMPT, steps=4, scheduler="folder", size=32)


def test_non_square_images(pipe):
    out = pipe(PROMPT, steps=4, height=32, width=64, seed=2)
    assert out.images[0].size == (64, 32)
    traj = out.trajectories[0]
    assert tuple(traj.latents.shape) == (1, 4, 8, 16)
    again = Trajectory.from_bytes(traj.to_bytes())
    assert torch.equal(again.latents, traj.latents)
    assert pipe(PROMPT, steps=4, size=32, width=48).images[0].size == (48, 32)
    with pytest.raises(UserError, match="width 30 is not a multiple of the VAE's factor 4"):
        pipe(PROMPT, steps=4, height=32, width=30)


def test_dtypes_move_the_models_not_the_state_and_never_the_cached_models(tiny_models_dir, pipe):
    ref = pipe(PROMPT, steps=6, size=32, seed=4).trajectories[0]
    for dtype in ("bf16", "fp16"):
        low = SplitPipeline.from_pretrained({"cloud": str(tiny_models_dir / "big")}, vae=str(tiny_models_dir / "vae"),
                                            torch_dtype=dtype, device="cpu")
        assert low.dtype == parse_dtype(dtype) and low.device.type == "cpu"
        traj = low(PROMPT, steps=6, size=32, seed=4).trajectories[0]
        assert traj.latents.dtype == torch.float32 and traj.scheduler.timesteps.dtype == torch.int64
        err = float((traj.latents - ref.latents).abs().mean() / ref.latents.abs().mean())
        assert 0 < err < 0.05, (dtype, err)
    moved = SplitPipeline.from_pretrained({"cloud": str(tiny_models_dir / "big")},
                                          vae=str(tiny_models_dir / "vae")).to(dtype=torch.bfloat16)
    assert moved.dtype == torch.bfloat16
    assert pipe.dtype == torch.float32 and load_unet(str(tiny_models_dir / "big")).dtype == torch.float32


def test_devices_and_dtypes_are_checked_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad, why in (("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device")):
        with pytest.raises(UserError, match=why):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch sees no GPU"):
            resolve_device("cuda:0")
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")


def test_a_named_text_encoder_folder_serves_bare_unet_folders(tiny_models_dir, tmp_path):
    from splitdiff.text import encoder_source

    folder = tmp_path / "sd"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "text_encoder" / "config.json").write_text("{}")
    (folder / "tokenizer").mkdir()
    bare = str(tiny_models_dir / "big")
    assert encoder_source({"cloud": bare}, text_encoder=str(folder)) == str(folder)
    with pytest.raises(UserError, match="is not a folder with text_encoder/config.json"):
        encoder_source({"cloud": bare}, text_encoder=str(tmp_path / "nothing"))
