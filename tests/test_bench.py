"""``make bench``: every claim's code path runs at tiny sizes and writes well-formed rows.

Speed itself is never asserted here: the targets live in the benchmark's table (goal / holds), not in tests."""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path

import pytest

from clipdiff import bench
from clipdiff.bench.common import Claim
from clipdiff.bench.report import END, START, update_readme

ROOT = Path(__file__).resolve().parents[1]


def well_formed(claims: list[Claim], prefix: str) -> dict[str, dict[str, str]]:
    rows = {c.name: c.row() for c in claims}
    assert rows and all(n.startswith(prefix) for n in rows)
    for r in rows.values():
        assert list(r) == bench.COLUMNS and r["unit"]
        assert (r["goal"] == "") == (r["holds"] == "") or r["value"] == "not measured"
        if r["value"] != "not measured":
            assert not math.isnan(float(r["value"]))
        if r["goal"]:
            assert r["goal"][:2] in (">=", "<=") and r["holds"] in ("true", "false", "")
    return rows


def test_claim_rows():
    assert Claim("a", 25.0, 20, "x").row() == {"name": "a", "value": "25", "goal": ">=20", "unit": "x", "holds": "true"}
    assert Claim("b", 1.4, 1.3, "x", higher_is_better=False).row()["holds"] == "false"
    assert Claim("c", 3.0, None, "s").row()["goal"] == "" and Claim("c", 3.0, None, "s").row()["holds"] == ""
    assert Claim("d", None, 0, "not measured: why").row() == {"name": "d", "value": "not measured", "goal": ">=0",
                                                              "unit": "not measured: why", "holds": ""}


def test_main_writes_table_and_readme(tmp_path: Path):
    out = tmp_path / "bench"
    assert bench.main(["--only", "data", "--quick", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    rows = list(csv.DictReader((out / "latest.csv").open()))
    assert list(rows[0]) == bench.COLUMNS
    names = {r["name"]: r for r in rows}
    assert names["data/cache_vs_png@16px"]["goal"] == ">=20" and names["data/cache_vs_png@16px"]["holds"] in ("true", "false")
    assert names["data/png_images_per_s@16px"]["holds"] == "" and names["bench/torch_threads"]["value"] == "1"
    assert float(names["data/cache_vs_png_cpu_float@16px"]["value"]) > 0  # the CPU-float ratio sits beside the claim
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nabove\n{START}\nOLD BLOCK\n{END}\nbelow\n")
    update_readme(out, readme)
    text = readme.read_text()
    assert text.startswith("# x\nabove\n") and text.endswith(f"{END}\nbelow\n") and "OLD BLOCK" not in text
    assert "python -m clipdiff.bench --only data --quick" in text and "| data/cache_vs_png@16px |" in text


def test_overhead_rows():
    from clipdiff.bench.overhead import bench_overhead

    rows = well_formed(bench_overhead({"clip": 4, "ddpm": 4}, steps=1, warmup=1, image_size=16), "overhead/")
    assert rows["overhead/ddpm_lightning_vs_bare"]["goal"] == "<=0.05"
    assert {"overhead/clip_lightning_vs_bare", "overhead/clip_bare_s_per_step@b4"} <= set(rows)


def demo_run(tmp_path: Path) -> Path:
    run = tmp_path / "demo"
    (run / "evaluate").mkdir(parents=True)
    lines = ["method,scale,acc_caption,sec_per_image", "none,0,0.1,0.10", "clip,10,0.3,0.2", "noisy_clip,10,0.5,0.12"]
    (run / "evaluate" / "summary.csv").write_text("\n".join(lines) + "\n")
    return run


def test_sampling_rows(tmp_path: Path):
    from clipdiff.bench.sampling import bench_sampling, demo_accuracy

    rows = well_formed(bench_sampling(batch=2, reps=1, recipe_steps=1, image_size=16, steps=2, clean="clip",
                                      demo=tmp_path / "no_demo"), "guided/")
    assert "EXTRAPOLATED" in rows["guided/original_s_per_image@b2"]["unit"]
    assert rows["guided/original_vs_default_time"]["goal"] == ">=200"
    assert rows["guided/noisy_vs_unguided_time"]["goal"] == "<=1.3"
    assert rows["guided/acc_caption_default"]["value"] == "not measured"
    acc = well_formed(demo_accuracy(demo_run(tmp_path), 10, 10), "guided/")
    assert acc["guided/acc_caption_default"]["value"] == "0.5" and acc["guided/acc_caption_clean_clip"]["value"] == "0.3"
    assert acc["guided/acc_default_minus_clean_clip"]["holds"] == "true"
    assert float(acc["guided/demo_noisy_vs_unguided_time"]["value"]) == pytest.approx(1.2)


@pytest.mark.slow  # ~6 s: a size is measured in a fresh interpreter (resident memory before the DataModule)
def test_growth_rows(tmp_path: Path):
    """Every growth row from one size (one fresh interpreter, not two): the ratios of a size to itself are 1 and 0,
    and the rows' form does not depend on how many sizes there are."""
    from clipdiff.bench.growth import bench_growth

    rows = well_formed(bench_growth(tmp_path, (4,), views=2, image_size=16, repeats=1), "growth/")
    # exactly these rows: a size measured beyond the one asked for (another interpreter, another render) would add
    # its own @<n>obj rows and the cost this test was shrunk to avoid
    assert set(rows) == {"growth/index_cost_per_object_ratio", "growth/cache_cost_per_object_ratio",
                         "growth/iter_anon_vs_data_growth", "growth/iter_anon_mib@4obj",
                         "growth/index_ms_per_object@4obj", "growth/cache_ms_per_object@4obj"}


def test_gpu_dry_run_on_cpu():
    from clipdiff.bench.gpu import bench_gpu

    rows = well_formed(bench_gpu("cpu", "ddpm", 16, batch=2, steps=1, warmup=1, sample_batch=2, sample_steps=2), "gpu/")
    assert {"gpu/ddpm_train_images_per_s_fp32", "gpu/ddpm_train_images_per_s_bf16",
            "gpu/ddpm_train_images_per_s_bf16_channels_last", "gpu/bf16_vs_fp32",
            "gpu/guided_sample_images_per_s"} <= set(rows)
    for script in ("gpu.sh", "gpu_preset.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=False).returncode == 0
