"""DdpmModule, the noise schedule helpers and the sampling loop (CPU, tiny UNets, flat-square images)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from tiny_guides import SIZE, VOCAB, tiny_cond_ddpm

from clipdiff.diffusion.sampling import sample
from clipdiff.diffusion.schedule import check_compatible, sampling_scheduler, train_scheduler
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.unet import build_unet, load_ddpm
from clipdiff.models.ddpm_module import DdpmModule
from clipdiff.train import train

TINY_UNET = [
    "model.unet.block_out_channels=[8,16]",
    "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]",
    "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]",
    "model.unet.attention_head_dim=8",
    "model.unet.norm_num_groups=4",
]
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon", "clip_sample": True}



def compose_train(root: Path, run_dir: Path, *overrides: str):
    model = next((o for o in overrides if o.startswith("model=")), "model=ddpm")
    overrides = tuple(o for o in overrides if o != model)
    return compose_config("train", [
            model, f"data.root={root}", f"data.captions={root}/cars_text", "data.image_size=16",
            "data.batch_size=4", "data.eval_batch_size=4", "data.cache=false", "data.progress=false",
            f"paths.run_dir={run_dir}", "logger=csv", "trainer.enable_progress_bar=false",
            "model.num_sample_images=4", "model.sample_steps=2",
            *TINY_UNET, *overrides])


def tiny_module(**kw) -> DdpmModule:
    unet = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "layers_per_block": 1}
    return DdpmModule(unet=unet, diffusion=dict(LINEAR), image_size=16, **kw)


def test_train_from_composed_config_exports(flat_root, tmp_path):
    cfg = compose_train(flat_root, tmp_path / "run", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
                        "trainer.log_every_n_steps=1")
    metrics, objs = train(cfg)
    assert "val/loss" in metrics and torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert list((tmp_path / "run" / "samples").glob("epoch000-*.png")), "no periodic sample grid written"
    unet, schedule = load_ddpm(tmp_path / "run" / "export.pt")
    assert schedule == dict(cfg.diffusion) and unet.config.sample_size == 16
    ema = objs["model"].ema.module.state_dict()
    raw = objs["model"].unet.state_dict()
    exported = unet.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # the export holds the EMA weights …
    assert any(not torch.equal(exported[k], raw[k]) for k in raw)  # … not the raw ones


def test_loss_falls_when_overfitting(flat_root):
    torch.manual_seed(0)
    from clipdiff.data.datamodule import CarsDataModule

    dm = CarsDataModule(str(flat_root), image_size=16, cache=False, progress=False)
    images = dm._dataset("train").float_images(range(6))
    model = tiny_module()
    opt = torch.optim.AdamW(model.unet.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((6, 3, 16, 16), generator=gen)
    t = torch.tensor([50, 150, 300, 450, 600, 800])
    x0 = images * 2 - 1
    losses = []
    for _ in range(80):
        loss = model.diffusion_loss(model.unet, x0, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_ema_survives_save_and_resume(flat_root, tmp_path):
    run = tmp_path / "run"
    cfg = compose_train(flat_root, run, "trainer.limit_train_batches=3", "trainer.max_epochs=1", "model.ema_decay=0.5",
                        "model.sample_every_n_epochs=null")
    _, _objs = train(cfg)
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    ema_saved = {k: v for k, v in saved.items() if k.startswith("ema.")}
    assert ema_saved and int(ema_saved["ema.n_averaged"]) == 3
    assert any(not torch.equal(ema_saved["ema.module." + k[len("unet."):]], v) for k, v in saved.items()
               if k.startswith("unet."))  # EMA differs from the raw weights, so the test below can fail

    reloaded = DdpmModule.load_from_checkpoint(last, map_location="cpu", weights_only=False)
    for k, v in reloaded.state_dict().items():
        if k.startswith("ema."):
            assert torch.equal(v, ema_saved[k]), k

    # resume for one more epoch: the trainer restores the EMA and keeps averaging from it (n_averaged counts on)
    cfg2 = compose_train(flat_root, run, "trainer.limit_train_batches=3", "trainer.max_epochs=2", "model.ema_decay=0.5",
                         "model.sample_every_n_epochs=null", f"ckpt_path={last}")
    _, _objs2 = train(cfg2)
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(resumed["ema.n_averaged"]) == 6


def test_ddim_from_training_schedule_has_same_noise():
    for schedule in (LINEAR, {**LINEAR, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}):
        ddpm = train_scheduler(schedule)
        for kind in ("ddim", "ddpm"):
            s = sampling_scheduler(schedule, kind, timestep_spacing="trailing")
            assert torch.equal(s.betas, ddpm.betas) and torch.equal(s.alphas_cumprod, ddpm.alphas_cumprod)
            assert s.config.prediction_type == schedule["prediction_type"]
    with pytest.raises(ClipdiffError, match="noise schedule"):
        sampling_scheduler(LINEAR, "ddim", beta_end=0.03)


def test_schedule_compatibility_check_names_the_key():
    check_compatible(LINEAR, {k: v for k, v in LINEAR.items() if k != "clip_sample"})  # defaults fill in
    check_compatible(LINEAR, {**LINEAR, "prediction_type": "v_prediction"})  # not a noise key
    with pytest.raises(ClipdiffError, match="beta_schedule is 'linear' in ddpm but 'squaredcos_cap_v2' in noisy_clip"):
        check_compatible(LINEAR, {**LINEAR, "beta_schedule": "squaredcos_cap_v2"}, names=("ddpm", "noisy_clip"))
    with pytest.raises(ClipdiffError, match="num_train_timesteps"):
        check_compatible(LINEAR, {**LINEAR, "num_train_timesteps": 500})
    with pytest.raises(ClipdiffError, match="unknown key"):
        train_scheduler({**LINEAR, "beta_sched": "linear"})


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sampling_is_reproducible_for_a_seed(kind):
    torch.manual_seed(0)
    unet = build_unet({"sample_size": 8, "block_out_channels": [8, 8], "norm_num_groups": 4, "layers_per_block": 1,
                       "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]})
    unet.eval()

    def draw(seed, **kw):
        return sample(unet, sampling_scheduler(LINEAR, kind), 5, generator=torch.Generator().manual_seed(seed),
                      steps=4, batch_size=2, progress=False, **kw)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (5, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)

    seen = []

    def cond_fn(x, t, eps, index):  # the guidance hook sees every batch and step and can move the samples
        seen.append((int(index[0]), t))
        return eps + 0.5

    guided = draw(0, cond_fn=cond_fn)
    assert {i for i, _ in seen} == {0, 2, 4} and len(seen) == 3 * 4
    assert not torch.allclose(guided, a)


def test_loop_matches_diffusers_ddim_pipeline():
    from diffusers import DDIMPipeline

    torch.manual_seed(0)
    unet = build_unet({"sample_size": 8, "block_out_channels": [8, 8], "norm_num_groups": 4, "layers_per_block": 1,
                       "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]})
    ours = sample(unet, sampling_scheduler(LINEAR, "ddim"), 3, generator=torch.Generator().manual_seed(3), steps=5,
                  progress=False)
    pipe = DDIMPipeline(unet=unet, scheduler=sampling_scheduler(LINEAR, "ddim"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(3), num_inference_steps=5, output_type="np",
               use_clipped_model_output=True).images  # the loop steps with the eps of the clamped x0_hat
    assert torch.allclose(ours.permute(0, 2, 3, 1), torch.from_numpy(ref), atol=1e-5)


def test_v_prediction_cond_fn_identity_changes_nothing():
    torch.manual_seed(0)
    unet = build_unet({"sample_size": 8, "block_out_channels": [8, 8], "norm_num_groups": 4, "layers_per_block": 1,
                       "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]})
    v_sched = {**LINEAR, "prediction_type": "v_prediction"}
    kw = {"steps": 4, "progress": False}
    a = sample(unet, sampling_scheduler(v_sched), 3, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(unet, sampling_scheduler(v_sched), 3, generator=torch.Generator().manual_seed(0),
               cond_fn=lambda x, t, eps, i: eps, **kw)
    assert torch.allclose(a, b, atol=1e-5)


def test_wrong_image_size_is_one_clear_error():
    model = tiny_module()
    with pytest.raises(ClipdiffError, match="data.image_size=16"):
        model.training_step({"image": torch.rand(2, 3, 32, 32)}, 0)


def test_unconditional_ddpm_trains_on_a_root_without_captions(flat_root, tmp_path):
    """The unconditional DDPM reads no captions: it trains (one step) and exports on a root without ``cars_text``;
    a model that needs captions, or caption-balanced batches, stop there with the one-line caption-file error."""
    import shutil

    shutil.rmtree(flat_root / "cars_text")
    cfg = compose_train(flat_root, tmp_path / "run", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                        "trainer.max_epochs=1", "model.sample_every_n_epochs=null")
    metrics, objs = train(cfg)
    assert objs["datamodule"].vocab is None and "caption" not in next(iter(objs["datamodule"].train_dataloader()))
    assert torch.isfinite(torch.tensor(metrics["val/loss"])) and (tmp_path / "run" / "export.pt").is_file()
    # caption-balanced batches need the captions even for the unconditional DDPM: then the label file is read
    balanced = compose_train(flat_root, tmp_path / "balanced", "data.sampler=distinct_caption")
    for bad in (balanced, compose_train(flat_root, tmp_path / "cond", "model=ddpm_cond"),
                compose_config("train", ["model=clip", f"data.root={flat_root}", "data.cache=false", "logger=csv",
                                         f"paths.run_dir={tmp_path / 'clip'}"])):
        with pytest.raises(ClipdiffError, match=r"^caption file .*cars_text/cars_train.tsv does not exist: run "):
            train(bad)


def test_conditional_ddpm_trains_and_exports_its_vocabulary(flat_root, tmp_path):
    """model=ddpm_cond: one training step, the best checkpoint reloaded (hyperparameters with the vocabulary), an
    export that carries the vocabulary and the null id, and a pipeline that offers cfg on it."""
    from clipdiff.models.ddpm_module import CondDdpmModule
    from clipdiff.pipelines.guided import GuidedPipeline

    cfg = compose_train(flat_root, tmp_path / "run", "model=ddpm_cond", "model.p_uncond=0.2",
                        "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.max_epochs=1",
                        "model.sample_every_n_epochs=null")
    _, objs = train(cfg)
    model, vocab = objs["model"], objs["datamodule"].vocab.to_list()
    assert isinstance(model, CondDdpmModule) and model.vocabulary == vocab and model.hparams.p_uncond == 0.2
    export = torch.load(tmp_path / "run" / "export.pt", weights_only=False)
    assert export["vocabulary"] == vocab and export["null_id"] == len(vocab) == 4
    assert export["unet_config"]["num_class_embeds"] == len(vocab) + 1
    pipe = GuidedPipeline.from_exports(tmp_path / "run" / "export.pt")
    assert pipe.vocabulary == vocab and pipe.methods == ["none", "cfg"]
    out = pipe("a red car", method="cfg", num_samples=2, sampler="ddim", steps=2)
    assert out.images.shape == (2, 3, 16, 16) and out.captions == vocab
    grid = model.sample_images(3, steps=2)  # the sample grids: conditional, cycling through the captions
    assert grid.shape == (3, 3, 16, 16)
    with pytest.raises(ClipdiffError, match=r"^model\.unet\.num_class_embeds=3 but the data has 4 captions"):
        train(compose_train(flat_root, tmp_path / "bad", "model=ddpm_cond", "+model.unet.num_class_embeds=3"))


def test_condition_dropout_in_training_batches_matches_p_uncond():
    """Each training sample's caption is replaced by the null id with probability p_uncond (seeded), independently
    per sample; the kept ones are the batch's captions."""
    captions = torch.arange(64) % len(VOCAB)
    batch = {"image": torch.rand(64, 3, SIZE, SIZE), "caption": captions}

    def labels_seen(p: float, seed: int = 0, steps: int = 50) -> torch.Tensor:
        model = tiny_cond_ddpm(p_uncond=p)
        seen = []
        model.diffusion_loss = lambda net, x0, noise, t, labels=None: (seen.append(labels), torch.zeros(()))[1]
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            for i in range(steps):
                model.training_step(batch, i)
        return torch.stack(seen)

    null = len(VOCAB)
    got = labels_seen(0.2)
    dropped = got == null
    assert abs(dropped.float().mean().item() - 0.2) < 0.03  # 3200 draws: sd 0.007
    assert torch.equal(got[~dropped], captions.expand_as(got)[~dropped])
    assert ((dropped.sum(1) > 0) & (dropped.sum(1) < 64)).all()  # per sample, not per batch
    assert torch.equal(got, labels_seen(0.2))  # the same seed: the same drops
    assert not torch.equal(got, labels_seen(0.2, seed=1))
    assert (labels_seen(0.0, steps=5) != null).all() and (labels_seen(1.0, steps=5) == null).all()
    with pytest.raises(ClipdiffError, match=r"^model\.p_uncond=1\.5 must be a number in \[0, 1\]"):
        tiny_cond_ddpm(p_uncond=1.5)
