"""CLIP and the noisy CLIP learn at all: a few dozen steps on flat colours beat chance on held-out objects."""

from __future__ import annotations

import pytest
from conftest import compose_config, write_srn

from clipdiff.train import train

CAPTIONS = ["a red car", "a blue car", "a white car", "a green jeep/bus"]
CHANCE = 1 / len(CAPTIONS)  # the validation set is balanced: one object per caption


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learn")
    train_objs = {f"a{i}{j}": c for i, c in enumerate(CAPTIONS) for j in range(3)}
    return write_srn(tmp / "flat", {"cars_train": train_objs,
                                    "cars_val": {f"b{i}": c for i, c in enumerate(CAPTIONS)},
                                    "cars_test": {"c0": CAPTIONS[0]}}, views=2)


def run(root, tmp_path, model: str, steps: int, *extra: str) -> dict[str, float]:
    cfg = compose_config("train", [
        f"model={model}", f"data.root={root}", "data.cache=false", "data.batch_size=8", "data.progress=false",
        f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=1000",
        "trainer.enable_progress_bar=false", "logger=csv", "callbacks=none", f"paths.run_dir={tmp_path / model}", *extra])
    _, objects = train(cfg)  # no validation while training; once at the end on the held-out objects
    (metrics,) = objects["trainer"].validate(objects["model"], datamodule=objects["datamodule"], verbose=False)
    return metrics


def test_clip_learns_flat_colours(easy, tmp_path):
    metrics = run(easy, tmp_path, "clip", 24, "model.optimizer.lr=3e-3", "model.plot_every_n_epochs=1000")
    assert metrics["val/acc_caption"] >= CHANCE + 0.5, metrics


def test_noisy_clip_learns_flat_colours_at_low_noise(easy, tmp_path):
    """From random init (no clean CLIP to start from); x_t with t < 100 of 1000 is nearly the clean image."""
    metrics = run(easy, tmp_path, "noisy_clip", 24, "model.optimizer.lr=3e-3", "model.clean_reference=false",
                  "model.plot_every_n_epochs=1000")
    assert metrics["val/acc_t000"] >= CHANCE + 0.5, metrics
