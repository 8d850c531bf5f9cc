"""The library's face: SplitPipeline composes the hybrid pipeline and the core runner, adding nothing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitdiff import SplitPipeline, Trajectory
from splitdiff.core.plan import parse_plan
from splitdiff.errors import UserError
from splitdiff.hybrid.pipeline import load_pipeline

PROMPT = "a large red circle at the top left, on a navy background"
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def pipe(tiny_models_dir):
    return SplitPipeline.from_pretrained({"cloud": str(tiny_models_dir / "big"), "edge": str(tiny_models_dir / "small")},
                                         vae=str(tiny_models_dir / "vae"))


def test_a_call_equals_the_hybrid_pipeline_step_for_step(pipe, tiny_models_dir):
    out = pipe([PROMPT, "a small blue star at the center, on a white background"], plan="cloud:3,edge:3", steps=6,
               seed=5, size=32)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    hybrid = load_pipeline({"cloud": str(tiny_models_dir / "big"), "edge": str(tiny_models_dir / "small")},
                           str(tiny_models_dir / "vae"))
    ref = hybrid.start(PROMPT, seed=5, steps=6, size=32)
    hybrid.run(ref, parse_plan("cloud:3,edge:3"))
    assert torch.equal(out.trajectories[0].latents, ref.latents)
    assert out.trajectories[1].seed == 6  # one seed counted up per prompt
    assert [(s.model, s.start, s.end) for s in out.trajectories[0].provenance] == [("cloud", 0, 3), ("edge", 3, 6)]
    assert out.images[0].tobytes() == hybrid.decode(ref).tobytes()


def test_pause_send_and_finish_elsewhere_is_the_same_image(pipe):
    whole = pipe(PROMPT, plan="cloud:2,edge:4", steps=6, seed=3, size=32)
    traj = pipe.start(PROMPT, seed=3, steps=6, size=32)[0]
    pipe.run(traj, "cloud:2", pause=True)
    assert traj.step_index == 2
    moved = Trajectory.from_bytes(traj.to_bytes())
    pipe.run(moved, "edge:4")
    assert moved.done and torch.equal(moved.latents, whole.trajectories[0].latents)
    assert pipe.decode(moved).tobytes() == whole.images[0].tobytes()


def test_default_plan_and_mistakes(pipe):
    out = pipe(PROMPT, steps=4, size=32)
    assert [(s.model, s.start, s.end) for s in out.trajectories[0].provenance] == [("cloud", 0, 4)]
    with pytest.raises(UserError, match="runs 3 steps but 4 remain"):
        pipe(PROMPT, plan="cloud:3", steps=4, size=32)
    with pytest.raises(UserError, match="only 2 remain"):
        traj = pipe.start(PROMPT, steps=4, size=32)[0]
        pipe.run(traj, "cloud:2", pause=True)
        pipe.run(traj, "edge:3", pause=True)
    with pytest.raises(UserError, match="unknown user or adapter 'zed'"):
        pipe(PROMPT, plan="cloud:2,edge@zed:2", steps=4, size=32)
    with pytest.raises(UserError, match="2 prompts but 1 seeds"):
        pipe.start([PROMPT, PROMPT], seed=[1])


def test_importing_splitdiff_or_its_cli_loads_no_torch():
    """`splitdiff --help` and usage errors answer at once; torch loads when a command needs it."""
    code = "import sys, splitdiff, splitdiff.cli; assert 'torch' not in sys.modules, 'torch'; print(splitdiff.__all__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_readme_python_example_runs_as_shown(tmp_path, monkeypatch):
    block = re.search(r"### From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "ana.png").exists()


def test_a_folders_own_solver_settings_do_not_override_the_named_scheduler(tiny_models_dir, tmp_path):
    """A pipeline folder shipped for SDE-DPM-Solver++ with Karras sigmas, run as dpmsolver++, is dpmsolver++."""
    import json
    import shutil

    from splitdiff.core.schedulers import SD_NOISE_SCHEDULE

    folder = tmp_path / "sd"
    shutil.copytree(tiny_models_dir / "big", folder / "unet")
    shutil.copytree(tiny_models_dir / "vae", folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DPMSolverMultistepScheduler", **SD_NOISE_SCHEDULE, "algorithm_type": "sde-dpmsolver++",
         "use_karras_sigmas": True, "solver_order": 3}))
    options = dict(steps=6, scheduler="dpmsolver++", size=32, seed=1)
    ours = SplitPipeline.from_pretrained({"sd": str(folder)})(PROMPT, **options)
    plain = SplitPipeline.from_pretrained({"sd": str(tiny_models_dir / "big")}, vae=str(tiny_models_dir / "vae"))(
        PROMPT, **options)
    assert torch.equal(ours.trajectories[0].latents, plain.trajectories[0].latents)
    cfg = ours.trajectories[0].scheduler.config
    assert cfg.algorithm_type == "dpmsolver++" and not cfg.use_karras_sigmas and cfg.solver_order == 2


def _pipeline_folder(tiny_models_dir, path, encoder_bytes: bytes):
    """A real-format pipeline folder layout: unet/, vae/ and a text encoder with its tokenizer."""
    import shutil

    shutil.copytree(tiny_models_dir / "big", path / "unet")
    shutil.copytree(tiny_models_dir / "vae", path / "vae")
    (path / "text_encoder").mkdir()
    (path / "text_encoder" / "config.json").write_text('{"hidden_size": 384}')
    (path / "text_encoder" / "model.safetensors").write_bytes(encoder_bytes)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.json").write_text("{}")
    return path


def test_two_folders_with_different_text_encoders_are_refused_before_loading(tiny_models_dir, tmp_path):
    from splitdiff.text import encoder_source

    a = _pipeline_folder(tiny_models_dir, tmp_path / "a", b"one")
    b = _pipeline_folder(tiny_models_dir, tmp_path / "b", b"two")
    same = _pipeline_folder(tiny_models_dir, tmp_path / "c", b"one")
    with pytest.raises(UserError, match="models 'cloud' and 'edge' come with different text encoders"):
        SplitPipeline.from_pretrained({"cloud": str(a), "edge": str(b)})
    assert encoder_source({"cloud": str(a), "edge": str(same)}) == str(a)
    bare = str(tiny_models_dir / "big")
    assert encoder_source({"cloud": bare, "edge": str(b)}) == str(b)  # the folder's, not the family's
    assert encoder_source({"cloud": bare}) == bare


def test_the_tiny_decoder_is_taken_when_asked_even_beside_a_pipeline_folder(tiny_models_dir, tmp_path):
    from diffusers import AutoencoderTiny

    from splitdiff.core.registry import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "tiny-decoder" / "config.json").exists():
        pytest.skip("the embedded tiny decoder is not installed")
    folder = tmp_path / "sd"
    import shutil

    shutil.copytree(tiny_models_dir / "big", folder / "unet")
    shutil.copytree(tiny_models_dir / "vae", folder / "vae")
    assert not isinstance(SplitPipeline.from_pretrained({"sd": str(folder)}).hybrid.vae, AutoencoderTiny)
    assert isinstance(SplitPipeline.from_pretrained({"sd": str(folder)}, decoder="tiny").hybrid.vae, AutoencoderTiny)


def test_generators_and_step_end_callbacks_the_diffusers_way(pipe):
    by_seed = pipe(PROMPT, plan="cloud:2,edge:2", steps=4, seed=5, size=32).trajectories[0]
    by_gen = pipe(PROMPT, plan="cloud:2,edge:2", steps=4, size=32,
                  generator=torch.Generator().manual_seed(5)).trajectories[0]
    assert torch.equal(by_seed.latents, by_gen.latents) and by_gen.seed == 5
    used = torch.Generator().manual_seed(5)
    torch.randn(1, generator=used)
    with pytest.raises(UserError, match="has drawn numbers"):
        pipe(PROMPT, plan="cloud:2,edge:2", steps=4, size=32, generator=used)

    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, int(timestep), kwargs["latents"].shape))
        return {"latents": kwargs["latents"] * 0} if step == 3 else None

    out = pipe(PROMPT, plan="cloud:2,edge:2", steps=4, size=32, seed=5, callback_on_step_end=callback)
    traj = out.trajectories[0]
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and [t for _, t, _ in seen] == traj.scheduler.timesteps.tolist()
    assert not traj.latents.any()  # the last callback's latents replaced the trajectory's
