"""The realism feature net: pose targets, pose batches, training, export → load_realism, and the sanity check's logic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, write_srn
from PIL import Image

from clipdiff.data import poses as poses_mod
from clipdiff.data.datamodule import CarsDataModule
from clipdiff.data.poses import azimuth_elevation, camera_directions, read_matrix
from clipdiff.errors import ClipdiffError
from clipdiff.eval import realism as check
from clipdiff.eval.fid import FeatureSpace
from clipdiff.models.components.realism import RealismNet, load_realism
from clipdiff.models.export import save_export

TINY_NET = ["model.net.widths=[8,16]", "model.net.blocks=[1,1]", "model.net.strides=[1,2]",
            "model.net.stem_stride=1"]

# a camera at azimuth 90°, elevation 30°, 1.3 from the origin, looking at it (OpenCV axes, world up +z): position
# 1.3·(cos30·cos90, cos30·sin90, sin30) = (0, 1.125833, 0.65); right (-1, 0, 0), down (0, .5, -.866), forward -position
KNOWN_POSE = """-1 0 0 0
0 0.5 -0.8660254 1.1258330
0 -0.8660254 -0.5 0.65
0 0 0 1
"""


def direction(az_deg: float, el_deg: float) -> np.ndarray:
    az, el = math.radians(az_deg), math.radians(el_deg)
    return np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def write_pose(path: Path, az_deg: float, el_deg: float, radius: float = 1.3) -> None:
    """A camera-to-world matrix whose translation is the camera at (az, el); the rotation is not read."""
    m = np.eye(4)
    m[:3, 3] = radius * direction(az_deg, el_deg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(f"{v:.9f}" for v in m.reshape(-1)) + "\n")


def view_angles(oid: str, v: int) -> tuple[float, float]:
    """A distinct camera for every (object, view): the tests can tell which pose a batch row got."""
    return (37.0 * v + 11.0 * (sum(map(ord, oid)) % 7) + 5.0) % 360 - 180, 5.0 + 7.0 * v


def gradient_image(az_deg: float, el_deg: float, size: int) -> np.ndarray:
    """Grey image whose brightness ramps along the azimuth, more steeply at low elevation: pose readable by a conv net."""
    u = np.linspace(-1, 1, size)
    xx, yy = np.meshgrid(u, u)
    az, el = math.radians(az_deg), math.radians(el_deg)
    grey = 0.5 + 0.45 * math.cos(el) * (math.cos(az) * xx + math.sin(az) * yy)
    return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def posed_set(root: Path, objects: dict[str, dict[str, str]], views: int, images: bool = False) -> Path:
    """``write_srn`` plus a pose file per view (``view_angles``); ``images``: gradient images that show the pose."""
    write_srn(root, objects, views=views)
    for split, table in objects.items():
        for oid in table:
            for v in range(views):
                az, el = view_angles(oid, v)
                write_pose(root / split / oid / "pose" / f"{v:06d}.txt", az, el)
                if images:
                    Image.fromarray(gradient_image(az, el, 16)).save(root / split / oid / "rgb" / f"{v:06d}.png")
    return root


SMALL = {"cars_train": {"a1": "a red car", "a2": "a blue car", "a3": "a white car"},
         "cars_val": {"b1": "a red car", "b2": "a white car"}, "cars_test": {"c1": "a blue car"}}


# -- pose targets --------------------------------------------------------------------------------------------------
def test_pose_target_of_a_known_camera(tmp_path: Path):
    path = tmp_path / "000000.txt"
    path.write_text(KNOWN_POSE)
    d = camera_directions(read_matrix(path)[None])
    torch.testing.assert_close(d, torch.tensor([[0.0, math.sqrt(3) / 2, 0.5]]), atol=1e-6, rtol=0)
    az, el = azimuth_elevation(d)
    assert az.item() == pytest.approx(90.0, abs=1e-4) and el.item() == pytest.approx(30.0, abs=1e-4)
    # behind and to the left, on the horizon: azimuth -135°, elevation 0°; with +y up the roles change
    az, el = azimuth_elevation(torch.tensor([-1.0, -1.0, 0.0]))
    assert (az.item(), el.item()) == pytest.approx((-135.0, 0.0))
    az, el = azimuth_elevation(torch.tensor([1.0, 1.0, 0.0]), up="y")
    assert (az.item(), el.item()) == pytest.approx((90.0, 45.0))  # about +y: atan2(x, z), asin(y / |d|)


@pytest.mark.parametrize("text, words", [
    (None, "pose file missing"), ("1 2 3", "found 3 numbers"), ("a b c", "not a pose file"),
    (" ".join(["nan"] * 16), "NaN"), (" ".join(["0"] * 16), "origin"),
])
def test_a_bad_pose_file_is_one_line_naming_it(tmp_path: Path, text: str | None, words: str):
    path = tmp_path / "obj" / "pose" / "000000.txt"
    path.parent.mkdir(parents=True)
    if text is not None:
        path.write_text(text)
    with pytest.raises(ClipdiffError) as err:
        read_matrix(path)
    assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


# -- the DataModule's pose batches ------------------------------------------------------------------------------------
def expected_pose(ds, obj: int, view: int) -> np.ndarray:
    """The pose the dataset's (object, view) should carry, from the view file's own name."""
    o = ds.index.objects[obj]
    return direction(*view_angles(o.object_id, int(o.views[view].stem)))


@pytest.mark.parametrize("cache", [True, False])
def test_pose_batches_line_up_with_their_views(tmp_path: Path, cache: bool):
    root = posed_set(tmp_path / "posed", SMALL, views=5)
    kw = {"cache": cache, "cache_dir": str(tmp_path / "cache"), "progress": False, "batch_size": 4, "image_size": 16,
          "views_per_object": 3, "eval_views_per_object": 2}
    plain = CarsDataModule(str(root), **kw)
    plain.setup("fit")
    assert set(next(iter(plain.train_dataloader()))) == {"image", "caption", "object", "view"}  # not asked: as before

    dm = CarsDataModule(str(root), **kw)
    dm.setup("fit")
    dm.request_poses()  # what model=realism does in its setup, after the datasets exist
    for stage, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        ds = dm._dataset(stage)
        seen = 0
        for batch in loader:
            assert batch["pose"].dtype == torch.float32 and batch["pose"].shape == (len(batch["view"]), 3)
            for o, v, p in zip(batch["object"].tolist(), batch["view"].tolist(), batch["pose"]):
                np.testing.assert_allclose(p.numpy(), expected_pose(ds, o, v), atol=1e-6)
                seen += 1
        assert seen == len(ds) - (len(ds) % 4 if stage == "train" else 0)
    item = dm._dataset("val")[1]
    np.testing.assert_allclose(item["pose"].numpy(), expected_pose(dm._dataset("val"), item["object"], item["view"]),
                               atol=1e-6)

    asked = CarsDataModule(str(root), poses=True, **kw)  # data.poses=true: every split carries poses from the start
    assert "pose" in next(iter(asked._eval_loader("val")))


def test_poses_are_read_once_and_cached_beside_the_images(tmp_path: Path, monkeypatch):
    root = posed_set(tmp_path / "posed", SMALL, views=3)
    kw = {"cache_dir": str(tmp_path / "cache"), "progress": False, "batch_size": 4, "image_size": 16, "poses": True}
    dm = CarsDataModule(str(root), **kw)
    dm.setup("fit")
    assert len(list((tmp_path / "cache").glob("cars_train-poses-*.npy"))) == 1

    def no_reading(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(poses_mod, "read_matrix", no_reading)
    for _ in range(2):  # epochs read nothing
        list(dm.train_dataloader())
    again = CarsDataModule(str(root), **kw)  # a new run on the same data: the cache answers
    again.setup("fit")
    monkeypatch.undo()
    # a changed pose file is noticed (the cache is keyed by the files' sizes and times)
    changed = root / "cars_val" / "b1" / "pose" / "000000.txt"
    write_pose(changed, 12.0, 34.0, radius=2.0)
    fresh = CarsDataModule(str(root), **kw)
    ds = fresh._dataset("val")
    row = int(np.flatnonzero((ds.index.object_index == 0) & (ds.index.view_index == 0))[0])
    np.testing.assert_allclose(ds.poses[row], direction(12.0, 34.0), atol=1e-6)


def test_a_missing_pose_file_stops_with_its_name(tmp_path: Path):
    root = posed_set(tmp_path / "posed", SMALL, views=3)
    gone = root / "cars_train" / "a2" / "pose" / "000001.txt"
    gone.unlink()
    for cache in (True, False):
        dm = CarsDataModule(str(root), cache=cache, cache_dir=str(tmp_path / "cache"), progress=False, image_size=16)
        dm.setup("fit")  # without poses nothing reads them
        with pytest.raises(ClipdiffError) as err:
            dm.request_poses()
        assert str(gone) in str(err.value) and "\n" not in str(err.value)


# -- the net, its export and training --------------------------------------------------------------------------------
def test_the_net_is_colour_blind_and_takes_any_size():
    net = RealismNet(image_size=16, widths=[8, 16], blocks=[1, 1], strides=[1, 2], feature_stages=[0, 1]).eval()
    assert net.num_features == 24
    x = torch.rand(4, 3, 16, 16)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand(-1, 3, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), net.features(grey), atol=1e-5, rtol=1e-4)
        assert net.features(torch.rand(2, 3, 40, 40)).shape == (2, 24)
        assert net((x * 255).byte()).shape == (4, 3)
    with pytest.raises(ClipdiffError, match="RGB images"):
        net.features(torch.rand(2, 1, 16, 16))


def test_load_realism_refuses_other_exports_with_one_line(tmp_path: Path):
    judge = save_export(tmp_path / "judge.pt", "judge", config={}, state_dict={}, vocabulary=["a red car"], image_size=16)
    for path, words in ((judge, "holds a judge model"), (tmp_path / "none.pt", "does not exist")):
        with pytest.raises(ClipdiffError) as err:
            load_realism(path, key="realism_ckpt")
        assert "realism_ckpt=" in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def run_train(root: Path, run_dir: Path, overrides: list[str]):
    from clipdiff.train import train

    cfg = compose_config("train", [
        "model=realism", "logger=csv", f"data.root={root}", "data.image_size=16", "data.batch_size=8",
        f"data.cache_dir={run_dir / 'cache'}", "data.progress=false", f"paths.run_dir={run_dir}",
        "trainer.enable_progress_bar=false", *TINY_NET, *overrides,
    ])
    return train(cfg)


def test_a_short_run_learns_pose_and_exports_the_net(tmp_path: Path):
    objects = {"cars_train": {f"t{i}": "a white car" for i in range(6)},
               "cars_val": {"v0": "a white car", "v1": "a red car"}, "cars_test": {"x0": "a red car"}}
    root = posed_set(tmp_path / "grad", objects, views=8, images=True)
    metrics, objects_ = run_train(root, tmp_path / "run", [
        "trainer.max_steps=48", "trainer.check_val_every_n_epoch=8", "model.optimizer.lr=1e-2",
        "data.eval_views_per_object=null"])
    assert {"train/loss", "val/loss", "val/angle_deg", "val/azimuth_deg", "val/elevation_deg",
            "val/angle_deg_constant"} <= set(metrics)
    assert metrics["val/angle_deg"] < 0.4 * metrics["val/angle_deg_constant"], metrics  # beats the best constant guess
    net = load_realism(tmp_path / "run")
    assert not net.training and net.image_size == 16 and net.num_features == 16
    x = torch.rand(3, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(net(x), objects_["model"].eval()(x))


# -- the sanity check --------------------------------------------------------------------------------------------------
def pixel_space() -> FeatureSpace:
    """Grey pixels pooled to 4×4: a feature space in which added noise must raise FD."""
    def encode(x):
        grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        return torch.nn.functional.adaptive_avg_pool2d(grey[:, None], 4).flatten(1)

    return FeatureSpace(encode, num_features=16, name="pixels")


def test_sanity_check_rows_and_verdict_with_a_known_space():
    from test_distortions import cars

    reference, other = cars(40, 16, seed=1), cars(40, 16, seed=2)
    rows = check.sanity_check(pixel_space(), reference, other, kinds=("noise", "hue_shift"),
                              strengths=(1.0, 0.0, 0.5), kid_subsets=3)
    assert [(r["distortion"], r["strength"]) for r in rows] == [
        ("noise", 0.0), ("noise", 0.5), ("noise", 1.0), ("hue_shift", 0.0), ("hue_shift", 0.5), ("hue_shift", 1.0)]
    assert rows[0]["fd"] == rows[3]["fd"]  # one real-against-real floor
    noise = [r["fd"] for r in rows[:3]]
    assert noise[0] < noise[1] < noise[2]
    assert check.check_failures(rows, monotone=("noise",)) == []
    assert any("fewer than two" in f for f in check.check_failures(rows))  # the other distortions were not measured


def test_check_failures_names_what_goes_wrong():
    def rows(curves):
        return [{"distortion": k, "strength": s, "fd": fd} for k, c in curves.items() for s, fd in zip((0, .5, 1), c)]

    good = {k: (0.1, 1.0 + i, 2.0 + i) for i, k in enumerate(check.MONOTONE)} | {"hue_shift": (0.1, 0.2, 0.3)}
    assert check.check_failures(rows(good)) == []
    flat = good | {"blobs": (0.1, 2.0, 1.5)}
    assert check.check_failures(rows(flat)) == ["blobs: FD does not rise at strength 0.5→1"]
    loud_hue = good | {"hue_shift": (0.1, 0.5, 2.5)}
    (failure,) = check.check_failures(rows(loud_hue))
    assert failure.startswith("hue_shift at strength 1") and "noise" in failure and "blur" not in failure


def test_the_command_writes_a_new_folder_and_never_overwrites(tmp_path: Path, capsys):
    root = write_srn(tmp_path / "flat", {"cars_val": {f"v{i}": "a red car" for i in range(4)},
                                        "cars_test": {f"t{i}": "a blue car" for i in range(4)}}, views=3)
    net = RealismNet(image_size=16, widths=[8, 16], blocks=[1, 1], strides=[1, 2])
    export = save_export(tmp_path / "realism.pt", "realism", config=net.config, state_dict=net.state_dict(),
                         image_size=16)
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(5):
        Image.fromarray((np.random.default_rng(i).random((16, 16, 3)) * 255).astype(np.uint8)).save(samples / f"{i}.png")
    out = tmp_path / "out"
    argv = ["--realism-ckpt", str(export), "--data-root", str(root), "--out", str(out), "--strengths", "0", "1",
            "--kid-subsets", "2", "--samples", f"noise={samples}"]
    result = check.run(argv)
    assert {p.name for p in out.iterdir()} == {"realism_check.csv", "realism_check.md", "realism_check.png",
                                               "realism_samples.csv"}
    assert len(result["rows"]) == 2 * 6 and [r["images"] for r in result["samples"]] == ["real (other split, n=5)", "noise"]
    text = (out / "realism_check.md").read_text()
    assert "| hue_shift |" in text and "| noise | 5 |" in text and "Check:" in text
    assert check.main(argv) == 2  # the folder holds results now: refused, one line
    assert "already exists" in capsys.readouterr().err
    assert check.main([*argv[:5], str(tmp_path / "out2"), *argv[6:-2], "--samples", "nameless"]) == 2
