"""Patch parallelism on gloo: 2, 3 (uneven rows) and 4 local ranks, tiny random U-Nets.

Ranks are forked by `launch`, one CPU thread each; results come back as JSON lists.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from splitdiff.errors import UserError
from splitdiff.parallel import RankFailure, RowSplit, launch, parallelize
from splitdiff.parallel.conv import PatchConv2d
from splitdiff.parallel.groupnorm import PatchGroupNorm

# Self-attention at both resolutions (16x16 and 8x8); 16 rows cut in 3 gives patches of 6, 6 and 4 rows.
CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)  # fmt: skip
STEPS, WARMUP = 5, 4
RANKS = (2, 3, 4)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIG).eval()


@torch.no_grad()
def sample(unet, steps: int = STEPS, guidance: float = 3.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A DDIM loop with guidance (batch [uncond, cond]); the final latents and every U-Net output."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, 32, generator=g)
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(steps)
    outputs = []
    for t in scheduler.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        outputs.append(eps)
        x = scheduler.step(eps[:1] + guidance * (eps[1:] - eps[:1]), t, x).prev_sample
    return x, outputs


def _lists(x, outputs) -> dict:
    return {"x": x.flatten().tolist(), "outputs": [o.flatten().tolist() for o in outputs]}


def generate(configs: dict[str, dict | None]) -> dict:
    """On each rank: one sampling run per named config (None: the stock U-Net)."""
    unet = tiny_unet()
    out = {}
    for name, options in configs.items():
        handle = parallelize(unet, **options) if options is not None else None
        out[name] = _lists(*sample(unet))
        if handle is not None:
            out[name]["stats"] = handle.stats.rows()
            handle.remove()
    return out


CONFIGS = {
    "sync": {"mode": "sync"},
    "distrifusion": {"mode": "distrifusion", "warmup_steps": WARMUP},
    "pcpp": {"mode": "pcpp", "warmup_steps": WARMUP},
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return launch(generate, 1, {"configs": {"stock": None}})[0]["stock"]


@pytest.fixture(scope="module", params=RANKS, ids=lambda n: f"{n}ranks")
def runs(request) -> tuple[int, list[dict]]:
    configs = dict(CONFIGS)
    if request.param % 2 == 0:
        configs["split_cfg"] = {"mode": "sync", "split_cfg": True}
    return request.param, launch(generate, request.param, {"configs": configs}, timeout_s=30)


def t(values) -> torch.Tensor:
    return torch.tensor(values)


# -- geometry -------------------------------------------------------------------------------------


def test_row_split_is_cut_at_the_lowest_resolution():
    split = RowSplit.of(16, 16, 3, levels=1)
    assert split.rows(1) == (3, 3, 2) and split.rows(0) == (6, 6, 4)
    assert [split.start(i, 0) for i in range(3)] == [0, 6, 12]
    assert split.level_of(2, rows=2) == 1 and split.level_of(0, tokens=6 * 16) == 0
    assert split.band(0, 0, 0.3) == 2 and split.band(2, 1, 0.3) == 1  # at least one row


def test_row_split_refuses_patches_without_a_lowest_row():
    with pytest.raises(UserError, match="at most 4 ranks"):
        RowSplit.of(16, 16, 5, levels=2)
    with pytest.raises(UserError, match="not a multiple of 4"):
        RowSplit.of(18, 16, 2, levels=2)


def test_bad_options_are_user_errors():
    unet = tiny_unet()
    with pytest.raises(UserError, match="unknown parallel mode"):
        parallelize(unet, "ring")
    with pytest.raises(UserError, match="band"):
        parallelize(unet, "pcpp", band=0.0)
    with pytest.raises(UserError, match="groupnorm 'sync'"):
        parallelize(unet, "sync", groupnorm="async")


# -- exactness ------------------------------------------------------------------------------------


def test_sync_equals_single_device(runs, reference):
    n, results = runs
    single = t(reference["x"])
    for rank in range(n):
        assert (t(results[rank]["sync"]["x"]) - single).abs().max() <= 1e-4
    assert all(results[rank]["sync"]["x"] == results[0]["sync"]["x"] for rank in range(n))  # one output, everywhere


def test_split_guidance_equals_single_device(runs, reference):
    n, results = runs
    if n % 2:
        pytest.skip("guidance halves need an even rank count")
    assert (t(results[0]["split_cfg"]["x"]) - t(reference["x"])).abs().max() <= 1e-4


def test_async_modes_equal_sync_during_warmup(runs):
    n, results = runs
    sync = results[0]["sync"]["outputs"]
    for mode in ("distrifusion", "pcpp"):
        outputs = results[0][mode]["outputs"]
        for step in range(WARMUP):
            assert (t(outputs[step]) - t(sync[step])).abs().max() <= 1e-6, (mode, step)
        assert (t(outputs[WARMUP]) - t(sync[WARMUP])).abs().max() > 1e-4, mode  # stale values in use


def fixed_input(mode: str, band: float = 0.3, groupnorm: str = "sync", split_cfg: bool = False) -> list[float]:
    """Max abs difference from sync, step by step, when every step sees the same input."""
    unet = tiny_unet()
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        handle = parallelize(unet, "sync")
        exact = unet(x, 500, encoder_hidden_states=context).sample
        handle.remove()
        parallelize(unet, mode, band=band, warmup_steps=1, groupnorm=groupnorm, split_cfg=split_cfg)
        return [(unet(x, 500, encoder_hidden_states=context).sample - exact).abs().max().item() for _ in range(3)]


def test_stale_values_are_exact_when_nothing_changes():
    """Same input every step: last step's K/V, halos and statistics equal this step's."""
    assert max(launch(fixed_input, 3, {"mode": "distrifusion"})[0]) <= 1e-6
    assert max(launch(fixed_input, 3, {"mode": "distrifusion", "groupnorm": "async"})[0]) <= 1e-5
    assert max(launch(fixed_input, 2, {"mode": "pcpp", "band": 1.0})[0]) <= 1e-6  # two patches: the band is all
    assert max(launch(fixed_input, 4, {"mode": "distrifusion", "groupnorm": "async", "split_cfg": True})[0]) <= 1e-5


# -- traffic --------------------------------------------------------------------------------------


def self_attention_widths(unet) -> list[tuple[int, int]]:
    """(level, K+V width) of every self-attention layer, level 0 being the latent's resolution."""
    levels = len(unet.down_blocks) - 1
    blocks = [(i, b) for i, b in enumerate(unet.down_blocks)] + [(levels, unet.mid_block)]
    blocks += [(levels - j, b) for j, b in enumerate(unet.up_blocks)]
    return [
        (level, 2 * tb.attn1.to_k.out_features)
        for level, block in blocks
        for transformer in getattr(block, "attentions", [])
        for tb in transformer.transformer_blocks
    ]


def predicted_attention_bytes(n: int, band: float | None) -> int:
    """All ranks' K/V bytes per step: every other patch whole, or a band of each neighbour's rows."""
    split, total = RowSplit.of(16, 16, n, levels=1), 0
    for level, width in self_attention_widths(tiny_unet()):
        per_row = 2 * split.cols(level) * width * 4  # batch 2, float32
        for i in range(n):
            if band is None:
                total += (n - 1) * split.rows(level)[i] * per_row
            else:
                total += sum(split.band(i, level, band) * per_row for j in (i - 1, i + 1) if 0 <= j < n)
    return total


def attention_bytes(results: list[dict], mode: str, step: int) -> int:
    return sum(row["sent_attention"] for r in results for row in r[mode]["stats"] if row["step"] == step)


def test_pcpp_sends_the_band_fraction_of_distrifusion(runs):
    n, results = runs
    distrifusion, pcpp = attention_bytes(results, "distrifusion", WARMUP), attention_bytes(results, "pcpp", WARMUP)
    assert distrifusion == predicted_attention_bytes(n, None)
    assert pcpp == predicted_attention_bytes(n, 0.3)
    assert attention_bytes(results, "pcpp", 0) == distrifusion  # warm-up: everything
    if n == 4:
        assert pcpp / distrifusion <= 0.25
    received = sum(row["received_attention"] for r in results for row in r["pcpp"]["stats"] if row["step"] == WARMUP)
    assert received == pcpp


def test_stats_cover_every_category_and_step(runs):
    n, results = runs
    rows = results[0]["sync"]["stats"]
    assert [row["step"] for row in rows] == list(range(STEPS))
    for category in ("attention", "halo", "groupnorm", "output"):
        assert all(row[f"sent_{category}"] > 0 for row in rows), category
    assert all(row["compute_s"] > 0 and row["wait_s"] >= 0 for row in rows)


# -- the swap and its undoing ---------------------------------------------------------------------


def swap_round_trip() -> dict:
    unet = tiny_unet()
    stock = [type(m).__name__ for m in unet.modules()]
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=context).sample
        handle = parallelize(unet, "pcpp")
        swapped = sum(isinstance(m, (PatchConv2d, PatchGroupNorm)) for m in unet.modules())
        handle.reset()
        handle.remove()
        after = unet(x, 10, encoder_hidden_states=context).sample
    return {"same_modules": stock == [type(m).__name__ for m in unet.modules()], "swapped": swapped,
            "same_output": bool(torch.equal(before, after))}  # fmt: skip


def test_remove_gives_the_stock_unet_back():
    result = launch(swap_round_trip, 1)[0]
    assert result == {"same_modules": True, "swapped": result["swapped"], "same_output": True}
    assert result["swapped"] > 10


# -- failures -------------------------------------------------------------------------------------


def fail_at_step(how: str, rank: int, step: int = 2) -> None:
    unet = tiny_unet()
    handle = parallelize(unet, "distrifusion", warmup_steps=1)

    def die(_module, _args):
        if torch.distributed.get_rank() == rank and handle._step == step:
            if how == "exit":
                os._exit(3)
            time.sleep(120)

    unet.register_forward_pre_hook(die)
    sample(unet)


def test_a_dying_rank_ends_the_run_with_a_clear_error():
    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 exited with code 3") as failure:
        launch(fail_at_step, 3, {"how": "exit", "rank": 1}, timeout_s=20)
    assert "lost contact with rank" in str(failure.value)
    assert time.monotonic() - started < 15


def test_a_hung_rank_ends_the_run_within_the_timeout():
    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 0: PeerFailure: .*lost contact with rank.*stopped rank 1"):
        launch(fail_at_step, 2, {"how": "hang", "rank": 1}, timeout_s=3)
    assert time.monotonic() - started < 15
