"""The data layer: SRN reading, caption join, vocabulary, packed cache, samplers, bad input."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdiff.data.cache import PackedImages
from clipdiff.data.captions import load_split_labels, read_caption_file
from clipdiff.data.datamodule import CarsDataModule
from clipdiff.data.sampler import DistinctCaptionBatchSampler
from clipdiff.data.srn import load_image, scan_split, select_views
from clipdiff.data.vocab import Vocabulary, caption_prior, parse_caption
from clipdiff.errors import ClipdiffError


def make_dm(root: Path, tmp_path: Path, **kw) -> CarsDataModule:
    kw.setdefault("image_size", 8)
    kw.setdefault("batch_size", 2)
    dm = CarsDataModule(str(root), cache_dir=str(tmp_path / "cache"), progress=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_parse_caption_grammar():
    c = parse_caption("a white and red jeep/bus")
    assert c.colours == ("white", "red") and c.body_type == "jeep/bus" and c.colour == "white and red"
    assert parse_caption("a black open car").body_type == "open car"
    for bad in ("red car", "a purple car", "a red boat", "a red and blue and green car"):
        with pytest.raises(ClipdiffError):
            parse_caption(bad)


def test_embedded_prior_is_the_original_vocabulary():
    prior = caption_prior()
    assert len(prior) == 43 and sum(prior.values()) == 2151
    assert max(prior, key=prior.get) == "a white car"
    for cap in prior:
        parse_caption(cap)


def test_vocabulary_ids_ignore_order():
    a = Vocabulary(["a red car", "a white car", "a blue van"])
    b = Vocabulary(["a blue van", "a white car", "a red car", "a red car"])
    assert a == b and a.index("a red car") == b.index("a red car")
    assert a.colour_names()[a.colour_ids()[a.index("a blue van")]] == "blue"
    with pytest.raises(ClipdiffError, match="not in the vocabulary"):
        a.index("a green car")


def test_layout_and_caption_join(flat_root: Path, tmp_path: Path):
    dm = make_dm(flat_root, tmp_path)
    idx = dm.index()
    assert [o.object_id for o in idx["train"].objects] == ["a1", "a2", "a3", "a4", "a5", "a6"]
    assert len(idx["train"].paths) == 18 and idx["val"].captions == ["a red car", "a white car"]
    assert dm.vocab.captions == sorted({"a red car", "a blue car", "a white car", "a green jeep/bus"})
    ds = dm.datasets["train"]
    item = ds[4]  # object a2, view 1
    assert item["object"] == 1 and item["view"] == 1 and dm.vocab.captions[item["caption"]] == "a blue car"
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.uint8
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption", "object", "view"} and batch["image"].shape == (2, 3, 8, 8)
    assert batch["image"].dtype == torch.uint8  # the loaders hand out bytes; floats are made after the transfer
    moved = dm.on_after_batch_transfer(batch, 0)
    assert moved["image"].dtype == torch.float32 and moved["image"].max() <= 1
    assert torch.equal((moved["image"] * 255).round().byte(), batch["image"])
    assert torch.equal((ds.float_images([4])[0] * 255).round().byte(), item["image"])


def test_models_see_float_images_through_the_trainer(flat_root: Path, tmp_path: Path):
    """Lightning calls the DataModule's on_after_batch_transfer: a training step sees float32 in [0, 1]."""
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.append(batch["image"])
            return self.w * batch["image"].mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(Probe(), datamodule=make_dm(flat_root, tmp_path))
    assert len(seen) == 2
    for x in seen:
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.5


def test_caption_rows_are_joined_by_id_not_line_order(flat_root: Path, tmp_path: Path):
    f = flat_root / "cars_text" / "cars_train.tsv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")
    dm = make_dm(flat_root, tmp_path)
    assert dm.index()["train"].captions[1] == "a blue car"  # a2 is still blue


def test_views_per_object_subset(flat_root: Path, tmp_path: Path):
    dm = make_dm(flat_root, tmp_path, views_per_object=2, eval_views_per_object=1)
    idx = dm.index()
    assert len(idx["train"].paths) == 12 and len(idx["val"].paths) == 2
    assert [p.name for p in select_views([Path(f"{i:06d}.png") for i in range(250)], 4)] == [
        "000000.png", "000062.png", "000125.png", "000187.png"]


def test_cache_equals_png_decoding(flat_root: Path, tmp_path: Path):
    objs = scan_split(flat_root, "cars_train")
    paths = [p for o in objs for p in o.views]
    packed = PackedImages(paths, 12, tmp_path / "c", "t", progress=False)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(packed.images[i], load_image(p, 12).transpose(2, 0, 1))  # stored CHW
    assert packed.valid.all()
    again = PackedImages(paths, 12, tmp_path / "c", "t", progress=False)
    assert again.file == packed.file  # reused, not rebuilt
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(paths[0])  # an input changes → new cache
    assert PackedImages(paths, 12, tmp_path / "c", "t", progress=False).file != packed.file


def test_png_and_cache_datasets_agree(flat_root: Path, tmp_path: Path):
    cached = make_dm(flat_root, tmp_path).datasets["train"]
    png = CarsDataModule(str(flat_root), image_size=8, cache=False, progress=False)
    png.setup("fit")
    for i in (0, 7, 17):
        assert (cached[i]["image"] == png.datasets["train"][i]["image"]).all()


def test_distinct_caption_sampler_never_repeats_and_covers_everything():
    captions = [0] * 50 + [1] * 10 + [2] * 5 + [3] * 3 + [4]
    sampler = DistinctCaptionBatchSampler(captions, batch_size=4, seed=3)
    seen = set()
    for epoch in range(40):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len(batch) == 4 and len({captions[i] for i in batch}) == 4
            seen.update(batch)
    assert seen == set(range(len(captions)))


def test_distinct_caption_sampler_shards_ranks_disjointly():
    captions = np.repeat(np.arange(6), 20)
    ranks = [list(DistinctCaptionBatchSampler(captions, 3, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    whole = list(DistinctCaptionBatchSampler(captions, 3, seed=0, batches_per_epoch=len(captions) // 3))
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]


def test_distinct_caption_sampler_rejects_batches_larger_than_vocabulary():
    with pytest.raises(ClipdiffError, match="batch_size=5"):
        DistinctCaptionBatchSampler([0, 1, 2, 0], batch_size=5)


def test_datamodule_distinct_caption_loader(flat_root: Path, tmp_path: Path):
    dm = make_dm(flat_root, tmp_path, sampler="distinct_caption", batch_size=3)
    for batch in dm.train_dataloader():
        caps = batch["caption"].tolist()
        assert len(set(caps)) == len(caps) == 3


# -- bad input: one clear line naming the path -------------------------------------------------------------------

def test_missing_root_and_split(tmp_path: Path, flat_root: Path):
    with pytest.raises(ClipdiffError, match="does not exist"):
        make_dm(tmp_path / "nope", tmp_path)
    with pytest.raises(ClipdiffError, match="cars_val.*missing"):
        make_dm(flat_root, tmp_path, splits={"train": "cars_train", "val": "cars_val2"})


def test_object_folder_without_images_is_skipped(flat_root: Path, tmp_path: Path, caplog):
    (flat_root / "cars_train" / "zz_empty" / "rgb").mkdir(parents=True)
    dm = make_dm(flat_root, tmp_path)
    assert "zz_empty" not in [o.object_id for o in dm.index()["train"].objects]
    assert "without rgb/*.png" in caplog.text and "zz_empty" in caplog.text


def test_corrupt_and_empty_pngs_are_skipped_by_the_cache_and_named(flat_root: Path, tmp_path: Path, caplog):
    bad = flat_root / "cars_train" / "a1" / "rgb" / "000001.png"
    bad.write_bytes(b"not a png")
    (flat_root / "cars_train" / "a2" / "rgb" / "000000.png").write_bytes(b"")
    dm = make_dm(flat_root, tmp_path)
    assert len(dm.datasets["train"]) == 16 and "skipped 2 unreadable" in caplog.text
    with pytest.raises(ClipdiffError, match=r"000001\.png: unreadable"):
        load_image(bad)
    png = CarsDataModule(str(flat_root), image_size=8, cache=False, progress=False)
    png.setup("fit")
    with pytest.raises(ClipdiffError, match="empty file"):
        png.datasets["train"][3]


def test_caption_file_problems(flat_root: Path, tmp_path: Path):
    f = flat_root / "cars_text" / "cars_train.tsv"
    good = f.read_text()
    f.write_text(good + "ghost\ta red car\n")
    with pytest.raises(ClipdiffError, match="not found under data.root.*ghost"):
        make_dm(flat_root, tmp_path)
    f.write_text("\n".join(good.splitlines()[:3]) + "\n")
    with pytest.raises(ClipdiffError, match="have no caption, e.g. a3"):
        make_dm(flat_root, tmp_path)
    f.write_text(good.replace("a blue car", "a purple car"))
    with pytest.raises(ClipdiffError, match="cars_train.tsv:3: .*unknown colour"):
        make_dm(flat_root, tmp_path)
    f.write_text("id\tlabel\na1\ta red car\n")
    with pytest.raises(ClipdiffError, match="lacks column"):
        read_caption_file(f)


def test_single_shared_label_file(flat_root: Path, tmp_path: Path):
    rows = ["object_id\tsplit\tcaption"]
    for split in ("cars_train", "cars_val", "cars_test"):
        for line in (flat_root / "cars_text" / f"{split}.tsv").read_text().splitlines()[1:]:
            oid, cap = line.split("\t")
            rows.append(f"{oid}\t{split}\t{cap}")
    shared = tmp_path / "gt.tsv"
    shared.write_text("\n".join(rows) + "\n")
    train_ids = [f"a{i}" for i in range(1, 7)]
    labels = load_split_labels(shared, {"cars_train": train_ids, "cars_val": ["b1", "b2"]})  # test rows ignored
    assert labels["cars_val"] == {"b1": "a red car", "b2": "a white car"}
    with pytest.raises(ClipdiffError, match="not found under data.root"):
        load_split_labels(shared, {"cars_train": train_ids[:-1], "cars_val": ["b1", "b2"]})
    dm = make_dm(flat_root, tmp_path, captions=str(shared))
    assert Counter(dm.index()["train"].captions)["a white car"] == 2


def test_16_bit_greyscale_pngs_are_scaled_not_clipped(flat_root: Path, tmp_path: Path):
    """A 16-bit greyscale view (Pillow mode I;16) reads as the same picture in 8 bits, with and without the cache,
    and the labeller sees a car in it (it flagged the view blank when every value above 255 became white)."""
    from clipdiff.labeling.labeller import analyse_object

    rgb = flat_root / "cars_train" / "a2" / "rgb"  # "a blue car": a dark square on white
    want = {}
    for png in sorted(rgb.glob("*.png")):
        grey8 = np.asarray(Image.open(png).convert("L"))
        want[png.name] = grey8
        Image.fromarray(grey8.astype(np.uint16) * 257).save(png)  # 0..255 → 0..65535, written as 16-bit greyscale
        with Image.open(png) as im:
            assert im.mode.startswith("I")
    got = load_image(rgb / "000000.png")
    np.testing.assert_array_equal(got, np.repeat(want["000000.png"][..., None], 3, axis=2))
    for cache in (True, False):
        dm = make_dm(flat_root, tmp_path / str(cache), image_size=16, cache=cache)
        ds = dm.datasets["train"]
        rows = [i for i in range(len(ds)) if int(ds.index.object_index[ds.rows[i]]) == 1]
        images = ds.float_images(rows)
        assert images.min() < 0.5, f"cache={cache}: the 16-bit views read as white"
        np.testing.assert_allclose(images[0, 0].numpy() * 255, want["000000.png"], atol=0.51)
    assert not analyse_object(rgb.parent, views=3).blank


def test_non_square_images_are_stretched_with_a_warning_naming_one(flat_root: Path, tmp_path: Path, caplog):
    from clipdiff.data import srn

    wide = flat_root / "cars_train" / "a3" / "rgb" / "000001.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(wide)
    make_dm(flat_root, tmp_path)  # builds the cache
    assert "not square" in caplog.text and "000001.png" in caplog.text
    caplog.clear()
    make_dm(flat_root, tmp_path)  # a later run reads the cache: still said
    assert "1 image(s) are not square" in caplog.text and str(wide) in caplog.text
    caplog.clear()
    srn._stretch_warned = False
    load_image(wide, 8)  # without the cache: the first one this process meets
    assert str(wide) in caplog.text and "24×16" in caplog.text


def test_the_index_holds_the_views_paths_without_a_path_object_per_view(flat_root: Path, tmp_path: Path):
    """The split index's paths are what listing the folders gives (sorted, per object in order), the cache key is
    the one a list of those Paths gives (caches built before stay valid), and the index holds a few bytes per view:
    the real set's 537,750 Paths would hold ~210 MB of every training process (README, "At the real scale")."""
    import tracemalloc

    from clipdiff.data.cache import cache_key
    from clipdiff.data.srn import SrnObject, ViewPaths

    (flat_root / "cars_train" / "a1" / "rgb" / "notes.txt").write_text("not a view")
    idx = CarsDataModule(str(flat_root), cache_dir=str(tmp_path / "c")).index()["train"]
    listed = [p for o in sorted((flat_root / "cars_train").iterdir()) for p in sorted((o / "rgb").glob("*.png"))]
    assert list(idx.paths) == listed and idx.paths[1:3] == listed[1:3] and idx.paths[-1] == listed[-1]
    assert list(idx.paths.strings()) == [str(p) for p in listed]
    assert [idx.paths[int(i)].parent.parent.name for i in range(len(listed))] == \
        [idx.objects[o].object_id for o in idx.object_index]
    assert cache_key(idx.paths, 32) == cache_key(listed, 32)

    names = tuple(f"{v:06d}.png" for v in range(250))
    objects = [SrnObject(f"{i:032x}", tmp_path / "cars_train" / f"{i:032x}", names) for i in range(200)]
    tracemalloc.start()
    paths = ViewPaths(objects)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(paths) == 50_000 and paths[251] == objects[1].path / "rgb" / "000001.png"
    assert held < 16 * len(paths)  # two int32 per view and the folders; 50,000 Paths hold ~20 MB


def test_the_cache_serves_the_rows_asked_in_their_order_here_and_in_loader_workers(flat_root: Path, tmp_path: Path):
    dm = CarsDataModule(str(flat_root), image_size=16, batch_size=4, cache_dir=str(tmp_path / "c"), progress=False)
    dm.setup("fit")
    packed = dm.datasets["train"].packed
    rows = np.array([5, 0, 5, 3, len(packed) - 1])
    assert np.array_equal(packed.gather(rows), np.asarray(packed.images)[rows])  # repeated, unsorted, the last
    assert packed.gather(np.array([], dtype=np.int64)).shape == (0, 3, 16, 16)
    here = [b["image"] for b in dm.train_dataloader()]
    dm.hparams.num_workers = 1  # a forked worker opens its own file and threads
    there = [b["image"] for b in dm.train_dataloader()]
    assert len(here) == len(there) and all(torch.equal(a, b) for a, b in zip(here, there))
