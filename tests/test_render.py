"""The procedural car renderer: SRN layout and formats, determinism, splits, refusal/reuse/resume, and that the
pixels carry the classes (body-type silhouettes, paint colours)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdiff.data.procedural import (
    CAMERA_RADIUS,
    build_car,
    caption_distribution,
    intrinsics,
    look_at_pose,
    read_ground_truth,
    render_dataset,
    render_mesh,
    sample_specs,
    split_counts,
)
from clipdiff.data.procedural.generate import MARKER, PARTIAL_MARKER, TIMING
from clipdiff.data.procedural.raster import project, rasterise
from clipdiff.data.srn import read_intrinsics, read_pose, scan_split
from clipdiff.data.vocab import BODY_TYPES, caption_prior, parse_caption
from clipdiff.errors import ClipdiffError

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("cars_train", "cars_val", "cars_test")


def _render(out: Path, **kw):
    args = {
        "num_objects": 6,
        "views_per_object": 2,
        "image_size": 32,
        "seed": 0,
        "num_workers": 0,
        "progress": False,
    }
    args.update(kw)
    return render_dataset(out, **args)


def _files(root: Path) -> dict[str, bytes]:
    """Every file's bytes but the render's timing record (how long it took: it differs between equal renders)."""
    assert (root / TIMING).is_file()
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != TIMING}


def _side_mask(
    body_type: str, colours, seed: int, size: int = 64, azimuth: float = 90.0, elevation: float = 4.0
):
    mesh = build_car(body_type, colours, np.random.default_rng([seed, 99])).pack()
    return render_mesh(mesh, look_at_pose(azimuth, elevation), size, supersample=2, shadow=False)


# ------------------------------------------------------------------------------------------------- layout


def test_layout_and_file_formats(tmp_path):
    out = tmp_path / "cars"
    result = _render(
        out, num_objects=10, views_per_object=3, splits={"cars_train": 0.6, "cars_val": 0.2, "cars_test": 0.2}
    )
    assert not result.reused and result.num_images == 30
    rows = read_ground_truth(out / "ground_truth.tsv")
    assert (out / "ground_truth.tsv").read_text().splitlines()[0].split("\t") == [
        "object_id",
        "split",
        "caption",
        "colours",
        "body_type",
    ]
    assert len(rows) == 10 and len({r["object_id"] for r in rows}) == 10
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{32}", r["object_id"])
        cap = parse_caption(r["caption"])
        assert r["caption"] in caption_prior()
        assert cap.colours == tuple(r["colours"].split(",")) and cap.body_type == r["body_type"]
        assert (out / r["split"] / r["object_id"]).is_dir()
    for split in SPLITS:
        objects = scan_split(out, split)  # the project's SRN reader accepts it
        assert sorted(o.object_id for o in objects) == sorted(
            r["object_id"] for r in rows if r["split"] == split
        )
        for obj in objects:
            assert [p.name for p in obj.views] == ["000000.png", "000001.png", "000002.png"]
            intr = read_intrinsics(obj.path / "intrinsics.txt")
            f, cx, cy = intrinsics(32)
            assert intr == {"focal": pytest.approx(f), "cx": cx, "cy": cy, "height": 32, "width": 32}
            assert f == pytest.approx(131.25 / 4)
            for view in obj.views:
                with Image.open(view) as im:
                    assert im.mode == "RGB" and im.size == (32, 32) and im.format == "PNG"
                    arr = np.asarray(im)
                assert (arr[0, 0] == 255).all() and (arr[-1, -1] == 255).all()  # white away from the car
                assert (arr < 200).any()  # something is drawn
                pose_txt = (obj.path / "pose" / view.with_suffix(".txt").name).read_text()
                assert len(pose_txt.strip().split("\n")) == 1 and len(pose_txt.split()) == 16
                pose = read_pose(obj.path / "pose" / view.with_suffix(".txt").name)
                rot, centre = pose[:3, :3], pose[:3, 3]
                np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-6)
                assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-6)
                np.testing.assert_allclose(pose[3], [0, 0, 0, 1])
                assert np.linalg.norm(centre) == pytest.approx(CAMERA_RADIUS, abs=1e-6)
                # OpenCV: +z looks at the origin, +y (down) points down in the world (+z up)
                np.testing.assert_allclose(rot[:, 2], -centre / np.linalg.norm(centre), atol=1e-6)
                assert rot[2, 1] < 0 and np.sin(np.radians(5)) - 1e-6 <= centre[2] / CAMERA_RADIUS
                assert centre[2] / CAMERA_RADIUS <= np.sin(np.radians(60)) + 1e-6
    marker = json.loads((out / MARKER).read_text())
    assert marker["config"] == result.config
    assert marker["config"]["num_objects"] == 10 and marker["config"]["views_per_object"] == 3
    assert not (out / PARTIAL_MARKER).exists()


def test_projection_of_the_origin_is_the_image_centre():
    pose = look_at_pose(37.0, 21.0)
    f, cx, cy = intrinsics(128)
    uvz = project(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.3]]), pose, f, cx, cy)
    assert uvz[0, :2] == pytest.approx([64.0, 64.0])
    assert uvz[0, 2] == pytest.approx(CAMERA_RADIUS)
    assert uvz[1, 1] < 64.0  # a point above the origin is drawn higher up (image y points down)


def test_rasteriser_matches_brute_force_reference():
    mesh = build_car("truck", ["red"], np.random.default_rng(3)).pack()
    size = 48
    f, cx, cy = intrinsics(size)
    for az, el in ((20.0, 10.0), (150.0, 35.0), (260.0, 58.0)):
        pose = look_at_pose(az, el)
        fid = rasterise(mesh, pose, size, size, f, cx, cy)
        eye, rot = pose[:3, 3], pose[:3, :3]
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        rays = np.stack([(xs - cx) / f, (ys - cy) / f, np.ones_like(xs)], -1)
        uv = project(mesh.vertices, pose, f, cx, cy)[:, :2]
        n_faces = len(mesh.normals)
        invz = np.zeros((n_faces, size, size))
        zbuf, ref = np.zeros((size, size)), np.full((size, size), -1)
        for i in range(n_faces):
            p0 = mesh.vertices[mesh.starts[i]]
            n_cam = rot.T @ mesh.normals[i]
            invz[i] = (rays @ n_cam) / (n_cam @ (rot.T @ (p0 - eye)))  # 1/depth of the face's plane
            if mesh.normals[i] @ (eye - p0) <= 1e-9:
                continue
            pts = uv[mesh.starts[i] : mesh.starts[i + 1]]
            nxt = np.roll(pts, -1, 0)
            area = np.sum(pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1])
            e = np.sign(area) * (
                (nxt[:, 0] - pts[:, 0])[:, None, None] * (ys - pts[:, 1, None, None])
                - (nxt[:, 1] - pts[:, 1])[:, None, None] * (xs - pts[:, 0, None, None])
            )
            upd = (e >= -1e-9).all(0) & (invz[i] > zbuf)
            zbuf[upd], ref[upd] = invz[i][upd], i
        assert (ref >= 0).sum() > 200
        assert ((fid >= 0) != (ref >= 0)).sum() <= 2  # same coverage (up to samples exactly on an edge)
        both = (fid >= 0) & (ref >= 0)
        rows, cols = np.nonzero(both)
        # where the face differs, it is a tie: the face drawn is as near as the reference's
        np.testing.assert_allclose(invz[fid[both], rows, cols], zbuf[both], rtol=1e-5)
        assert (fid != ref).mean() < 0.01


# ------------------------------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_and_independent_of_workers(tmp_path):
    a = _render(tmp_path / "a", num_workers=0)
    b = _render(tmp_path / "b", num_workers=2)
    c = _render(tmp_path / "c", seed=1)
    fa, fb, fc = _files(a.out_dir), _files(b.out_dir), _files(c.out_dir)
    assert sum(k.endswith(".png") for k in fa) == 12
    assert fa == fb
    assert not set(fa) & {k for k in fc if "/rgb/" in k}  # other seed: other object ids
    png_a = [v for k, v in sorted(fa.items()) if k.endswith(".png")]
    png_c = [v for k, v in sorted(fc.items()) if k.endswith(".png")]
    assert png_a != png_c


def test_first_objects_do_not_depend_on_how_many_are_rendered():
    small, large = sample_specs(5, seed=3), sample_specs(50, seed=3)
    assert [(s.object_id, s.caption) for s in small] == [(s.object_id, s.caption) for s in large[:5]]


# ------------------------------------------------------------------------------------------------- splits/captions


def test_split_fractions_are_respected():
    assert split_counts(10, {"cars_train": 0.8, "cars_val": 0.1, "cars_test": 0.1}) == {
        "cars_train": 8,
        "cars_val": 1,
        "cars_test": 1,
    }
    assert sum(split_counts(7, {"a": 0.5, "b": 0.3, "c": 0.2}).values()) == 7
    specs = sample_specs(200, seed=5, splits={"a": 0.5, "b": 0.3, "c": 0.2})
    assert Counter(s.split for s in specs) == {"a": 100, "b": 60, "c": 40}
    specs = sample_specs(600, seed=0)
    assert Counter(s.split for s in specs) == {"cars_train": 480, "cars_val": 60, "cars_test": 60}
    with pytest.raises(ClipdiffError, match="sum to"):
        sample_specs(10, splits={"cars_train": 0.8, "cars_val": 0.1})
    with pytest.raises(ClipdiffError, match=">= 0"):
        sample_specs(10, splits={"cars_train": 1.2, "cars_val": -0.2})


def test_caption_temperature():
    prior = caption_prior()
    p1 = caption_distribution(1.0)
    assert p1["a white car"] == pytest.approx(prior["a white car"] / sum(prior.values()))
    flat = caption_distribution(1e6)
    assert max(flat.values()) / min(flat.values()) < 1.01 and len(flat) == 43
    p3 = caption_distribution(3.0)
    assert p3["a white car"] < p1["a white car"] and p3["a black open car"] > p1["a black open car"]
    with pytest.raises(ClipdiffError, match="caption_temperature"):
        caption_distribution(0.0)
    share = Counter(s.caption for s in sample_specs(1000, seed=2))["a white car"] / 1000
    assert 0.45 < share < 0.6
    many = Counter(s.caption for s in sample_specs(1000, seed=2, caption_temperature=100.0))
    assert len(many) > 35 and many["a white car"] < 60


# ------------------------------------------------------------------------------------------------- out_dir states


def test_reuses_same_config_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cars"
    _render(out, num_objects=3)
    before = _files(out)
    again = _render(out, num_objects=3, num_workers=2)  # workers are not part of the config
    assert again.reused and again.num_images == 0
    with pytest.raises(ClipdiffError, match="refusing") as err:
        _render(out, num_objects=4)
    assert "num_objects" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ClipdiffError, match="refusing"):
        _render(out, num_objects=3, caption_temperature=2.0)
    assert _files(out) == before
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ClipdiffError, match="not a procedural render"):
        _render(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_resumes_an_unfinished_render_of_the_same_config(tmp_path):
    out = tmp_path / "cars"
    _render(out, num_objects=4)
    complete = _files(out)
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).unlink()  # as if interrupted: no completion marker, one object unfinished
    (out / PARTIAL_MARKER).write_text(json.dumps({"config": marker["config"]}))
    row = read_ground_truth(out / "ground_truth.tsv")[0]
    obj = out / row["split"] / row["object_id"]
    (obj / "intrinsics.txt").unlink()
    (obj / "rgb" / "000001.png").unlink()
    with pytest.raises(ClipdiffError, match="unfinished render with another config"):
        _render(out, num_objects=4, seed=9)
    resumed = _render(out, num_objects=4)
    assert not resumed.reused and resumed.num_images == 2  # only the unfinished object was rendered
    assert _files(out) == complete


# ------------------------------------------------------------------------------------------------- pixels


def _hw_ratio(alpha: np.ndarray) -> float:
    rows, cols = np.flatnonzero(alpha.max(1) > 0.5), np.flatnonzero(alpha.max(0) > 0.5)
    return (rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1)


def test_body_types_have_distinct_side_silhouettes():
    ratio = {bt: [_hw_ratio(_side_mask(bt, ["white"], s)[1]) for s in range(4)] for bt in BODY_TYPES}
    mean = {bt: float(np.mean(v)) for bt, v in ratio.items()}
    assert min(ratio["jeep/bus"]) > max(ratio["sports car"])  # tall boxy vs low and wide
    assert min(ratio["van"]) > max(ratio["car"])
    assert mean["jeep/bus"] > mean["car"] > mean["sports car"]
    assert mean["open car"] < mean["car"]  # no roof
    # the truck's cab sits at the front: in a side view its upper half is far from symmetric front/back
    alpha = _side_mask("truck", ["white"], 0)[1]
    cols = np.flatnonzero(alpha.max(0) > 0.5)
    top = alpha[: alpha.shape[0] // 2, cols[0] : cols[-1] + 1] > 0.5
    left, right = top[:, : top.shape[1] // 2].sum(), top[:, top.shape[1] // 2 :].sum()
    assert max(left, right) > 1.3 * min(left, right)


def test_one_body_type_is_not_one_picture():
    masks = [_side_mask("car", ["red"], s, azimuth=60.0, elevation=25.0)[1] > 0.5 for s in range(5)]
    xor = [(a != b).mean() for i, a in enumerate(masks) for b in masks[i + 1 :]]
    assert min(xor) > 0.002 and np.mean(xor) > 0.02  # proportions vary: same view, different silhouettes
    colours = [_side_mask("car", ["red"], s)[0][32, 16:48].astype(int) for s in range(3)]
    assert len({tuple(c.ravel()) for c in colours}) == 3  # paint jitter


@pytest.mark.parametrize("colour", ["white", "gray", "black", "red", "blue", "green", "yellow"])
def test_paint_colour_is_what_the_caption_says(colour):
    pixels = []
    for seed, (az, el) in enumerate(((30.0, 15.0), (120.0, 40.0), (230.0, 25.0))):
        rgb, alpha = _side_mask("car", [colour], seed, azimuth=az, elevation=el)
        pixels.append(rgb[alpha > 0.99].astype(float))
    px = np.concatenate(pixels)
    r, g, b = np.median(px, axis=0)
    lum = px.mean(1)
    if colour == "red":
        assert r > g + 80 and r > b + 80
    elif colour == "blue":
        assert b > r + 50 and b > g + 30
    elif colour == "green":
        assert g > r + 40 and g > b + 40
    elif colour == "yellow":
        assert r > b + 100 and g > b + 100 and abs(r - g) < 60
    else:
        assert max(r, g, b) - min(r, g, b) < 20  # unsaturated
        level = np.median(lum)
        assert {"white": 170 < level, "gray": 70 < level < 160, "black": level < 45}[colour]


@pytest.mark.parametrize("body", BODY_TYPES)
def test_two_tone_shows_both_colours(body):
    for az, el in ((60.0, 20.0), (150.0, 50.0), (250.0, 35.0)):
        rgb, alpha = _side_mask(body, ["white", "red"], 1, azimuth=az, elevation=el)
        px = rgb[alpha > 0.99].astype(int)
        red = ((px[:, 0] > px[:, 1] + 60) & (px[:, 0] > px[:, 2] + 60)).mean()
        white = ((px.min(1) > 140) & (px.max(1) - px.min(1) < 25)).mean()
        assert red > 0.05 and white > 0.15, (az, el, red, white)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_renders_and_refuses_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "clipdiff.render",
        f"out_dir={out}",
        "num_objects=3",
        "views_per_object=2",
        "image_size=32",
        "num_workers=0",
        "progress=false",
    ]
    done = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(list(out.glob("cars_*/*/rgb/*.png"))) == 6 and (out / MARKER).is_file()
    refused = subprocess.run(
        cmd[:4] + ["num_objects=4"] + cmd[5:],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clipdiff: error:") and "refusing" in lines[0]
    assert len(list(out.glob("cars_*/*/rgb/*.png"))) == 6
