"""``python -m clipdiff.eval.readme``: the README's results block comes from a demo run's files."""

from __future__ import annotations

import csv
from pathlib import Path

from clipdiff.eval.readme import END, SPREAD_END, SPREAD_START, START, main


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


SUMMARY = ["method", "scale", "n", "is_default", "acc_caption", "acc_caption_lo", "acc_caption_hi", "acc_colour",
           "acc_colour_lo", "acc_colour_hi", "acc_type", "acc_type_lo", "acc_type_hi", "refused", "d_caption",
           "d_caption_lo", "d_caption_hi", "c2st_grey", "c2st_grey_lo", "c2st_grey_hi", "c2st_rgb", "c2st_rgb_lo",
           "c2st_rgb_hi", "fd_indep", "precision", "recall", "sec_per_image"]


def fake_run(run: Path) -> None:
    ev = run / "evaluate"
    (ev / "grids").mkdir(parents=True)
    write_csv(ev / "summary.csv", SUMMARY, [
        ["none", "0", "16", "False", "0.125", "0.0", "0.3", "0.25", "0.1", "0.5", "0.5", "0.2", "0.7", "0.0625", "", "",
         "", "0.6", "0.5", "0.7", "0.8", "0.7", "0.9", "12.5", "0.7", "0.6", "0.2"],
        ["noisy_clip", "10", "16", "True", "0.5", "0.3", "0.7", "0.9", "0.8", "1.0", "0.6", "0.4", "0.8", "0.125",
         "0.375", "0.1", "0.6", "0.62", "0.52", "0.72", "0.9", "0.8", "0.95", "14", "0.6", "0.5", "0.21"],
        ["noisy_clip", "100", "16", "False", "0.625", "0.4", "0.8", "0.9375", "0.8", "1.0", "0.6875", "0.5", "0.9",
         "0.5", "0.5", "0.2", "0.7", "0.95", "0.9", "0.99", "0.99", "0.95", "1.0", "80", "0.1", "0.05", "0.21"]])
    write_csv(ev / "real_vs_real.csv", ["n", "c2st_rgb", "c2st_rgb_lo", "c2st_rgb_hi", "c2st_grey", "c2st_grey_lo",
                                        "c2st_grey_hi", "fd_indep", "kid_indep", "precision", "recall"],
              [["64", "0.5", "0.4", "0.6", "0.48", "0.38", "0.58", "3.5", "0.001", "0.8", "0.8"]])
    write_csv(ev / "judge_real.csv", ["caption", "split", "n", "objects", "acc_caption", "acc_caption_lo",
                                      "acc_caption_hi", "acc_colour", "acc_colour_lo", "acc_colour_hi", "acc_type",
                                      "acc_type_lo", "acc_type_hi", "refused"],
              [["a red car", "test", "16", "3", "1", "0.6", "1", "1", "0.6", "1", "1", "0.6", "1", "0"],
               ["all", "test", "32", "5", "0.875", "0.7", "0.95", "1", "0.8", "1", "0.9", "0.75", "0.97", "0.03125"]])
    write_csv(ev / "controls.csv", ["set", "n", "passed", "type_raw", "colour_raw", "caption"],
              [["held-out real", "8", "0.875", "0.9", "1", "0.8"], ["noise whole image", "8", "0", "0.5", "0.2", "0"]])
    for name in ("none_s0", "noisy_clip_s10", "noisy_clip_s100"):
        (ev / "grids" / f"{name}.png").write_bytes(name.encode())
    (ev / "front.png").write_bytes(b"front")
    (run / "pipeline.log").write_text("[x][INFO] - [render] done in 58 s\n[x][INFO] - [label] reused outputs/demo/label\n"
                                      "[x][INFO] - pipeline finished in 1030 s on 2 CPUs\n")


def test_readme_block_comes_from_the_run(tmp_path: Path):
    run = tmp_path / "run"
    fake_run(run)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{START}\nold table\n{END}\nbelow\n")
    assert main([str(run), "--readme", str(readme), "--docs", str(tmp_path / "docs" / "demo")]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n") and text.endswith("below\n")
    # accuracy beside realism, the default marked, the paired difference signed, the floor last
    assert ("| noisy_clip | 10 | **yes** | 50% [30, 70] | +38 [+10, +60] | 90% [80, 100] | 60% [40, 80] | 12% | "
            "0.62 [0.52, 0.72] | 0.90 [0.80, 0.95] | 14 | 0.6 | 0.5 | 0.21 |") in text
    assert "| noisy_clip | 100 |  | 62% [40, 80] | +50 [+20, +70] |" in text
    assert "| real vs real | – | | – | – | – | – | – | 0.48 [0.38, 0.58] | 0.50 [0.40, 0.60] | 3.5 | 0.8 | 0.8 | – |" in text
    assert "17.2 min wall on 2 CPUs (stages: render 58 s, label reused)" in text
    assert "the ceiling): caption 88% [70, 95], colour 100% [80, 100], type 90% [75, 97], refused 3%" in text
    assert "passes 88% of held-out real, 0% of noise whole image" in text
    # the grids of the unguided row and of each method's default (not its most accurate) row, and the front
    docs = tmp_path / "docs" / "demo"
    assert (docs / "noisy_clip.png").read_bytes() == b"noisy_clip_s10" and (docs / "none.png").read_bytes() == b"none_s0"
    assert (docs / "front.png").read_bytes() == b"front" and "default, scale 10" in text


def test_readme_without_a_demo_says_what_to_run(tmp_path: Path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert main([str(tmp_path / "nothing"), "--readme", str(readme), "--docs", str(tmp_path / "docs")]) == 2
    assert "run `make demo` first" in capsys.readouterr().err


def test_docs_folder_outside_the_readme_folder(tmp_path: Path):
    run = tmp_path / "run"
    fake_run(run)
    readme = tmp_path / "project" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"{START}\n{END}\n")
    assert main([str(run), "--readme", str(readme), "--docs", str(tmp_path / "elsewhere")]) == 0
    assert '<img src="../elsewhere/noisy_clip.png"' in readme.read_text()


def test_spread_block_comes_from_the_seed_sweeps_table(tmp_path: Path, capsys):
    run = tmp_path / "run"
    fake_run(run)
    spread = tmp_path / "agg" / "spread.md"
    spread.parent.mkdir()
    spread.write_text("# Sweep outputs/pipeline/multiruns/x: mean ± sample std over seed (min–max in spread.csv)\n\n"
                      "| method | scale | jobs | acc_caption |\n|---|---|---|---|\n| none | 0 | 3 | 0.110 ± 0.020 |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\nmiddle\n{SPREAD_START}\nold spread\n{SPREAD_END}\nend\n")
    assert main([str(run), "--readme", str(readme), "--docs", str(tmp_path / "docs"), "--spread", str(spread)]) == 0
    text = readme.read_text()
    assert "old spread" not in text and "middle\n" in text and text.endswith(f"{SPREAD_END}\nend\n")
    assert "| none | 0 | 3 | 0.110 ± 0.020 |" in text and "mean ± sample std over seed" in text
    # a missing spread file is one line naming it; the README and the docs folder are left as they were
    before = readme.read_text()
    docs = tmp_path / "docs2"
    assert main([str(run), "--readme", str(readme), "--docs", str(docs), "--spread", str(tmp_path / "none.md")]) == 2
    err = capsys.readouterr().err
    assert "none.md does not exist: run `make seeds` first" in err and err.count("\n") == 1
    assert readme.read_text() == before and not docs.exists()


def test_no_tracked_file_holds_merge_conflict_markers():
    """An unresolved merge once reached the README: every tracked text file is free of conflict markers."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = root / name
        if path.suffix in (".png", ".pt", ".ckpt") or not path.is_file():
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "=======":
                found.append(f"{name}:{no}")
    assert not found, f"merge conflict markers in {found}"
