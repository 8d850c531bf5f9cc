import subprocess
import sys

import torch

from splitdiff.text import CONTEXT_DIM, MAX_LENGTH, default_encoder


def test_encoder_gives_token_states_and_mask():
    h, m = default_encoder()(["a large red circle at the top left, on a navy background", ""])
    assert h.shape == (2, MAX_LENGTH, CONTEXT_DIM) and m.shape == (2, MAX_LENGTH)
    assert m[0].sum() > m[1].sum() >= 2 and torch.isfinite(h).all()
    h2, _ = default_encoder()(["a large red circle at the top left, on a navy background"])
    assert torch.equal(h2[0], h[0])  # cached and deterministic


def test_encoder_loads_with_no_hub_access():
    code = ("import os; os.environ['HF_HUB_OFFLINE']='1'; os.environ['HF_ENDPOINT']='http://127.0.0.1:9';"
            "from splitdiff.text import TextEncoder; h, m = TextEncoder()(['a small blue star at the center, on a "
            "black background']); print(tuple(h.shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(1, 48, 384)" in out.stdout


def test_batched_encoding_equals_one_prompt_at_a_time():
    """The bulk path the training caches use gives each prompt's own encoding."""
    prompts = ["a small green star at the center, on a black background",
               "a large red circle at the top left and a small blue ring at the bottom right, on a navy background", ""]
    h, m = default_encoder().encode_batch(prompts)
    for i, p in enumerate(prompts):
        hi, mi = default_encoder()([p])
        assert torch.equal(m[i], mi[0])
        assert (h[i] - hi[0]).abs().max() < 1e-5
