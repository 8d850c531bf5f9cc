import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """Two different tiny random U-Nets and a tiny VAE saved as diffusers folders."""
    from splitdiff.testing import tiny_decoder, tiny_unet, tiny_vae

    root = tmp_path_factory.mktemp("tiny")
    tiny_unet(seed=1).save_pretrained(root / "big")
    tiny_unet(seed=2, channels=(32, 32)).save_pretrained(root / "small")
    tiny_vae().save_pretrained(root / "vae")
    tiny_decoder().save_pretrained(root / "taesd")
    return root
