"""Classifier-free guidance (``model=ddpm_cond``, ``guidance=cfg`` / ``cfg_noisy_clip``) and the guidance options of
issue 16 (scale schedule, self-recurrence, norm-based guidance), on tiny untrained models: their caption embeddings
are random, so eps_cond differs from eps_null and every equality below could fail."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import compose_config
from tiny_guides import (
    SIZE,
    VOCAB,
    cond_ddpm_export,
    ddpm_export,
    demo_schedule,
    tiny_noisy_clip,
)

from clipdiff.diffusion.guidance import (
    GUIDANCE,
    CfgEps,
    CfgGuidance,
    CfgNoisyClipGuidance,
    GuidedEps,
    NoisyClipGuidance,
    schedule_factor,
)
from clipdiff.diffusion.sampling import Sampler, renoise, sample, step_options
from clipdiff.diffusion.schedule import eps_change_as_output, sampling_scheduler, to_eps
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.unet import load_ddpm
from clipdiff.pipelines.guided import GuidedPipeline

TARGETS = ["a red car", "a blue car", "a green jeep/bus", "a white car"] * 2
STEPS = 5
BATCH = 5  # two batches of 8 samples: the per-sample caption ids follow the loop's index



SAMPLER = Sampler.preset("ddim_stochastic").replace(steps=STEPS)  # DDIM eta 1: the generator is drawn every step


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    schedule = demo_schedule()
    return {"cond": cond_ddpm_export(tmp / "cond.pt", schedule), "plain": ddpm_export(tmp / "plain.pt", schedule),
            "noisy": tiny_noisy_clip(schedule=schedule).export(tmp / "noisy.pt"), "schedule": schedule}


@pytest.fixture(scope="module")
def pipe(exports):
    unet, schedule, vocabulary = load_ddpm(exports["cond"], with_vocabulary=True)
    assert vocabulary == VOCAB and unet.config.num_class_embeds == len(VOCAB) + 1
    return GuidedPipeline(unet, schedule, {"noisy_clip": tiny_noisy_clip(schedule=schedule)}, vocabulary=vocabulary)


@pytest.fixture(scope="module")
def plain(exports):
    unet, schedule = load_ddpm(exports["plain"])
    return GuidedPipeline(unet, schedule, {"noisy_clip": tiny_noisy_clip(schedule=schedule)})


def draw(pipe, method: str, scale: float | None = None, guidance=None, **kw):
    prompts = None if method == "none" else TARGETS
    return pipe(prompts, method=method, guidance=guidance, scale=scale, num_samples=len(TARGETS), sampler=SAMPLER,
                seed=3, batch_size=BATCH, **kw)


def ids() -> torch.Tensor:
    return torch.tensor([VOCAB.index(c) for c in TARGETS])


def plain_sample(pipe, class_labels=None):
    """The sampling loop itself on the conditional UNet (no cond_fn): ``class_labels`` or the null id."""
    return sample(pipe.unet, SAMPLER.scheduler(pipe.schedule), len(TARGETS), generator=torch.Generator().manual_seed(3),
                  steps=STEPS, batch_size=BATCH, eta=SAMPLER.eta, progress=False, class_labels=class_labels)


# -- classifier-free guidance -------------------------------------------------------------------------------------
def test_cfg_at_w0_is_null_condition_sampling_and_at_w1_conditional_sampling(pipe):
    null, conditional = plain_sample(pipe), plain_sample(pipe, ids())
    assert not torch.allclose(null, conditional, atol=1e-3)  # the condition matters: the test can fail
    assert torch.equal(draw(pipe, "none").images, null)  # unguided = the null condition, bit for bit
    assert torch.equal(draw(pipe, "cfg", 0.0).images, null)  # eps_null + 0·(…) is eps_null exactly
    # w = 1: out_null + (out_cond − out_null) (v-prediction): the conditional output up to one rounding
    torch.testing.assert_close(draw(pipe, "cfg", 1.0).images, conditional, rtol=0, atol=1e-5)


def test_the_loop_calls_the_unet_on_the_null_id_then_cfg_on_each_samples_caption(pipe):
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    try:
        out = draw(pipe, "cfg", 3.0)
    finally:
        hook.remove()
    null = len(VOCAB)
    assert len(seen) == 2 * STEPS * 2  # two batches, two UNet calls per step
    first = seen[: 2 * STEPS]  # batch 0: samples 0…4
    assert all((c == null).all() for c in first[0::2]) and all(torch.equal(c, ids()[:BATCH]) for c in first[1::2])
    assert torch.equal(seen[-1], ids()[BATCH:])
    assert out.guide_logits is None and out.targets.tolist() == ids().tolist() and out.captions == VOCAB
    assert out.guided_steps == 2 * STEPS and all(math.isnan(s["score"]) and s["eps_shift_rms"] > 0 for s in out.steps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_cfg_step_moves_eps_further_from_eps_null_along_the_condition(pipe, prediction):
    """eps_w − eps_null = w·(eps_cond − eps_null): at w = 3 three times as far as the conditional eps, in the same
    direction. The combination is made on the model's outputs (v or eps): the same, the map being affine."""
    unet = pipe.unet
    sched = sampling_scheduler({**pipe.schedule, "prediction_type": prediction}, "ddim")
    sched.set_timesteps(10)
    t = int(sched.timesteps[4])
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels, null, index = ids()[:4], torch.full((4,), len(VOCAB)), torch.arange(4)
    abar = sched.alphas_cumprod
    with torch.no_grad():
        out_null, out_cond = unet(x, t, class_labels=null).sample, unet(x, t, class_labels=labels).sample
        cond = CfgGuidance(scale=3.0).check().cfg_fn(unet, labels, sched)
        out_w = cond.output(x, t, out_null, index)  # the loop's first stage
        eps_null, eps_cond, eps_w = (to_eps(o, x, t, abar, prediction) for o in (out_null, out_cond, out_w))
        assert torch.equal(cond(x, t, eps_w, index), eps_w)  # no gradient guide after it
    torch.testing.assert_close(out_w, out_null + 3.0 * (out_cond - out_null), rtol=0, atol=1e-6)
    d, moved = (eps_cond - eps_null).flatten(1), (eps_w - eps_null).flatten(1)
    torch.testing.assert_close(moved, 3.0 * d, rtol=1e-3, atol=1e-5)
    assert (torch.nn.functional.cosine_similarity(moved, d) > 0.9999).all()
    assert (moved.norm(dim=1) > 2.99 * d.norm(dim=1)).all() and (d.norm(dim=1) > 1e-3).all()
    assert cond.stats[-1]["grad_rms"] == pytest.approx(d.pow(2).mean(1).sqrt().mean().item(), rel=1e-3)
    assert cond.stats[-1]["eps_shift_rms"] == pytest.approx(moved.pow(2).mean(1).sqrt().mean().item(), rel=1e-3)


def test_cfg_noisy_clip_adds_the_noisy_clip_term_to_the_cfg_eps(pipe):
    cfg = draw(pipe, "cfg", 2.0)
    zero = draw(pipe, "cfg_noisy_clip", guidance=CfgNoisyClipGuidance(scale=0.0, cfg_scale=2.0))
    assert torch.equal(zero.images, cfg.images)  # s = 0: exactly cfg at w
    both = draw(pipe, "cfg_noisy_clip", guidance=CfgNoisyClipGuidance(scale=50.0, cfg_scale=2.0))
    assert not torch.allclose(both.images, cfg.images, atol=1e-3)
    assert both.guide_logits.shape == (len(TARGETS), len(VOCAB))  # the noisy CLIP reads the result
    assert len(both.steps) == 2 * STEPS and all(math.isfinite(s["score"]) for s in both.steps)
    cfg_shift = {s["t"]: s["eps_shift_rms"] for s in cfg.steps}
    assert any(s["eps_shift_rms"] != cfg_shift[s["t"]] for s in both.steps)  # the total change, both terms


def test_other_methods_sample_on_the_null_condition(pipe):
    """noisy_clip with a conditional DDPM is noisy_clip on eps_null: at scale → 0 the null-condition samples."""
    out = draw(pipe, "noisy_clip", 1e-9, guidance=NoisyClipGuidance(recurrence=1))  # (k > 1 re-noises: another sampler)
    torch.testing.assert_close(out.images, draw(pipe, "none").images, rtol=0, atol=1e-5)
    assert pipe.methods == ["none", "noisy_clip", "cfg", "cfg_noisy_clip"]


def test_a_conditional_export_where_an_unconditional_one_is_expected(exports, pipe):
    """load_ddpm without the vocabulary and the plain loop work (the null id: unconditional samples)."""
    unet, _ = load_ddpm(exports["cond"])
    null = sample(unet, SAMPLER.scheduler(pipe.schedule), len(TARGETS), generator=torch.Generator().manual_seed(3),
                  steps=STEPS, batch_size=BATCH, eta=SAMPLER.eta, progress=False)
    assert torch.equal(null, draw(pipe, "none").images)


def test_cfg_errors_are_one_line(exports, pipe, plain, tmp_path):
    for method in ("cfg", "cfg_noisy_clip"):
        with pytest.raises(ClipdiffError, match=rf"^method='{method}' needs a conditional DDPM \(python -m clipdiff"
                                                r"\.train model=ddpm_cond\): ddpm_ckpt is unconditional$"):
            plain.prepare("a red car", method=method, num_samples=2)
    assert plain.methods == ["none", "noisy_clip"]
    with pytest.raises(ClipdiffError, match=r"^prompt 'a purple car' is not in the conditional DDPM's vocabulary of 4 "
                                            r"captions .* no text tower"):
        pipe.prepare("a purple car", method="cfg", num_samples=2)
    with pytest.raises(ClipdiffError, match=r"^method='cfg_noisy_clip': this pipeline has none, cfg$"):
        GuidedPipeline(pipe.unet, pipe.schedule, vocabulary=VOCAB).prepare("a red car", method="cfg_noisy_clip",
                                                                           num_samples=1)
    with pytest.raises(ClipdiffError, match=r"^ddpm_ckpt: a conditional DDPM with 4 captions \+ the null id needs its "
                                            r"caption vocabulary \(0 given\)$"):
        GuidedPipeline(pipe.unet, pipe.schedule)
    with pytest.raises(ClipdiffError, match=r"^class labels were given but the DDPM is unconditional"):
        sample(plain.unet, SAMPLER.scheduler(plain.schedule), 2, steps=2, progress=False, class_labels=[0, 1])
    stripped = torch.load(exports["cond"], weights_only=False)
    stripped.pop("vocabulary")
    torch.save(stripped, tmp_path / "stripped.pt")
    with pytest.raises(ClipdiffError, match=r"^ddpm_ckpt=.*stripped.pt: a conditional DDPM \(5 class embeddings\) "
                                            r"without a matching caption vocabulary"):
        load_ddpm(tmp_path / "stripped.pt")
    for settings, msg in ((CfgGuidance(schedule="exp"), r"^guidance\.schedule='exp': choose constant or linear or cosine$"),
                          (CfgGuidance(recurrence=0), r"^guidance\.recurrence=0 must be a whole number ≥ 1"),
                          (CfgGuidance(scale=-2.0), r"^guidance\.scale=-2\.0 must be a finite number ≥ 0$"),
                          (CfgNoisyClipGuidance(cfg_scale=-1.0), r"^guidance\.cfg_scale=-1\.0 must be a finite number"),
                          (NoisyClipGuidance(normalize=True, mode="mean_shift"),
                           r"^guidance\.normalize=true sets the eps change directly: use guidance\.mode=eps$")):
        with pytest.raises(ClipdiffError, match=msg):
            settings.check("guidance", sampling_scheduler(pipe.schedule, "ddpm"))


def test_sample_cli_draws_cfg_and_refuses_it_for_an_unconditional_ddpm(exports, tmp_path):
    import json

    from clipdiff.sample import run

    common = ["prompt=a red car", "progress=false", "sampler.steps=4", "num_samples=2", "batch_size=2"]
    result = run(compose_config("sample", [f"ddpm_ckpt={exports['cond']}", "guidance=cfg", "guidance.scale=2",
                                           *common, f"paths.run_dir={tmp_path / 'cfg'}"]))
    info = json.loads((result["run_dir"] / "sample.json").read_text())
    assert info["guidance"] == {"name": "cfg", "scale": 2.0, "schedule": "constant", "recurrence": 1}
    assert info["guide_ckpt"] is None and (result["run_dir"] / "grid.png").is_file()
    result = run(compose_config("sample", [f"ddpm_ckpt={exports['cond']}", "guidance=cfg_noisy_clip",
                                           f"guide_ckpt={exports['noisy']}", *common, f"paths.run_dir={tmp_path / 'b'}"]))
    assert json.loads((result["run_dir"] / "sample.json").read_text())["guidance"]["cfg_scale"] == 3.0
    with pytest.raises(ClipdiffError, match=r"^method='cfg' needs a conditional DDPM .*: ddpm_ckpt is unconditional$"):
        run(compose_config("sample", [f"ddpm_ckpt={exports['plain']}", "guidance=cfg", *common,
                                      f"paths.run_dir={tmp_path / 'bad'}"]))


# -- self-recurrence, the scale schedule, norm-based guidance ------------------------------------------------------
def reference_sample(unet, scheduler, num_samples, generator, steps, batch_size, cond_fn, eta):
    """The sampling loop as it was before issue 16 (no class labels, no recurrence), line for line."""
    from clipdiff.diffusion.sampling import check_timesteps

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    size, channels = unet.config.sample_size, unet.config.in_channels
    pred_type, abar = scheduler.config.prediction_type, scheduler.alphas_cumprod
    step_kw = step_options(scheduler, eta)
    timesteps = check_timesteps(scheduler, steps)
    noise = torch.randn((num_samples, channels, size, size), generator=generator)
    out = []
    with torch.no_grad():
        for start in range(0, num_samples, batch_size):
            x = noise[start : start + batch_size].to(device, dtype)
            index = torch.arange(start, start + x.shape[0], device=device)
            for t in timesteps:
                model_out = unet(x, t).sample
                eps = to_eps(model_out, x, t, abar, pred_type)
                model_out = model_out + eps_change_as_output(cond_fn(x, t, eps, index) - eps, t, abar, pred_type)
                x = scheduler.step(model_out, t, x, generator=generator, **step_kw).prev_sample
            out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def reference_guided(plain, scale: float):
    """Noisy-CLIP guidance as it was before issue 16: eps − s·sqrt(1 − ā_t)·g (same gradient code)."""
    scheduler = SAMPLER.scheduler(plain.schedule)
    grad = NoisyClipGuidance(scale=scale).cond_fn(plain.guides["noisy_clip"], ids(), [], scheduler)
    abar = scheduler.alphas_cumprod.float().cpu()

    def cond_fn(x, t, eps, index):
        return eps - (scale * (1 - abar[int(t)]).sqrt()).to(eps.device, eps.dtype) * grad.grad(x, t, eps, index).to(eps.dtype)

    return reference_sample(plain.unet, scheduler, len(TARGETS), torch.Generator().manual_seed(3), STEPS, BATCH,
                            cond_fn, SAMPLER.eta)


@pytest.mark.parametrize("settings", [NoisyClipGuidance(scale=50.0, recurrence=1),
                                      NoisyClipGuidance(scale=50.0, recurrence=1, schedule="constant", normalize=False)],
                         ids=["recurrence1", "options_off"])
def test_defaults_reproduce_the_guided_samples_of_before(plain, settings):
    before = reference_guided(plain, 50.0)
    assert not torch.allclose(before, draw(plain, "none").images, atol=1e-3)  # guidance moved them
    assert torch.equal(draw(plain, "noisy_clip", guidance=settings).images, before)


def test_recurrence_repeats_the_guided_steps_only(plain):
    calls = []
    hook = plain.unet.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        out = plain(TARGETS[:2], guidance=NoisyClipGuidance(scale=50.0, window=[0.5, 1.0], recurrence=3),
                    num_samples=2, sampler=SAMPLER.replace(steps=4), seed=3)
    finally:
        hook.remove()
    assert len(calls) == 2 * 1 + 2 * 3 and out.guided_steps == 6  # steps 0, 1 unguided; steps 2, 3 three times each
    once = draw(plain, "noisy_clip", guidance=NoisyClipGuidance(scale=50.0, recurrence=1))
    twice = draw(plain, "noisy_clip", guidance=NoisyClipGuidance(scale=50.0, recurrence=2))
    assert twice.images.isfinite().all() and not torch.allclose(once.images, twice.images, atol=1e-3)


def test_renoise_draws_x_t_from_q_x_t_given_x_prev():
    """x_t = sqrt(ā_t/ā_{t'})·x_{t'} + sqrt(1 − ā_t/ā_{t'})·ε: mean and variance over many draws, for a DDIM step
    (t' = t − T/steps) and the last DDPM step (ā_{t'} = 1)."""
    schedule = demo_schedule()
    gen = torch.Generator().manual_seed(0)
    x_prev = torch.full((20000, 3, 1, 1), 0.5)
    for name, pos in (("ddim", 4), ("ddpm", -1)):
        sched = sampling_scheduler(schedule, name)
        sched.set_timesteps(10 if name == "ddim" else 1000)
        t = int(sched.timesteps[pos])
        prev = t - 100 if name == "ddim" else -1
        ratio = float(sched.alphas_cumprod[t] / (sched.alphas_cumprod[prev] if prev >= 0 else 1.0))
        x = renoise(x_prev, sched, t, gen)
        assert x.mean().item() == pytest.approx(math.sqrt(ratio) * 0.5, abs=0.01)
        assert x.var().item() == pytest.approx(1 - ratio, abs=0.02 * max(1 - ratio, 0.05))


def test_scale_schedules_rise_towards_t0_and_average_one():
    T = 1000
    for name in ("linear", "cosine"):
        m = [schedule_factor(name, t, T) for t in range(T)]
        assert m[T - 1] == pytest.approx(0.0, abs=1e-12) and m[0] == pytest.approx(2.0)
        assert all(a >= b for a, b in itertools.pairwise(m)) and sum(m) / T == pytest.approx(1.0, abs=2e-3)
    assert schedule_factor("constant", 123, T) == 1.0
    cond = CfgEps(torch.nn.Identity(), torch.zeros(1), torch.linspace(0.99, 0.01, T), 4.0, schedule="linear")
    assert cond.weight(T - 1) == pytest.approx(1.0) and cond.weight(0) == pytest.approx(7.0)  # 1 + (w − 1)·m


def test_a_linear_schedule_changes_the_samples(plain, pipe):
    constant = draw(plain, "noisy_clip", guidance=NoisyClipGuidance(scale=50.0))
    linear = draw(plain, "noisy_clip", guidance=NoisyClipGuidance(scale=50.0, schedule="linear"))
    assert not torch.allclose(constant.images, linear.images, atol=1e-3)
    early, late = linear.steps[0], linear.steps[STEPS - 1]
    assert early["eps_shift_rms"] < constant.steps[0]["eps_shift_rms"]  # weaker at high noise …
    assert late["eps_shift_rms"] > 0
    cfg_linear = draw(pipe, "cfg", guidance=CfgGuidance(scale=3.0, schedule="linear"))
    assert not torch.allclose(cfg_linear.images, draw(pipe, "cfg", 3.0).images, atol=1e-3)


def test_normalize_makes_the_eps_change_a_fixed_fraction_of_the_eps_norm(plain):
    sched = SAMPLER.scheduler(plain.schedule)
    t = int(sched.timesteps[3])
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * torch.tensor([0.5, 1, 2, 4]).view(-1, 1, 1, 1)
    cond = NoisyClipGuidance(scale=0.1, normalize=True).check().cond_fn(plain.guides["noisy_clip"], ids()[:4], [], sched)
    assert isinstance(cond, GuidedEps)
    out = cond(x, t, eps, torch.arange(4))
    shift = (eps - out).flatten(1)
    torch.testing.assert_close(shift.norm(dim=1), 0.1 * eps.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
    g = cond.grad(x, t, eps, torch.arange(4)).flatten(1)
    assert (torch.nn.functional.cosine_similarity(shift, g) > 0.9999).all()  # along the guide's gradient


# -- config -------------------------------------------------------------------------------------------------------
def test_the_new_config_groups_compose():
    from hydra.utils import get_class, instantiate

    for name, cls in (("cfg", CfgGuidance), ("cfg_noisy_clip", CfgNoisyClipGuidance)):
        settings = instantiate(compose_config("sample", [f"guidance={name}"]).guidance)
        assert type(settings) is cls and settings.kind == name
        assert settings.as_dict() == cls().as_dict()  # Python callers get the config's defaults
    for name, recurrence in (("clip", 1), ("noisy_clip", 2)):  # the new options off, but noisy_clip's recurrence
        settings = instantiate(compose_config("sample", [f"guidance={name}"]).guidance)  # (the front's best)
        assert (settings.schedule, settings.recurrence, settings.normalize) == ("constant", recurrence, False)
        assert settings.as_dict() == GUIDANCE[name]().as_dict()
    cfg = compose_config("evaluate", [])
    assert list(cfg.guides) == ["clip", "noisy_clip", "cfg", "cfg_noisy_clip"]
    assert list(cfg.methods) == ["none", "clip", "noisy_clip"] and cfg.method_scales.cfg[0] == 1.0
    train = compose_config("train", ["model=ddpm_cond"])
    assert get_class(train.model._target_).__name__ == "CondDdpmModule" and train.model.p_uncond == 0.2
    assert train.model.unet == compose_config("train", ["model=ddpm"]).model.unet  # the same UNet, + the embedding
    demo = compose_config("pipeline", []).stages  # the demo trains the conditional DDPM only, and evaluates cfg
    assert demo.ddpm.args.model == "ddpm_cond" and demo.ddpm.args["data.sampler"] == "distinct_caption"
    assert "cfg" in demo.evaluate.args.methods and list(demo.evaluate.args.method_scales.cfg) == [1, 2]
