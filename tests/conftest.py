"""Shared fixtures: tiny datasets made by the project itself, and the real configs composed with tiny overrides."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# one OpenMP/torch thread in every command a test starts and in every spawned DDP rank too (see one_thread): with
# `make test`'s xdist workers each core already runs a worker, and a second thread per process only waits
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

CONF = str(Path(__file__).resolve().parents[1] / "conf")

# a DDPM small enough to train a few steps in a subprocess in seconds (resume, stop and bad-input tests)
TINY_DDPM = [
    "model=ddpm", "data.image_size=16", "data.batch_size=4", "data.eval_batch_size=6", "data.cache=false",
    "data.progress=false", "model.unet.block_out_channels=[8,16]",
    "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]", "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]",
    "model.unet.norm_num_groups=4", "model.sample_every_n_epochs=null", "trainer.enable_progress_bar=false",
    "logger=csv",
]

COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 200), "white": (235, 235, 235), "green": (30, 170, 40)}


def write_srn(root: Path, objects: dict[str, dict[str, str]], views: int = 3, size: int = 16) -> Path:
    """A minimal SRN-layout dataset: {split: {object_id: caption}} with flat-coloured squares as views.

    For reader and cache tests that must control every file; model tests use the procedural renderer.
    """
    for split, table in objects.items():
        for oid, caption in table.items():
            colour = COLOURS[caption.split()[1]]
            for v in range(views):
                arr = np.full((size, size, 3), 255, np.uint8)
                arr[2 + v : size - 2, 3 : size - 3] = colour
                path = root / split / oid / "rgb" / f"{v:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
        lines = ["object_id\tcaption"] + [f"{o}\t{c}" for o, c in table.items()]
        (root / "cars_text").mkdir(parents=True, exist_ok=True)
        (root / "cars_text" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    return write_srn(
        tmp_path / "flat",
        {
            "cars_train": {"a1": "a red car", "a2": "a blue car", "a3": "a white car", "a4": "a white car",
                           "a5": "a green jeep/bus", "a6": "a red car"},
            "cars_val": {"b1": "a red car", "b2": "a white car"},
            "cars_test": {"c1": "a blue car"},
        },
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In xdist workers (``make test``): the tests marked slow first, so that no worker starts a long one while the
    others run out of work. A one-process run keeps pytest's order (tests of a module together)."""
    if not hasattr(config, "workerinput"):
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise collection order
    # pytest-xdist marks a grouped test by appending @<group> to its node id; pytest 9.2's structured node ids drop
    # that silently (pytest-dev/pytest-xdist#1386), and each worker would then build the shared fixtures again
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if getattr(config.option, "loadgroup", False) and lost:  # what xdist sets in a worker for --dist loadgroup
        warnings.warn(f"pytest {pytest.__version__} drops the xdist_group of {len(lost)} tests (pytest-xdist#1386): "
                      "tests that share a fixture may each build it on another worker; pyproject.toml pins pytest<9.2",
                      stacklevel=1)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one intra-op thread, and far faster when the CPU is shared (no OpenMP waits).
    Session scope is per process: each xdist worker of ``make test`` runs on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """A real config as ``python -m clipdiff.<name>`` sees it: HydraConfig set, the ``hydra`` node removed."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
