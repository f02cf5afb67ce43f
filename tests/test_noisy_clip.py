"""The timestep-aware noisy CLIP: conditioning, schedule, a run from the composed config, export, bucket metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf

from clipdiff.diffusion.schedule import check_compatible, schedule_config, train_scheduler
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.clip import ClipClassifier, create_clip, tokenizer_for
from clipdiff.models.components.noisy_clip import load_noisy_clip
from clipdiff.models.export import save_export
from clipdiff.models.metrics.noisy import TimestepBucketMetrics, bucket_edges, fixed_noisy_batch
from clipdiff.models.noisy_clip_module import NoisyClipModule
from clipdiff.train import train

VOCAB = ["a blue car", "a red car", "a white and red car", "a white car", "a white jeep/bus"]
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
# noisy_run trains once: on one xdist worker for the whole module (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_noisy_clip")


def compose_train(overrides: list[str]):
    return compose_config("train", overrides)


def clip_export(path: Path, vocabulary: list[str], seed: int = 0) -> Path:
    """A clean CLIP export (random tiny weights, non-default logit scale) to initialise from."""
    torch.manual_seed(seed)
    model, cfg, pp = create_clip("clipdiff-tiny-32")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    clf = ClipClassifier(model, vocabulary, tokenizer_for(cfg, "clipdiff-tiny-32"), 32, pp["mean"], pp["std"],
                         model_cfg=cfg, model_name="clipdiff-tiny-32")
    return clf.export(path)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """Two training steps + validation from the composed config, with the cosine schedule and a CLIP init."""
    from conftest import write_srn

    tmp = tmp_path_factory.mktemp("noisy")
    root = write_srn(tmp / "flat", {
        "cars_train": {"a1": "a red car", "a2": "a blue car", "a3": "a white car", "a4": "a white car"},
        "cars_val": {"b1": "a red car", "b2": "a white car", "b3": "a blue car"},
        "cars_test": {"c1": "a blue car"},
    })
    init = clip_export(tmp / "clip_export.pt", ["a white car", "a red car"])  # another vocabulary than the data's
    run_dir = tmp / "run"
    cfg = compose_train([
        "model=noisy_clip", "diffusion=cosine_1000", f"model.init_from={init}", f"data.root={root}",
        "data.cache=false", "data.batch_size=6", "data.progress=false", "trainer.max_steps=2",
        "trainer.enable_progress_bar=false", "logger=csv", f"paths.run_dir={run_dir}",  # logit_adjust: the default 1
    ])
    metrics, objects = train(cfg)
    return run_dir, cfg, metrics, objects, init


def test_fast_run_logs_per_bucket_metrics_and_writes_export_and_plot(noisy_run):
    run_dir, cfg, metrics, objects, _ = noisy_run
    assert (run_dir / "export.pt").is_file()
    assert objects["trainer"].global_step == 2
    for key in ("val/acc_caption", "val/ece", "val/acc_upper", "val/acc_t000", "val/acc_t900", "val/ece_t500",
                "val/clean_acc_caption", "val/clean_acc_t900", "val/acc_majority", "train/loss"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert "val/acc_t950" not in metrics  # ten buckets of 100 timesteps
    png = run_dir / "noisy_eval" / "val_epoch000_acc_vs_t.png"
    assert png.stat().st_size > 5000
    table = (run_dir / "noisy_eval" / "val_epoch000_acc_vs_t.tsv").read_text().splitlines()
    assert table[0].split("\t")[:6] == ["t_lo", "t_hi", "n", "acc_noisy CLIP", "acc_clean CLIP", "acc_macro_noisy CLIP"]
    assert len(table) == 11 and table[-1].split("\t")[:3] == ["900", "999", "9"]  # 3 objects × 3 views per bucket
    assert "val/acc_t000" in (run_dir / "csv" / "metrics.csv").read_text()
    assert OmegaConf.select(cfg, "model.monitor.metric") == "val/acc_caption"


def test_logit_adjustment_adds_the_training_caption_prior(noisy_run):
    _, _, _, objects, _ = noisy_run
    trained = objects["trainer"].lightning_module
    vocab = objects["datamodule"].vocab.to_list()
    views = len(objects["datamodule"]._dataset("train")) // 4  # 4 training objects, the same number of views each
    objs = torch.tensor([{"a red car": 1, "a blue car": 1, "a white car": 2}.get(c, 0) for c in vocab], dtype=torch.float)
    counts = objs * views  # training images per caption
    expected = ((counts + 1) / (counts.sum() + len(vocab))).log()  # the add-one smoothed prior of the train split
    assert torch.allclose(trained.log_prior, expected)
    assert vocab[int(trained.log_prior.argmax())] == "a white car"


def train_prior(objects) -> torch.Tensor:
    """log p(caption) of the fixture's training split, counted here (add-one smoothed)."""
    vocab = objects["datamodule"].vocab.to_list()
    views = len(objects["datamodule"]._dataset("train")) // 4
    objs = torch.tensor([{"a red car": 1, "a blue car": 1, "a white car": 2}.get(c, 0) for c in vocab], dtype=torch.float)
    return ((objs * views + 1) / (objs.sum() * views + len(vocab))).log()


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_training_cross_entropy_is_on_the_guides_raw_logits_plus_tau_log_prior(noisy_run, tau, monkeypatch):
    """The caption loss is F.cross_entropy(raw + τ·log prior, y), where raw are the logits the guide reads."""
    from clipdiff.utils.images import float_images

    _, _, _, objects, _ = noisy_run
    module: NoisyClipModule = objects["trainer"].lightning_module
    assert module.loss_weights["logit_adjust"] == 1.0  # the default of conf/model/noisy_clip.yaml
    seen = {}
    encode = module.guide.encode_image

    def spy(x_t, t, *args, **kw):
        seen["x_t"], seen["t"] = x_t.detach(), t
        return encode(x_t, t, *args, **kw)

    monkeypatch.setattr(module.guide, "encode_image", spy)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    weights = dict(module.loss_weights)
    module.loss_weights.update(contrastive=0.0, caption_ce=1.0, logit_adjust=tau)
    try:
        module.setup("fit")
        batch = next(iter(objects["datamodule"].train_dataloader()))
        batch = {**batch, "image": float_images(batch["image"])}
        with torch.no_grad():
            loss = module.training_step(batch, 0)
            raw = load_noisy_clip(noisy_run[0] / "export.pt").logits(seen["x_t"], seen["t"])
    finally:
        module.loss_weights.update(weights)
        module.setup("fit")
    expected = F.cross_entropy(raw + tau * train_prior(objects), batch["caption"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(loss) != pytest.approx(float(F.cross_entropy(raw, batch["caption"])), rel=1e-3)


def test_guidance_reads_the_prior_free_logits(noisy_run):
    """The sampler's noisy-CLIP guide scores with the raw logits (the module's forward), not raw + log prior."""
    from clipdiff.diffusion.guidance import NoisyClipGuidance, score
    from clipdiff.diffusion.schedule import sampling_scheduler

    run_dir, cfg, _, objects, _ = noisy_run
    module: NoisyClipModule = objects["model"].eval()
    model = load_noisy_clip(run_dir / "export.pt")
    ids = torch.tensor([model.vocabulary.index(c) for c in ("a red car", "a blue car", "a white car")])
    cond = NoisyClipGuidance().cond_fn(model, ids, [], sampling_scheduler(cfg.diffusion, "ddim"))
    x_t, t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)), 300
    with torch.no_grad():
        raw = module(x_t, torch.full((3,), t))
        read = cond.guide.logits(x_t, t)
    torch.testing.assert_close(read, raw, atol=1e-5, rtol=1e-5)
    with_prior = score(raw + train_prior(objects), ids, "classifier")
    assert (score(read, ids, "classifier") - with_prior).abs().max() > 0.1


def test_schedule_is_the_configured_one_in_module_and_export(noisy_run):
    run_dir, cfg, _, objects, _ = noisy_run
    expected = schedule_config(cfg.diffusion)
    assert expected["beta_schedule"] == "squaredcos_cap_v2"
    module: NoisyClipModule = objects["model"]
    assert module.schedule == expected and module.hparams.schedule["beta_schedule"] == "squaredcos_cap_v2"
    assert torch.equal(module.noise_scheduler.alphas_cumprod, train_scheduler(expected).alphas_cumprod)
    guide = load_noisy_clip(run_dir / "export.pt")
    assert guide.schedule == expected
    ckpt = torch.load(next((run_dir / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["schedule"]["beta_schedule"] == "squaredcos_cap_v2"


def test_schedule_mismatch_is_one_clear_line(noisy_run):
    run_dir, cfg, _, _, _ = noisy_run
    with pytest.raises(ClipdiffError) as err:
        load_noisy_clip(run_dir / "export.pt", schedule=LINEAR)
    msg = str(err.value)
    assert "\n" not in msg and "beta_schedule" in msg and "the noisy CLIP" in msg
    guide = load_noisy_clip(run_dir / "export.pt", schedule=OmegaConf.to_container(cfg.diffusion))  # same: fine
    with pytest.raises(ClipdiffError, match="num_train_timesteps"):
        check_compatible({**guide.schedule, "num_train_timesteps": 500}, guide.schedule)


def test_export_loads_without_lightning_and_gives_identical_differentiable_logits(noisy_run, tmp_path):
    run_dir, _, _, objects, _ = noisy_run
    module: NoisyClipModule = objects["model"].eval()
    guide = load_noisy_clip(run_dir / "export.pt")
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    assert guide.vocabulary == objects["datamodule"].vocab.to_list() and guide.image_size == 32
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 32, 32, generator=gen)
    t = torch.tensor([0, 250, 600, 999])
    with torch.no_grad():
        expected = module(x_t, t)
    assert torch.allclose(guide.logits(x_t, t), expected, atol=1e-5)
    assert guide.text_features.shape == (len(guide.vocabulary), 64)
    assert torch.allclose(guide.text_features.norm(dim=-1), torch.ones(len(guide.vocabulary)))
    assert torch.allclose(guide.encode_image(x_t, 5).norm(dim=-1), torch.ones(4))
    # the text tower is the clean CLIP's: a vocabulary caption encodes to its cached feature
    assert torch.allclose(guide.encode_text([guide.vocabulary[1]])[0], guide.text_features[1], atol=1e-6)
    x = x_t.clone().requires_grad_(True)
    guide.logits(x, t)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert guide.logits(torch.randn(2, 3, 64, 64), 10).shape == (2, len(guide.vocabulary))  # resized to 32 px
    # wrong kinds and missing files: one line naming the key
    with pytest.raises(ClipdiffError, match="holds a clip model, but a noisy_clip model"):
        load_noisy_clip(noisy_run[4], key="guidance.noisy_clip")
    with pytest.raises(ClipdiffError, match="noisy_clip_ckpt=.*does not exist"):
        load_noisy_clip(tmp_path / "nothing.pt")


def test_zero_init_equals_the_clean_clip_and_training_makes_t_matter(noisy_run, tmp_path):
    _, _, _, objects, init = noisy_run
    x_t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fresh = NoisyClipModule(VOCAB, LINEAR, init_from=str(init)).eval()
    with torch.no_grad():
        clean = fresh.clean.encode_image((x_t + 1) / 2)
        for t in (0, 500, 999):
            assert torch.equal(fresh.guide.encode_image(x_t, t), clean)
    assert fresh.guide.logit_scale.item() == pytest.approx(20.0, rel=1e-5)  # the init's weights were loaded
    trained: NoisyClipModule = objects["model"].eval()
    assert trained.guide.time_embed.linear_2.weight.abs().sum() > 0
    with torch.no_grad():
        f0, f1 = trained.guide.encode_image(x_t, 0), trained.guide.encode_image(x_t, 999)
        per_sample = trained.guide.encode_image(x_t, torch.tensor([0, 999, 0]))
    assert not torch.allclose(f0, f1)
    assert torch.allclose(per_sample[0], f0[0]) and torch.allclose(per_sample[1], f1[1])


def test_text_tower_is_frozen_by_default_and_trainable_by_config(noisy_run):
    _, _, _, objects, init = noisy_run
    module: NoisyClipModule = objects["model"]
    text = module.guide.clip.model.token_embedding.weight
    assert not text.requires_grad and torch.equal(text, module.clean.model.token_embedding.weight)
    assert module.guide.clip.model.visual.conv1.weight.requires_grad
    unfrozen = NoisyClipModule(VOCAB, LINEAR, init_from=str(init), freeze_text=False)
    assert unfrozen.guide.clip.model.token_embedding.weight.requires_grad


def test_bucket_metrics_on_hand_made_logits():
    m = TimestepBucketMetrics(3, num_timesteps=1000, num_buckets=10, prefix="val/", name="clean_")
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.tensor([5, 99, 100, 550, 999, 950])
    pred = torch.tensor([0, 1, 0, 0, 2, 2])  # bucket 0: 2/2, bucket 1: 0/1, bucket 5: 1/1, bucket 9: 1/2
    logits = torch.full((6, 3), -20.0).scatter(1, pred[:, None], 20.0)  # confidence ≈ 1 for every row
    m.update(logits[:3], target[:3], t[:3])
    m.update(logits[3:], target[3:], t[3:])
    out = m.compute()
    assert out["val/clean_acc_caption"] == pytest.approx(4 / 6)
    assert out["val/clean_acc_t000"] == pytest.approx(1.0) and out["val/clean_acc_t100"] == pytest.approx(0.0)
    assert out["val/clean_acc_t500"] == pytest.approx(1.0) and out["val/clean_acc_t900"] == pytest.approx(0.5)
    assert math.isnan(out["val/clean_acc_t300"])  # empty bucket
    assert out["val/clean_acc_upper"] == pytest.approx(2 / 3)  # t >= 500
    assert out["val/clean_acc_majority"] == pytest.approx(2 / 6)  # always answering caption 0 (or 1, or 2)
    # balanced: bucket 9 holds caption 1 (wrong) and caption 2 (right); overall per caption 2/2, 1/2, 1/2
    assert out["val/clean_acc_macro_t900"] == pytest.approx(0.5)
    assert out["val/clean_acc_caption_macro"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # fully confident: calibration error = 1 - accuracy
    assert out["val/clean_ece"] == pytest.approx(2 / 6, abs=1e-4)
    assert out["val/clean_ece_t900"] == pytest.approx(0.5, abs=1e-4)
    rows = m.per_bucket()
    assert [r["n"] for r in rows] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2] and rows[9]["t_hi"] == 999
    m.reset()
    assert all(r["n"] == 0 for r in m.per_bucket())


def test_fixed_validation_noise_covers_every_bucket_and_repeats():
    sched = train_scheduler(LINEAR)
    edges = bucket_edges(1000, 10)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    x_t, t, index = fixed_noisy_batch(x0, sched, edges, seed=3)
    assert x_t.shape == (40, 3, 8, 8) and torch.equal(index, torch.arange(4).repeat(10))
    assert torch.equal(t // 100, torch.arange(10).repeat_interleave(4))
    again = fixed_noisy_batch(x0, sched, edges, seed=3)
    assert torch.equal(again[0], x_t) and torch.equal(again[1], t)
    assert not torch.equal(fixed_noisy_batch(x0, sched, edges, seed=4)[1], t)
    # high-t rows are almost pure noise, low-t rows almost the image
    low, high = t < 100, t >= 900
    assert (x_t[low] - x0[index[low]]).abs().mean() < 0.2 < (x_t[high] - x0[index[high]]).abs().mean()


def test_init_from_must_be_a_clip_export(tmp_path):
    ddpm = save_export(tmp_path / "ddpm.pt", "ddpm", config={}, state_dict={})
    with pytest.raises(ClipdiffError, match="model.init_from=.*holds a ddpm model"):
        NoisyClipModule(VOCAB, LINEAR, init_from=str(ddpm))
    with pytest.raises(ClipdiffError, match="model.init_from=.*does not exist"):
        NoisyClipModule(VOCAB, LINEAR, init_from=str(tmp_path / "missing.pt"))
