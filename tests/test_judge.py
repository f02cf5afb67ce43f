"""The independent judge: training from the composed config, export → load_judge, learning, the colour-blind type
net, refusal (threshold on the val split; a refused sample misses every part), old exports, part accuracies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

from clipdiff.errors import ClipdiffError
from clipdiff.models import judge_module
from clipdiff.models.components import judge as judge_component
from clipdiff.models.components.judge import Judge, JudgeAugment, caption_parts, load_judge, part_accuracies
from clipdiff.models.components.knn_score import knn_scores, refusal_threshold
from clipdiff.models.components.small_resnet import LUMA, luminance
from clipdiff.models.export import save_export

TINY_NET = ["model.type_net.widths=[8,16]", "model.type_net.blocks=[1,1]", "model.type_net.strides=[1,2]",
            "model.type_net.dropout=0.0", "model.colour_net.widths=[8]", "model.colour_net.blocks=[1]",
            "model.colour_net.strides=[2]", "model.colour_net.image_size=8", "model.colour_net.dropout=0.0"]
VOCAB = ["a blue car", "a blue jeep/bus", "a red car", "a red jeep/bus"]  # id order
TINY = {"type_net": {"widths": [8, 16], "blocks": [1, 1]}, "colour_net": {"widths": [8], "blocks": [1]}}


def run_train(root: Path, run_dir: Path, overrides: list[str]):
    from clipdiff.train import train

    cfg = compose_config("train", [
        "model=judge", "logger=csv", f"data.root={root}", "data.image_size=16", "data.batch_size=8",
        f"data.cache_dir={run_dir / 'cache'}", "data.progress=false", f"paths.run_dir={run_dir}",
        "trainer.enable_progress_bar=false", *overrides,
    ])
    return train(cfg)


def calibrated(judge: Judge, seed: int = 0) -> Judge:
    """An untrained judge with a refusal rule from random images (bank and held-out)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bank = judge.embed(torch.rand(32, 3, judge.image_size, judge.image_size, generator=gen))
        heldout = judge.embed(torch.rand(20, 3, judge.image_size, judge.image_size, generator=gen))
    judge.calibrate(bank, heldout, quantile=0.1)
    return judge.eval()


BOXES = {"car": (9, 13, 1, 15), "jeep/bus": (3, 13, 5, 11)}  # rows, cols of a 16 px view: long and low, or tall
PAINT = {"red": (200, 30, 30), "blue": (30, 40, 200)}


def shapes_root(root: Path, per_caption: int = 4, views: int = 4) -> Path:
    """Two body types (a long low box, a tall box) × two colours, shifted a pixel or two per view: type is in the
    outline only (the grey image), colour only in the hue."""
    rng = np.random.default_rng(0)
    splits = {"cars_train": per_caption, "cars_val": 2, "cars_test": 1}
    for split, count in splits.items():
        table = {}
        for caption in VOCAB:
            colour, body = caption.split(" ", 2)[1:]
            for i in range(count):
                oid = f"{split[5:]}_{colour}_{body.replace('/', '-')}_{i}"
                table[oid] = caption
                for v in range(views):
                    arr = np.full((16, 16, 3), 255, np.uint8)
                    r0, r1, c0, c1 = BOXES[body]
                    dr, dc = rng.integers(-1, 2, size=2)
                    arr[r0 + dr:r1 + dr, max(0, c0 + dc):c1 + dc] = PAINT[colour]
                    path = root / split / oid / "rgb" / f"{v:06d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(path)
        (root / "cars_text").mkdir(parents=True, exist_ok=True)
        (root / "cars_text" / f"{split}.tsv").write_text(
            "object_id\tcaption\n" + "".join(f"{o}\t{c}\n" for o, c in table.items()))
    return root


def test_fast_run_exports_a_judge_that_round_trips(tmp_path: Path, flat_root: Path):
    metrics, objects = run_train(flat_root, tmp_path / "run", ["trainer.max_steps=2", *TINY_NET])
    export = tmp_path / "run" / "export.pt"
    assert export.is_file()
    assert {"train/loss", "train/loss_type", "train/loss_colour", "val/loss", "val/acc_caption",
            "val/acc_caption_macro", "val/acc_colour", "val/acc_type", "val/threshold"} <= set(metrics)
    module = objects["model"].eval()
    judge = load_judge(export)
    assert not judge.training and judge.calibrated
    assert judge.vocabulary == objects["datamodule"].vocab.to_list() == module.vocabulary
    assert judge.image_size == 16 and judge.refusal["split"] == "val"
    # the bank is evenly spread training images; the threshold was set on every val image
    assert len(judge.bank) == len(objects["datamodule"].datasets["train"])
    assert len(judge.refusal["heldout_scores"]) == len(objects["datamodule"].datasets["val"])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=gen)
    x[:3] = objects["datamodule"].datasets["val"].float_images(range(3))
    expected = module.net.predict(x)
    got = judge.predict(x)
    for key in ("colour", "type", "refused"):
        assert torch.equal(got[key], expected[key]), key
    torch.testing.assert_close(got["score"], expected["score"])
    assert float(judge.threshold) == float(module.net.threshold) == metrics["val/threshold"]
    # the rule is recomputed the same and leaves the random streams alone (the training draws what it would have)
    trained, rng = objects["trainer"].lightning_module, torch.get_rng_state()
    trained.calibrate()
    assert torch.equal(torch.get_rng_state(), rng) and float(trained.net.threshold) == float(judge.threshold)
    # any input size is resized to the training size; a run directory works as well as the file
    big = torch.nn.functional.interpolate(x, size=64, mode="nearest")
    assert judge.predict(big)["score"].shape == (6,)
    torch.testing.assert_close(load_judge(tmp_path / "run").predict(x)["score"], expected["score"])


def test_judge_learns_type_from_outline_and_colour_from_hue(tmp_path: Path):
    """Four captions (two outlines × two colours, chance 50% on each part) on held-out objects after 40 steps."""
    root = shapes_root(tmp_path / "shapes")
    metrics, objects = run_train(root, tmp_path / "run", [
        "trainer.max_steps=40", "trainer.check_val_every_n_epoch=5", "model.optimizer.lr=1e-2", "test=true",
        "model.augment.translate=0.0", *TINY_NET])
    assert metrics["val/acc_type"] >= 0.9 and metrics["val/acc_colour"] >= 0.9, metrics
    judge = load_judge(tmp_path / "run")
    test = objects["datamodule"].datasets["test"]
    images, target = test.float_images(range(len(test))), torch.as_tensor(test.caption_ids)
    raw = judge.correct(images, target, refuse=False)
    assert raw["type"].float().mean() >= 0.9 and raw["colour"].float().mean() >= 0.9
    # images unlike any training render (uniform noise) are refused; held-out renders are not, mostly
    noise = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert judge.predict(noise)["refused"].all()
    assert judge.predict(images)["refused"].float().mean() <= 0.25


def test_type_net_is_colour_blind():
    """An image and a hue-rotated copy with the same luminance at every pixel: the type net (and so the score)
    reads them the same, the colour net does not."""
    judge = calibrated(Judge(VOCAB, image_size=16, **TINY))
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor(LUMA, dtype=torch.float64)
    # an orthonormal basis (u, v) of the colours of zero luminance: w·u = w·v = 0
    q, _ = torch.linalg.qr(torch.stack([w, torch.tensor([1.0, 0, 0], dtype=torch.float64),
                                        torch.tensor([0, 1.0, 0], dtype=torch.float64)], dim=1))
    u, v = q[:, 1], q[:, 2]
    assert abs(float(w @ u)) < 1e-12 and abs(float(w @ v)) < 1e-12 and abs(float(w.sum()) - 1) < 1e-12
    lum = 0.3 + 0.4 * torch.rand(8, 1, 16, 16, generator=gen, dtype=torch.float64)
    chroma = 0.15 * (torch.rand(8, 2, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1)

    def rgb(a, b):  # [8, 3, 16, 16]: luminance lum at every pixel, whatever the chroma (a, b)
        return lum + a * u.view(1, 3, 1, 1) + b * v.view(1, 3, 1, 1)

    theta = 2.0  # rotate the chroma plane: a hue rotation at constant luminance
    a, b = chroma[:, :1], chroma[:, 1:]
    x = rgb(a, b)
    y = rgb(math.cos(theta) * a - math.sin(theta) * b, math.sin(theta) * a + math.cos(theta) * b)
    assert 0 < x.min() and x.max() < 1 and 0 < y.min() and y.max() < 1  # no clipping: luminance is exact
    torch.testing.assert_close(luminance(x), luminance(y), atol=1e-12, rtol=0)
    assert (x - y).abs().max() > 0.1  # the colours do differ
    x, y = x.float(), y.float()
    with torch.no_grad():
        tx, ty = judge(x), judge(y)
    torch.testing.assert_close(tx["type"], ty["type"], atol=1e-5, rtol=0)
    torch.testing.assert_close(tx["score"], ty["score"], atol=1e-5, rtol=0)
    assert torch.equal(judge.predict(x)["type"], judge.predict(y)["type"])
    assert (tx["colour"] - ty["colour"]).abs().max() > 1e-3


def test_refusal_makes_every_part_wrong():
    judge = calibrated(Judge(VOCAB, image_size=16, **TINY))
    with torch.no_grad():  # rig the parts: always blue, always jeep/bus, so every raw hit is known
        judge.colour_net.head[-1].bias.fill_(-1e4)[judge.colour_names.index("blue")] = 1e4
        judge.type_net.head[-1].bias.fill_(-1e4)[judge.type_names.index("jeep/bus")] = 1e4
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x[-1] = math.nan  # a diverged sample: no score, refused
    scores = judge.predict(x)["score"]
    judge.threshold.fill_(float(scores[:-1].median()))  # refuse about half
    target = torch.tensor([VOCAB.index("a blue jeep/bus")] * 6 + [VOCAB.index("a red jeep/bus")] * 6)
    raw, judged = judge.correct(x, target, refuse=False), judge.correct(x, target)
    refused = judged["refused"]
    assert torch.equal(refused, raw["refused"]) and refused[-1] and 0 < refused[:-1].sum() < 11
    assert torch.equal(refused[:-1], scores[:-1] < judge.threshold)
    blue = target == VOCAB.index("a blue jeep/bus")
    assert raw["type"][:-1].all() and torch.equal(raw["colour"][:-1], blue[:-1])  # (the NaN image has no parts)
    assert torch.equal(raw["caption"], raw["colour"] & raw["type"])
    for part in ("caption", "colour", "type"):
        assert not judged[part][refused].any(), part
        assert torch.equal(judged[part][~refused], raw[part][~refused]), part


def test_threshold_is_the_stated_quantile_of_the_val_scores(tmp_path: Path, flat_root: Path, monkeypatch):
    """Rigged score: an image's mean brightness. The held-out scores are those of the 6 val images (not train or
    test), and the threshold is their 0.5 quantile, so exactly the 3 darkest val images fall below it."""
    monkeypatch.setattr(judge_module.JudgeModule, "_features",
                        lambda self, ds, idx, **kw: ds.float_images(idx).mean(dim=(1, 2, 3))[:, None])
    monkeypatch.setattr(judge_component, "knn_scores", lambda features, bank, k, chunk=1024: features[:, 0])
    run_train(flat_root, tmp_path / "run", ["trainer.max_steps=2", "model.refusal.quantile=0.5", *TINY_NET])
    judge = load_judge(tmp_path / "run")
    val = [np.asarray(Image.open(p), dtype=np.float64).mean() / 255
           for p in sorted((flat_root / "cars_val").glob("*/rgb/*.png"))]
    assert len(val) == 6 and len(set(val)) == 6  # flat_root: 2 objects × 3 views, each view painted differently
    scores = judge.refusal["heldout_scores"]
    assert judge.refusal["quantile"] == 0.5 and judge.refusal["split"] == "val"
    torch.testing.assert_close(scores.sort().values.double(), torch.tensor(sorted(val), dtype=torch.float64))
    assert float(judge.threshold) == pytest.approx(sorted(val)[3], abs=1e-6)
    assert int((scores < judge.threshold).sum()) == 3


def test_refusal_threshold_refuses_at_most_the_quantile():
    scores = torch.tensor([0.7, 0.1, 0.4, 0.9, 0.3, 0.5, 0.8, 0.2])
    for q, refused in ((0.25, {0.1, 0.2}), (0.0, set()), (0.2, {0.1}), (0.5, {0.1, 0.2, 0.3, 0.4})):
        t = refusal_threshold(scores, q)
        assert {round(s, 3) for s in scores.tolist() if s < t} == refused, q
    with pytest.raises(ValueError):
        refusal_threshold(scores, 1.0)
    # the score: minus the distance to the k-th nearest bank row, after L2-normalising both
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    z = torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(knn_scores(z, bank, 1), torch.tensor([0.0]))
    torch.testing.assert_close(knn_scores(z, bank, 2), torch.tensor([-math.sqrt(2.0)]))
    torch.testing.assert_close(knn_scores(z, bank, 9), torch.tensor([-2.0]))  # k is capped at the bank size


def test_wrong_and_old_exports_fail_with_one_line(tmp_path: Path):
    save_export(tmp_path / "ddpm.pt", "ddpm", config={}, state_dict={})
    with pytest.raises(ClipdiffError, match="holds a ddpm model, but a judge model is needed") as err:
        load_judge(tmp_path / "ddpm.pt", key="judge_ckpt")
    assert "\n" not in str(err.value) and "judge_ckpt=" in str(err.value)
    with pytest.raises(ClipdiffError, match="does not exist"):
        load_judge(tmp_path / "missing.pt")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6"}, tmp_path / "lightning.ckpt")
    with pytest.raises(ClipdiffError, match="not a clipdiff export"):
        load_judge(tmp_path / "lightning.ckpt")
    # a judge exported before refusal: one caption classifier, no threshold
    old = {"num_classes": 4, "image_size": 16, "widths": [8], "blocks": [1], "strides": [1], "dropout": 0.0,
           "mean": [0.5] * 3, "std": [0.25] * 3}
    save_export(tmp_path / "old.pt", "judge", config=old, state_dict={}, vocabulary=VOCAB, image_size=16)
    with pytest.raises(ClipdiffError, match=r"retrain the judge with `python -m clipdiff.train model=judge") as err:
        load_judge(tmp_path / "old.pt", key="judge_ckpt")
    assert "\n" not in str(err.value) and f"judge_ckpt={tmp_path / 'old.pt'}" in str(err.value)
    # an uncalibrated judge cannot be exported or score
    with pytest.raises(ClipdiffError, match="no car-render threshold"):
        Judge(VOCAB, image_size=16, **TINY).export(tmp_path / "j.pt")


def test_part_accuracies_on_hand_made_predictions():
    vocab = ["a blue car", "a red car", "a red sports car", "a white and red car", "a white car"]  # id order
    colour_of, type_of = caption_parts(vocab)
    with pytest.raises(ClipdiffError, match="id order"):
        caption_parts(vocab[::-1])
    # colour names sorted: blue, red, white, white and red; types: car, sports car
    assert [colour_of.tolist(), type_of.tolist()] == [[0, 1, 1, 3, 2], [0, 0, 1, 0, 0]]
    target = ["a red car", "a red car", "a red sports car", "a blue car", "a white and red car", "a white car"]
    colour_hit = torch.tensor([1, 1, 1, 0, 0, 1]).bool()
    type_hit = torch.tensor([1, 0, 0, 1, 1, 1]).bool()
    # caption hits (both): 1, 0, 0, 0, 0, 1 → 2/6; colour 4/6; type 4/6
    # recall per target caption: red car 1/2, red sports car 0, blue car 0, white and red car 0, white car 1 → 0.3;
    # a caption that never occurs (id 5) is left out
    ids = torch.tensor([vocab.index(t) for t in target])
    acc = part_accuracies(ids, colour_hit, type_hit, num_captions=len(vocab) + 1)
    assert acc["acc_caption"].item() == pytest.approx(2 / 6)
    assert acc["acc_colour"].item() == pytest.approx(4 / 6)
    assert acc["acc_type"].item() == pytest.approx(4 / 6)
    assert acc["acc_caption_macro"].item() == pytest.approx(0.3)


def test_augmentation_keeps_colours_and_range():
    torch.manual_seed(0)
    x = torch.zeros(64, 3, 16, 16)
    x[:, 0] = 0.8  # a flat red-ish image: only blur/noise can change it, and only around its mean
    aug = JudgeAugment(flip=True, scale=(0.7, 1.0), translate=0.1, blur_p=1.0, noise_p=1.0, noise_std=(0.02, 0.05))
    y = aug(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)  # noise was added
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), x.mean(dim=(0, 2, 3)), atol=0.02, rtol=0)
    # a mirrored, shifted image: geometry only, so a symmetric pattern mirrors onto itself
    pattern = torch.zeros(1, 3, 16, 16)
    pattern[..., 4:12, 4:12] = 1.0
    mirror = JudgeAugment(flip=True, scale=(1.0, 1.0), translate=0.0)
    torch.testing.assert_close(mirror(pattern.expand(8, -1, -1, -1)), pattern.expand(8, -1, -1, -1))


def test_judge_rejects_bad_input_and_class_weighting(tmp_path: Path, flat_root: Path):
    judge = calibrated(Judge(VOCAB, image_size=16, **TINY))
    with pytest.raises(ClipdiffError, match=r"\[B, 3, H, W\]"):
        judge.predict(torch.rand(3, 16, 16))
    with pytest.raises(ClipdiffError, match="target caption ids"):
        judge.correct(torch.rand(2, 3, 16, 16), torch.tensor([0, 4]))
    with pytest.raises(ClipdiffError, match="class_weighting"):
        run_train(flat_root, tmp_path / "run", ["trainer.max_steps=1", "model.class_weighting=inverse", *TINY_NET])
    with pytest.raises(ClipdiffError, match="model.refusal has unknown key"):
        run_train(flat_root, tmp_path / "run2", ["trainer.max_steps=1", "+model.refusal.quantil=0.1", *TINY_NET])
    with pytest.raises(ClipdiffError, match=r"model.refusal.score_stages=\[2\]: type-net stages are 0..1"):
        run_train(flat_root, tmp_path / "run3", ["trainer.max_steps=1", "model.refusal.score_stages=[2]", *TINY_NET])


def test_inverse_sqrt_class_weights_and_a_run_stopped_before_validation(tmp_path: Path, flat_root: Path):
    _, objects = run_train(flat_root, tmp_path / "run",
                           ["trainer.max_steps=1", "model.class_weighting=inverse_sqrt", *TINY_NET])
    model, dm = objects["model"], objects["datamodule"]
    # one step of a two-step epoch: no validation ran, so the rule was set when fitting ended, for these weights
    assert load_judge(tmp_path / "run").refusal["step"] == 1 == model.calibrated_step
    captions = torch.as_tensor(dm.datasets["train"].caption_ids)
    for weight, part_of in ((model.type_weight, model.net.type_of), (model.colour_weight, model.net.colour_of)):
        counts = torch.bincount(part_of[captions], minlength=len(weight)).double()
        w = weight.double()
        # rarer types / colours weigh more, as 1/sqrt(count); the mean weight over training images is 1
        ratio = w * counts.sqrt()
        present = counts > 0
        assert present.sum() >= 2 and (~present).sum() >= 0
        torch.testing.assert_close(ratio[present], ratio[present][:1].expand(int(present.sum())))
        assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)


def test_outlier_exposure_replaces_part_of_each_batch(tmp_path: Path, flat_root: Path, monkeypatch):
    """model.outliers: a quarter of each batch of 8 (2 images) becomes synthetic negatives whose type logits are
    pulled to uniform; the type and colour losses see the other 6."""
    seen = []
    cross_entropy = judge_module.F.cross_entropy
    monkeypatch.setattr(judge_module.F, "cross_entropy", lambda logits, target, **kw: seen.append(len(target))
                        or cross_entropy(logits, target, **kw))
    metrics, _ = run_train(flat_root, tmp_path / "run", [
        "trainer.max_steps=1", "model.outliers={share: 0.25, weight: 0.5}", "trainer.log_every_n_steps=1",
        *TINY_NET])
    assert seen[:2] == [6, 6] and metrics["train/loss_outlier"] > 0
    assert metrics["train/loss"] == pytest.approx(metrics["train/loss_type"] + metrics["train/loss_colour"]
                                                  + 0.5 * metrics["train/loss_outlier"], rel=1e-5)
    with pytest.raises(ClipdiffError, match="model.outliers"):
        run_train(flat_root, tmp_path / "run2", ["trainer.max_steps=1", "model.outliers={share: 1.5}", *TINY_NET])
