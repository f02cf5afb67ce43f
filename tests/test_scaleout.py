"""Scale-out: a 2-process DDP run (``trainer=ddp_sim``: gloo, through Lightning) of the CLIP step equals one process
on the global batch; ranks get disjoint shares of the data through the real DataModule; metrics are gathered;
the SLURM launcher and the Optuna sweeper compose."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config, write_srn
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.data import _set_sampler_epoch

from clipdiff.data.datamodule import CarsDataModule
from clipdiff.data.sampler import DistinctCaptionBatchSampler
from clipdiff.train import train

TRAIN = {"a1": "a red car", "a2": "a blue car", "a3": "a white car", "a4": "a white car", "a5": "a green jeep/bus",
         "a6": "a red car"}  # × 3 views = 18 images


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_srn(tmp_path_factory.mktemp("scaleout") / "flat",
                     {"cars_train": TRAIN, "cars_val": {"b1": "a red car", "b2": "a white car"},
                      "cars_test": {"c1": "a blue car"}})


def clip_run(root: Path, run_dir: Path, trainer: str, batch_size: int):
    """Two plain SGD steps (so parameter differences are gradient differences), then one validation."""
    cfg = compose_config("train", [
        "model=clip", f"trainer={trainer}", f"data.root={root}", "data.cache=false", "data.progress=false",
        f"data.batch_size={batch_size}", "model.hflip=false", "model.optimizer._target_=torch.optim.SGD",
        "~model.optimizer.betas", "~model.optimizer.eps", "model.optimizer.lr=0.5", "model.scheduler=null",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false", "logger=csv",
        f"paths.run_dir={run_dir}", "+callbacks.record._target_=scaleout_helpers.RecordBatches",
        f"+callbacks.record.folder={run_dir / 'batches'}",
    ])
    metrics, objects = train(cfg)
    seen: dict[tuple[str, int], dict[int, set]] = {}  # (stage, step) → rank → images
    for path in sorted((run_dir / "batches").glob("rank*.jsonl")):
        for stage, step, rank, pairs in map(json.loads, path.read_text().splitlines()):
            seen.setdefault((stage, step), {}).setdefault(rank, set()).update(tuple(p) for p in pairs)
    return metrics, objects["model"], seen


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_on_the_global_batch(root, tmp_path):
    ddp_metrics, ddp_model, ddp_seen = clip_run(root, tmp_path / "ddp", "ddp_sim", batch_size=2)
    one_metrics, one_model, one_seen = clip_run(root, tmp_path / "one", "cpu", batch_size=4)
    _, half_model, _ = clip_run(root, tmp_path / "half", "cpu", batch_size=2)

    # data: per step, the ranks' batches are disjoint and together are the single process's global batch
    assert sorted(ddp_seen) == sorted(one_seen) == [("train", 0), ("train", 1), ("val", 2)]
    for key, size in ((("train", 0), 2), (("train", 1), 2), (("val", 2), 3)):
        r0, r1 = ddp_seen[key][0], ddp_seen[key][1]
        assert len(r0) == len(r1) == size and not r0 & r1, key
        assert r0 | r1 == one_seen[key][0], key

    # the loss (synced mean over ranks) and the parameters after two SGD steps (lr 0.5) agree within float error
    assert ddp_metrics["train/loss"] == pytest.approx(one_metrics["train/loss"], abs=1e-5)
    ddp_params, one_params = dict(ddp_model.named_parameters()), dict(one_model.named_parameters())
    for name, p in one_params.items():
        assert torch.allclose(ddp_params[name], p, atol=2e-6, rtol=1e-4), name
    # control: one process on the per-device batch alone moves the weights elsewhere
    half_params = dict(half_model.named_parameters())
    assert max((half_params[n] - p).abs().max().item() for n, p in one_params.items()) > 1e-3

    # validation: torchmetrics gathers both ranks' images (3 each), so rank 0's metrics cover all 6 val images
    for run, metrics in (("ddp", ddp_metrics), ("one", one_metrics)):
        per_class = (tmp_path / run / "zeroshot" / "val_epoch000_per_class.tsv").read_text().splitlines()[1:]
        assert sum(int(line.split("\t")[1]) for line in per_class) == 6, run
    assert ddp_metrics["val/acc_caption"] == pytest.approx(one_metrics["val/acc_caption"])
    assert ddp_metrics["val/t2i_map"] == pytest.approx(one_metrics["val/t2i_map"], abs=1e-6)


def loaders(root: Path, sampler: str, world: int, batch_size: int) -> list:
    out = []
    for rank in range(world):
        dm = CarsDataModule(str(root), sampler=sampler, batch_size=batch_size, cache=False, progress=False, seed=3)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        dm.setup("fit")
        out.append(dm.train_dataloader())
    return out


def rows(batch: dict) -> list[tuple[int, int]]:
    return list(zip(batch["object"].tolist(), batch["view"].tolist()))


def test_ranks_see_disjoint_shares_of_one_global_order(root):
    for epoch in (0, 1):
        ranks = loaders(root, "random", world=2, batch_size=2)
        (single,) = loaders(root, "random", world=1, batch_size=4)
        for loader in (*ranks, single):
            _set_sampler_epoch(loader, epoch)  # as Lightning does at every epoch start
        per_rank = [[rows(b) for b in loader] for loader in ranks]
        whole = [rows(b) for b in single]
        assert len(per_rank[0]) == len(per_rank[1]) == len(whole) == 4
        for a, b, both in zip(*per_rank, whole):
            assert not set(a) & set(b) and set(a) | set(b) == set(both)
        seen = [r for batches in per_rank for b in batches for r in b]
        assert len(seen) == len(set(seen)) == 16  # 18 images: 9 per rank, 4 full batches of 2 each
    assert whole != [rows(b) for b in loaders(root, "random", world=1, batch_size=4)[0]]  # epochs reshuffle


def test_distinct_caption_batches_alternate_between_ranks_and_follow_the_epoch(root):
    ranks = loaders(root, "distinct_caption", world=2, batch_size=3)
    for loader in ranks:
        _set_sampler_epoch(loader, 1)  # reaches the batch sampler through the resumable wrapper
    captions = loaders(root, "distinct_caption", world=1, batch_size=3)[0].dataset.caption_ids
    whole = list(DistinctCaptionBatchSampler(captions, 3, seed=3, batches_per_epoch=len(captions) // 3))
    whole1 = DistinctCaptionBatchSampler(captions, 3, seed=3, batches_per_epoch=len(captions) // 3)
    whole1.set_epoch(1)
    whole1 = list(whole1)
    assert whole1 != whole
    for rank, loader in enumerate(ranks):
        got = [b["caption"].tolist() for b in loader]
        assert got == [captions[i].tolist() for i in whole1[rank::2]]
        assert all(len(set(b)) == 3 for b in got)


def test_resumable_loader_skips_the_batches_already_served(root):
    (loader,) = loaders(root, "random", world=1, batch_size=4)
    _set_sampler_epoch(loader, 2)
    full = [rows(b) for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    (fresh,) = loaders(root, "random", world=1, batch_size=4)
    fresh.load_state_dict(state)
    assert [rows(b) for b in fresh] == full[2:]  # the rest of epoch 2, nothing read twice
    assert [rows(b) for b in fresh] == full  # the next pass is a whole epoch again


def test_slurm_launcher_composes_with_gpus_nodes_time_and_partition():
    cfg = compose_config("train", [
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4", "model=ddpm",
        "hydra.launcher.timeout_min=720", "hydra.launcher.partition=gpu-long", "hydra.launcher.account=proj42",
        "data.batch_size=64",
    ])
    launcher = HydraConfig.get().launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 8, 8)  # from the trainer
    assert (launcher.timeout_min, launcher.partition, launcher.account) == (720, "gpu-long", "proj42")
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue, with a warning signal first
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 8, 4)
    assert cfg.data.batch_size == 64  # per device: the global batch is 64 × 8 × 4
