"""`splitdiff parallel` and `bench parallel` end to end, on the random tiny U-Net and 2 local ranks."""

from __future__ import annotations

import csv

import typer
from typer.testing import CliRunner

from splitdiff.bench.parallel import bench_parallel
from splitdiff.cli_parallel import register


def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `parallel` a sub-command
    return app


def test_parallel_command_writes_an_image(tmp_path):
    out = tmp_path / "tiny.png"
    result = CliRunner().invoke(
        app(), ["parallel", "a red circle", "--tiny", "--ranks", "2", "--latent-size", "16", "--steps", "3",
                "--mode", "distrifusion", "--warmup", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    assert "KiB sent per step" in result.output


def test_too_many_ranks_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(
        app(), ["parallel", "a red circle", "--tiny", "--ranks", "3", "--latent-size", "4", "--steps", "1",
                "--out", str(tmp_path / "x.safetensors")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "ranks 0, 1, 2: UserError: 3 patches need one row each" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_bench_writes_csv_and_plot(tmp_path):
    rows = bench_parallel(None, 16, ranks=(1, 2), modes=("sync", "pcpp"), out_dir=tmp_path, steps=5, vae="tiny",
                          prompts=2)  # fmt: skip
    by_mode = {row["mode"]: row for row in rows}
    assert set(by_mode) == {"single", "sync", "pcpp"}
    assert by_mode["sync"]["max_abs_latent"] <= 1e-4
    assert all(0.0 <= row["adherence"] <= 1.0 for row in rows)
    assert by_mode["pcpp"]["attention_bytes_per_step"] < by_mode["sync"]["attention_bytes_per_step"]
    with (tmp_path / "parallel.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (tmp_path / "parallel.png").stat().st_size > 0
    assert (tmp_path / "grid.png").stat().st_size > 0
