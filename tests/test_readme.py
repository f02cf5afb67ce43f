"""``python -m clipdiff.eval.readme``: the README's results block comes from a demo run's files."""

from __future__ import annotations

import csv
from pathlib import Path

from clipdiff.eval.readme import END, START, main

COLUMNS = ["method", "scale", "n", "acc_caption", "acc_caption_lo", "acc_caption_hi", "acc_colour", "acc_colour_lo",
           "acc_colour_hi", "acc_type", "acc_type_lo", "acc_type_hi", "fd_mean", "kid_mean", "guide_acc",
           "sec_per_image"]


def fake_run(run: Path) -> None:
    (run / "evaluate" / "grids").mkdir(parents=True)
    rows = [["none", "0", "16", "0.125", "0.0", "0.3", "0.25", "0.1", "0.5", "0.5", "0.2", "0.7", "0.6", "0.05", "",
             "0.2"],
            ["noisy_clip", "100", "16", "0.625", "0.4", "0.8", "0.9375", "0.8", "1.0", "0.6875", "0.5", "0.9", "0.02",
             "0.001", "0.99", "0.21"]]
    with (run / "evaluate" / "summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    with (run / "evaluate" / "judge_real.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["caption", "split", "n", "objects", "acc_caption", "acc_caption_lo", "acc_caption_hi",
                                  "acc_colour", "acc_colour_lo", "acc_colour_hi", "acc_type", "acc_type_lo", "acc_type_hi"],
                                 ["a red car", "test", "16", "3", "1", "1", "1", "1", "1", "1", "1", "1", "1"],
                                 ["a red jeep/bus", "test", "0", "0", "", "", "", "", "", "", "", "", ""],
                                 ["all", "test", "32", "5", "0.875", "0.75", "1", "1", "1", "1", "0.9", "0.8", "1"]])
    for name in ("none_s0", "noisy_clip_s100"):
        (run / "evaluate" / "grids" / f"{name}.png").write_bytes(b"png")
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
    assert "| noisy_clip | 100 | 16 | 62% [40%, 80%] | 94% [80%, 100%] |" in text
    assert "17.2 min wall on 2 CPUs (stages: render 58 s, label reused)" in text
    assert "| real `test` images\\* | – | 32 | 88% [75%, 100%] | 100% [100%, 100%] | 90% [80%, 100%] |" in text
    assert "held-out real renders" in text and "with `test` images; none of: a red jeep/bus." in text
    assert (tmp_path / "docs" / "demo" / "noisy_clip.png").read_bytes() == b"png"


def test_readme_without_a_demo_says_what_to_run(tmp_path: Path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert main([str(tmp_path / "nothing"), "--readme", str(readme)]) == 2
    assert "run `make demo` first" in capsys.readouterr().err


def test_docs_folder_outside_the_readme_folder(tmp_path: Path):
    run = tmp_path / "run"
    fake_run(run)
    readme = tmp_path / "project" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"{START}\n{END}\n")
    assert main([str(run), "--readme", str(readme), "--docs", str(tmp_path / "elsewhere")]) == 0
    assert '<img src="../elsewhere/noisy_clip.png"' in readme.read_text()
