"""Training commands resume exactly where they stopped, and never unpickle."""

import torch

from splitdiff.io import load_tensors
from splitdiff.train.evaluator import train_evaluator


def test_stopped_and_resumed_training_equals_one_run(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_evaluator(straight, steps=4, batch_size=4, out=straight / "w.safetensors")
    train_evaluator(resumed, steps=2, batch_size=4, out=resumed / "w.safetensors")
    assert load_tensors(resumed / "checkpoint.safetensors")[1]["step"] == 2
    train_evaluator(resumed, steps=4, batch_size=4, out=resumed / "w.safetensors")
    a, _ = load_tensors(straight / "w.safetensors")
    b, meta = load_tensors(resumed / "w.safetensors")
    assert meta["step"] == 4 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed at step 2" in (resumed / "train.log").read_text()


def test_max_minutes_stops_cleanly_with_a_checkpoint(tmp_path):
    train_evaluator(tmp_path, steps=100, batch_size=4, max_minutes=0.0, out=tmp_path / "w.safetensors")
    _, meta = load_tensors(tmp_path / "checkpoint.safetensors")
    assert meta["step"] == 0 and (tmp_path / "w.safetensors").exists()


def test_a_lost_checkpoint_warm_starts_from_the_exported_weights(tmp_path):
    from splitdiff.train.vae import train_vae

    out = tmp_path / "vae"
    train_vae(tmp_path / "run", out, steps=2, batch_size=2)
    assert (out / "training.json").exists() and "steps: 2" in (out / "README.md").read_text()
    (tmp_path / "run" / "checkpoint.safetensors").unlink()
    train_vae(tmp_path / "run", out, steps=3, batch_size=2)
    assert "warm start from" in (tmp_path / "run" / "train.log").read_text()
    assert load_tensors(tmp_path / "run" / "checkpoint.safetensors")[1]["step"] == 3


def test_weights_of_another_architecture_are_no_warm_start(tmp_path):
    from diffusers import AutoencoderTiny

    from splitdiff.train.export import export_diffusers, warm_start
    from splitdiff.train.loop import TrainState

    def decoder(blocks):
        return AutoencoderTiny(decoder_block_out_channels=(8, 8, 8), num_decoder_blocks=blocks, latent_channels=4)

    export_diffusers(decoder((1, 1, 1)), tmp_path / "old", TrainState(step=7))
    assert warm_start(tmp_path / "old", decoder((1, 1, 1)))["steps"] == 7
    fresh = decoder((1, 1, 0))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert warm_start(tmp_path / "old", fresh) is None
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
