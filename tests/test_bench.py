"""The benchmarks run end to end and write their CSV and plots (tiny models, tiny sizes)."""

import csv


def test_bench_hybrid_writes_table_plot_and_grid(tmp_path, tiny_models_dir):
    from splitdiff.bench.hybrid import bench_hybrid

    d = tiny_models_dir
    rows = bench_hybrid(tmp_path, n_prompts=6, batch_size=3, cloud=str(d / "big"), edge=str(d / "small"),
                        vae=str(d / "vae"), tiny=str(d / "taesd"), grid_prompts=2, steps=3, cloud_steps=(3, 1, 0))
    assert [r["plan"] for r in rows if r["decoder"] == "full"] == ["cloud:3", "cloud:1,edge:2", "edge:3"]
    assert rows[0]["edge_unet_s"] == 0 and rows[-1]["cloud_unet_s"] == 0 and rows[2]["edge_unet_s"] > 0
    assert all(0 <= r["adherence"] <= 1 for r in rows)
    by_count = [rows[0][f"adherence_{n}obj"] for n in (1, 2, 3)]  # 6 prompts: two each with 1, 2, 3 objects
    assert abs(sum(by_count) / 3 - rows[0]["adherence"]) < 1e-9
    with open(tmp_path / "hybrid.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "hybrid.png").stat().st_size > 0 and (tmp_path / "hybrid_grid.png").stat().st_size > 0


def test_bench_family_compares_sizes_speeds_and_decoders(tmp_path, tiny_models_dir):
    from splitdiff.bench.family import bench_family

    d = tiny_models_dir
    rows = bench_family(tmp_path, repeats=1, cloud=str(d / "big"), edge=str(d / "small"), vae=str(d / "vae"),
                        tiny=str(d / "taesd"), ceiling_prompts=4)
    assert len(rows) == 5 and all(r["speedup"] > 0 for r in rows)
    assert rows[0]["param_ratio"] < 1 and isinstance(rows[-1]["psnr_db"], float)
    assert (tmp_path / "family.csv").exists()
    with (tmp_path / "ceiling.csv").open() as f:
        ceiling = {(r["size"], r["images"]): float(r["adherence"]) for r in csv.DictReader(f)}
    assert len(ceiling) == 6 and ceiling[("64", "renders")] > 0.95  # the evaluator reads the world's renders


def test_write_csv_keeps_every_column_and_leaves_no_temporary_file(tmp_path):
    from splitdiff.bench import write_csv

    write_csv(tmp_path / "t.csv", [{"plan": "cloud:25", "s": 1 / 3}, {"plan": "edge:25", "psnr_db": 30.0}])
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["plan", "s", "psnr_db"]
    assert rows[0]["s"] == "0.333333" and rows[1]["psnr_db"] == "30" and rows[1]["s"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_bench_precision_compares_dtypes_with_fp32(tmp_path, tiny_models_dir):
    from splitdiff.bench.precision import bench_precision

    d = tiny_models_dir
    rows = bench_precision(tmp_path, models={"cloud": str(d / "big"), "edge": str(d / "small")}, vae=str(d / "vae"),
                           plan="cloud:2,edge:2", steps=4, prompts=2, size=32)
    assert [r["dtype"] for r in rows] == ["fp32", "bf16", "fp16"]
    assert rows[0]["latent_rel_error_max"] == 0 and rows[0]["psnr_min_db"] == float("inf")
    assert all(0 < r["latent_rel_error_mean"] < 0.05 for r in rows[1:])
    assert (tmp_path / "precision.csv").exists()
