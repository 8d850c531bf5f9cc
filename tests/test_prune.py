"""Structural pruning: scores for bypassable units, weights inherited where shapes match."""

import torch

from splitdiff.train.compress import UpBlockFeatures, edge_from_cloud
from splitdiff.train.prune import inherit, significance, units
from splitdiff.train.unet import unet_from_config


def test_edge_is_pruned_from_cloud_and_inherits_significant_units():
    torch.manual_seed(0)
    cloud = unet_from_config((16, 32, 64), 2).eval()
    edge = edge_from_cloud(cloud).eval()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(edge) <= 0.25 * n(cloud)

    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 48, 384)
    scores = significance(cloud, x, t, ctx)
    bypassable = [k for k, v in scores.items() if v != float("inf")]
    assert bypassable and all(scores[k] > 0 for k in bypassable)

    mapping = inherit(edge, cloud, scores)
    for student, teacher in mapping.items():
        su, tu = units(edge)[student], units(cloud)[teacher]
        assert all(torch.equal(a, b) for a, b in zip(su.state_dict().values(), tu.state_dict().values()))
    # among interchangeable teacher units, the more significant one is inherited
    assert mapping["down_blocks.1.attentions.0"] == max(
        ("down_blocks.1.attentions.0", "down_blocks.1.attentions.1"), key=scores.get)
    assert len(mapping) >= len(units(edge)) // 2
    assert torch.equal(edge.conv_in.weight, cloud.conv_in.weight)

    tf, sf = UpBlockFeatures(cloud), UpBlockFeatures(edge, offset=1)
    with torch.no_grad():
        cloud(x, t, ctx)
        edge(x, t, ctx)
    assert set(sf.feats) == {1, 2} and all(sf.feats[k].shape == tf.feats[k].shape for k in sf.feats)


def test_compress_command_distils_a_loadable_edge_unet(tmp_path):
    """The whole `compress` path on a tiny teacher: pruning report, checkpoint, exported model and card."""
    from splitdiff.core.registry import load_unet
    from splitdiff.testing import tiny_vae
    from splitdiff.train.compress import compress

    torch.manual_seed(0)
    unet_from_config((16, 32, 64), 2).save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "training.json").write_text('{"steps": 1234}')
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "edge"
    compress(tmp_path / "run", out, teacher=str(tmp_path / "teacher"), steps=3, batch_size=4,
             vae=str(tmp_path / "vae"), cache_dir=tmp_path / "cache", n64=16, n128=8)
    edge = load_unet(str(out))
    assert edge.config.block_out_channels == [16, 32] and edge.config.mid_block_type is None
    card = (out / "README.md").read_text()
    assert (tmp_path / "run" / "pruning.json").exists() and "steps: 3" in card
    assert "- teacher: `teacher` at 1,234 steps" in card  # the card names the teacher it was distilled from
