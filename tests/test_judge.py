"""The independent judge: training from the composed config, export → load_judge, learning, part accuracies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config, write_srn

from clipdiff.errors import ClipdiffError
from clipdiff.models.components.judge import (
    Judge,
    JudgeAugment,
    accuracies_from_confusion,
    caption_parts,
    load_judge,
)
from clipdiff.models.export import save_export

TINY_NET = ["model.net.widths=[8,16]", "model.net.blocks=[1,1]", "model.net.strides=[1,2]", "model.net.dropout=0.0"]


def run_train(root: Path, run_dir: Path, overrides: list[str]):
    from clipdiff.train import train

    cfg = compose_config("train", [
        "model=judge", "logger=csv", f"data.root={root}", "data.image_size=16", "data.batch_size=8",
        f"data.cache_dir={run_dir / 'cache'}", "data.progress=false", f"paths.run_dir={run_dir}",
        "trainer.enable_progress_bar=false", *overrides,
    ])
    return train(cfg)


def red_blue(root: Path, per_class: int = 6, views: int = 4) -> Path:
    """Red vs blue squares: trivially separable by colour."""
    train = {f"r{i}": "a red car" for i in range(per_class)} | {f"b{i}": "a blue car" for i in range(per_class)}
    val = {"vr0": "a red car", "vr1": "a red car", "vb0": "a blue car", "vb1": "a blue car"}
    return write_srn(root, {"cars_train": train, "cars_val": val, "cars_test": {"tr": "a red car"}}, views=views)


def test_fast_run_exports_a_judge_that_matches_the_module(tmp_path: Path, flat_root: Path):
    metrics, objects = run_train(flat_root, tmp_path / "run", ["trainer.max_steps=2", *TINY_NET])
    export = tmp_path / "run" / "export.pt"
    assert export.is_file()
    assert {"train/loss", "val/loss", "val/acc_caption", "val/acc_caption_macro", "val/acc_colour",
            "val/acc_type"} <= set(metrics)
    module = objects["model"].eval()
    judge = load_judge(export)
    assert not judge.training
    assert judge.vocabulary == objects["datamodule"].vocab.to_list() == module.vocabulary
    assert judge.image_size == 16
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(judge(x), expected)
    assert torch.equal(judge.predict(x), expected.argmax(1))
    # any input size is resized to the training size
    big = torch.nn.functional.interpolate(x, size=64, mode="nearest")
    assert judge(big).shape == (5, len(judge.vocabulary))
    # a run directory works as well as the file
    torch.testing.assert_close(load_judge(tmp_path / "run")(x), expected)


def test_judge_learns_red_vs_blue(tmp_path: Path):
    root = red_blue(tmp_path / "rb")
    metrics, _objects = run_train(root, tmp_path / "run", [
        "trainer.max_steps=36", "trainer.check_val_every_n_epoch=3", "model.augment.blur_p=0.5",
        "model.augment.noise_p=0.5", "model.optimizer.lr=1e-2", *TINY_NET])
    assert metrics["val/acc_caption"] == 1.0
    judge = load_judge(tmp_path / "run" / "export.pt")
    vocab = judge.vocabulary
    red = torch.zeros(4, 3, 16, 16) + 1.0
    red[:, :, 3:13, 3:13] = torch.tensor([200, 30, 30]).view(1, 3, 1, 1) / 255
    blue = red.clone()
    blue[:, :, 3:13, 3:13] = torch.tensor([30, 40, 200]).view(1, 3, 1, 1) / 255
    assert [vocab[i] for i in judge.predict(torch.cat([red, blue]))] == ["a red car"] * 4 + ["a blue car"] * 4
    hits = judge.correct(red, vocab.index("a red car"))
    assert hits["caption"].all() and hits["colour"].all() and hits["type"].all()


def test_wrong_exports_fail_with_one_line(tmp_path: Path):
    save_export(tmp_path / "ddpm.pt", "ddpm", config={}, state_dict={})
    with pytest.raises(ClipdiffError, match="holds a ddpm model, but a judge model is needed") as err:
        load_judge(tmp_path / "ddpm.pt", key="judge_ckpt")
    assert "\n" not in str(err.value) and "judge_ckpt=" in str(err.value)
    with pytest.raises(ClipdiffError, match="does not exist"):
        load_judge(tmp_path / "missing.pt")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6"}, tmp_path / "lightning.ckpt")
    with pytest.raises(ClipdiffError, match="not a clipdiff export"):
        load_judge(tmp_path / "lightning.ckpt")


def test_part_accuracies_on_hand_made_predictions():
    vocab = ["a blue car", "a red car", "a red sports car", "a white and red car", "a white car"]  # id order
    colour_of, type_of = caption_parts(vocab)
    with pytest.raises(ClipdiffError, match="id order"):
        caption_parts(vocab[::-1])
    target = ["a red car", "a red car", "a red sports car", "a blue car", "a white and red car", "a white car"]
    pred = ["a red car", "a red sports car", "a red car", "a white car", "a white car", "a white car"]
    # caption hits: 1, 0, 0, 0, 0, 1        → 2/6
    # colour hits:  1, 1, 1, 0, 0 (white ≠ white and red), 1 → 4/6
    # type hits:    1, 0, 0, 1, 1, 1        → 4/6
    # recall per true caption: red car 1/2, red sports car 0, blue car 0, white and red car 0, white car 1 → 0.3
    ids = {c: i for i, c in enumerate(vocab)}
    cm = torch.zeros(len(vocab) + 1, len(vocab) + 1, dtype=torch.long)  # one extra caption that never occurs
    for t, p in zip(target, pred):
        cm[ids[t], ids[p]] += 1
    colour_of = torch.cat([colour_of, torch.tensor([99])])
    type_of = torch.cat([type_of, torch.tensor([99])])
    acc = accuracies_from_confusion(cm, colour_of, type_of)
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
    with pytest.raises(ClipdiffError, match=r"\[B, 3, H, W\]"):
        Judge(3)(torch.rand(3, 16, 16))
    with pytest.raises(ClipdiffError, match="class_weighting"):
        run_train(flat_root, tmp_path / "run", ["trainer.max_steps=1", "model.class_weighting=inverse", *TINY_NET])


def test_inverse_sqrt_class_weights(tmp_path: Path, flat_root: Path):
    _, objects = run_train(flat_root, tmp_path / "run",
                           ["trainer.max_steps=1", "model.class_weighting=inverse_sqrt", *TINY_NET])
    model, dm = objects["model"], objects["datamodule"]
    counts = torch.bincount(torch.as_tensor(dm.datasets["train"].caption_ids), minlength=len(dm.vocab)).double()
    w = model.class_weight.double()
    # rarer captions weigh more, as 1/sqrt(count); the mean weight over training images is 1
    ratio = w * counts.sqrt()
    present = counts > 0
    torch.testing.assert_close(ratio[present], ratio[present][:1].expand(int(present.sum())))
    assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)
