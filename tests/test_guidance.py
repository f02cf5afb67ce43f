"""Guidance: a step raises the guide's belief in the target, DDPM and DDIM agree, the window, the checks.

The guides take loaded models (tests/tiny_guides.py); composing exports is tests/test_pipelines.py's."""

from __future__ import annotations

import pytest
import torch
from tiny_guides import (
    LINEAR,
    SIZE,
    VOCAB,
    clip_export,
    ddpm_export,
    tiny_clip,
    tiny_noisy_clip,
)

from clipdiff.diffusion.guidance import ClipGuidance, NoisyClipGuidance, clean_grad, score
from clipdiff.diffusion.sampling import sample, step_options
from clipdiff.diffusion.schedule import sampling_scheduler
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.unet import load_ddpm

TARGETS = ["a red car", "a blue car", "a green jeep/bus", "a white car"]


def scheduler(name: str, clip_sample: bool = False):
    """The sampler, by default without its x0 clamp (the untrained UNet's x0_hat lies far outside [-1, 1])."""
    return sampling_scheduler(LINEAR, name, clip_sample=clip_sample)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guidance")
    return {"ddpm": ddpm_export(tmp / "ddpm.pt"), "clip": clip_export(tmp / "clip.pt")}


@pytest.fixture(scope="module")
def ddpm(exports):
    return load_ddpm(exports["ddpm"])


def make(kind: str, scheduler, scale: float = 1.0, unet=None, **kw):
    """The cond_fn of a guide on the tiny models, steering sample i towards TARGETS[i]."""
    ids = torch.tensor([VOCAB.index(t) for t in TARGETS])
    if kind == "clip":
        settings = ClipGuidance(scale=scale, **{"grad_clip": None, **kw})
        return settings.check("guidance", scheduler).cond_fn(tiny_clip(), ids, [], scheduler, unet)
    return NoisyClipGuidance(scale=scale, **kw).check("guidance", scheduler).cond_fn(tiny_noisy_clip(), ids, [],
                                                                                    scheduler, unet)


def one_step(unet, scheduler, x, t, cond=None, seed=0):
    """One step as the sampling loop takes it (its step options: DDIM steps with the clamp-consistent eps)."""
    with torch.no_grad():
        eps = unet(x, t).sample
        if cond is not None:
            eps = cond(x, t, eps, torch.arange(x.shape[0]))
        return scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(seed), **step_options(scheduler, 0.0))


def log_p(cond, logits):
    """The guide's score of the target: log p(y|x) (classifier form) or the target's logit (dot form)."""
    return score(logits, cond.targets, cond.form)


@pytest.mark.parametrize(("form", "clip_sample"), [("classifier", False), ("dot", False), ("classifier", True)])
@pytest.mark.parametrize("kind", ["clip", "noisy_clip"])
def test_a_guidance_step_raises_the_guides_probability_of_the_target(ddpm, kind, form, clip_sample):
    """Also with a sampler that clamps x0_hat (most pixels saturate here): stepping with the clamp-consistent eps
    keeps the update's direction (else the clamped pixels keep only the eps term, which points against it)."""
    unet, _ = ddpm
    sched = scheduler("ddim", clip_sample)
    sched.set_timesteps(10)
    t, t_prev = int(sched.timesteps[5]), int(sched.timesteps[6])
    x = torch.randn(len(TARGETS), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    cond = make(kind, sched, scale=0.5 if kind == "noisy_clip" else 0.05, form=form)
    plain = one_step(unet, sched, x, t)  # the baseline: the same sampler step, unguided
    guided = one_step(unet, sched, x, t, cond)
    assert not torch.allclose(plain.prev_sample, guided.prev_sample)
    with torch.no_grad():
        if kind == "noisy_clip":  # the noisy guide reads the next x_t at the next timestep
            before = log_p(cond, cond.guide.logits(plain.prev_sample, t_prev))
            after = log_p(cond, cond.guide.logits(guided.prev_sample, t_prev))
        else:  # the clean guide reads the predicted x_0 of this step
            before = log_p(cond, cond.guide.final_logits((plain.pred_original_sample.clamp(-1, 1) + 1) / 2))
            after = log_p(cond, cond.guide.final_logits((guided.pred_original_sample.clamp(-1, 1) + 1) / 2))
    assert (after > before).all(), (before, after)


@pytest.mark.parametrize("kind", ["clip", "noisy_clip"])
def test_ddpm_and_ddim_guidance_point_the_same_way(ddpm, kind):
    unet, _ = ddpm
    x = torch.randn(len(TARGETS), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    updates = {}
    for name, mode in (("ddim", "eps"), ("ddpm", "eps"), ("ddpm", "mean_shift")):
        sched = scheduler(name)
        sched.set_timesteps(10)
        t = int(sched.timesteps[3])
        cond = make(kind, sched, scale=1.0, mode=mode)
        # the same ancestral noise for the guided and the unguided DDPM step: the difference is the guidance alone
        updates[name, mode] = (one_step(unet, sched, x, t, cond).prev_sample - one_step(unet, sched, x, t).prev_sample).flatten(1)
    cos = torch.nn.functional.cosine_similarity
    assert (cos(updates["ddim", "eps"], updates["ddpm", "eps"]) > 0).all()
    assert (cos(updates["ddpm", "mean_shift"], updates["ddpm", "eps"]) > 0.99).all()  # the same direction, other size
    assert updates["ddim", "eps"].norm() > 0


def test_mean_shift_moves_the_ddpm_mean_by_scale_times_variance_times_gradient(ddpm):
    unet, _ = ddpm
    sched = scheduler("ddpm")
    sched.set_timesteps(10)
    t = int(sched.timesteps[4])
    prev = int(sched.previous_timestep(t))
    abar, abar_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[prev]
    var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)  # the posterior variance of this step
    x = torch.randn(len(TARGETS), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    cond = make("noisy_clip", sched, scale=2.0, mode="mean_shift")
    with torch.no_grad():
        g = cond.grad(x, t, unet(x, t).sample, torch.arange(len(TARGETS)))
    shift = one_step(unet, sched, x, t, cond).prev_sample - one_step(unet, sched, x, t).prev_sample
    torch.testing.assert_close(shift, 2.0 * var * g, rtol=1e-3, atol=1e-6)


def test_window_every_and_reuse_choose_the_guided_steps(ddpm):
    unet, _ = ddpm
    sched = scheduler("ddim")
    seen = {}
    for reuse in (False, True):
        cond = make("noisy_clip", sched, window=[0.5, 1.0], every=2, reuse_grad=reuse)
        changed = []
        orig = cond.__call__

        def spy(x_t, t, eps, index, orig=orig, changed=changed):
            out = orig(x_t, t, eps, index)
            changed.append(not torch.equal(out, eps))
            return out

        sample(unet, sched, len(TARGETS), steps=10, cond_fn=spy, progress=False)
        seen[reuse] = (cond.guided_calls, changed)
    assert seen[False] == (3, [False] * 5 + [True, False, True, False, True])  # steps 5, 7, 9 of 0…9
    assert seen[True] == (3, [False] * 5 + [True] * 5)


def test_gradient_hygiene_zeroes_nans_and_clamps_each_samples_rms():
    g = torch.ones(2, 3, 4, 4)
    g[0] *= 10.0
    g[1, 0, 0, 0] = float("nan")
    out = clean_grad(g, 2.0)
    assert not out.isnan().any() and out[1, 0, 0, 0] == 0
    rms = out.flatten(1).pow(2).mean(1).sqrt()
    assert rms[0] == pytest.approx(2.0) and rms[1] < 1.0  # the big one is clamped, the small one left alone


def test_same_seed_gives_the_same_guided_samples(ddpm):
    unet, _ = ddpm
    sched = scheduler("ddpm")
    draws = [sample(unet, sched, len(TARGETS), generator=torch.Generator().manual_seed(7), steps=4, progress=False,
                    cond_fn=make("clip", sched, scale=1.0)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    other = sample(unet, sched, len(TARGETS), generator=torch.Generator().manual_seed(8), steps=4, progress=False,
                   cond_fn=make("clip", sched, scale=1.0))
    assert not torch.equal(draws[0], other)


# -- settings checks ----------------------------------------------------------------------------------------------
def test_bad_settings_are_one_line_naming_the_key_and_the_choices():
    ddim = scheduler("ddim")
    for kw, msg in (({"mode": "mean_shift"}, r"^guidance\.mode=mean_shift .* use sampler=ddpm"),
                    ({"form": "logprob"}, r"^guidance\.form='logprob': choose classifier or dot$"),
                    ({"free_text": "maybe"}, r"^guidance\.free_text='maybe': choose warn or error$"),
                    ({"window": [0.8, 0.2]}, r"^guidance\.window=\[0\.8, 0\.2\]: give \[start, stop\]"),
                    ({"every": 0}, r"^guidance\.every=0 must be ≥ 1$"),
                    ({"scale": -1.0}, r"^guidance\.scale=-1\.0 must be")):
        with pytest.raises(ClipdiffError, match=msg):
            make("noisy_clip", ddim, **kw)
    with pytest.raises(ClipdiffError, match=r"^guides\.noisy_clip\.form='cosine': choose classifier or dot$"):
        NoisyClipGuidance(form="cosine").check("guides.noisy_clip", ddim)
    assert NoisyClipGuidance(mode="mean_shift").check("guidance", scheduler("ddpm")).mode == "mean_shift"
    with pytest.raises(ClipdiffError, match="grad_through_eps=true needs the DDPM's UNet"):
        make("clip", ddim, grad_through_eps=True)


def test_conf_guidance_instantiates_the_settings_classes():
    """Each guidance config is exactly its class's arguments: nothing is stripped before instantiating."""
    from conftest import compose_config
    from hydra.utils import instantiate

    for name, cls, scale in (("clip", ClipGuidance, 3.0), ("noisy_clip", NoisyClipGuidance, 10.0)):
        settings = instantiate(compose_config("sample", [f"guidance={name}"]).guidance)
        assert type(settings) is cls and settings.kind == name and settings.scale == scale
        assert settings.as_dict()["name"] == name and settings.window == [0.0, 1.0]
        assert settings.as_dict() == cls().as_dict()  # Python callers get the config's defaults
    assert not compose_config("sample", ["guidance=none"]).get("guidance")


def test_gradients_through_eps_use_the_unet(ddpm):
    unet, _ = ddpm
    sched = scheduler("ddim")
    sched.set_timesteps(10)
    x = torch.randn(len(TARGETS), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    t = int(sched.timesteps[2])
    with torch.no_grad():
        eps = unet(x, t).sample
    const = make("clip", sched).grad(x, t, eps, torch.arange(4))
    through = make("clip", sched, grad_through_eps=True, unet=unet).grad(x, t, eps, torch.arange(4))
    assert not torch.allclose(const, through)
    assert torch.nn.functional.cosine_similarity(const.flatten(), through.flatten(), dim=0) > 0


# -- the sampling CLI (in-process: the one-line printing of a ClipdiffError is tests/test_sample.py's) ------------
def compose_sample(overrides: list[str]):
    from conftest import compose_config

    return compose_config("sample", overrides)


def test_cli_guided_sampling_writes_grid_and_pngs(exports, tmp_path):
    import json

    from clipdiff.sample import run

    common = [f"ddpm_ckpt={exports['ddpm']}", f"guide_ckpt={exports['clip']}", "prompt=a red car", "progress=false",
              "sampler.steps=4"]
    result = run(compose_sample([*common, "guidance=clip", "guidance.scale=2", "num_samples=3",
                                 f"paths.run_dir={tmp_path / 'run'}"]))
    run_dir = result["run_dir"]
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert (run_dir / "grid.png").is_file()
    info = json.loads((run_dir / "sample.json").read_text())
    assert info["prompt"] == "a red car" and info["guidance"]["name"] == "clip" and info["guidance"]["scale"] == 2
    # a factory's ClipdiffError reaches the CLI as itself (Hydra's instantiate would wrap it)
    with pytest.raises(ClipdiffError, match=r"^guide_ckpt=.*clip.pt holds a clip model, but a noisy_clip model is "):
        run(compose_sample([*common, "guidance=noisy_clip", f"paths.run_dir={tmp_path / 'bad'}"]))
    with pytest.raises(ClipdiffError, match=r"guidance needs a target: set prompt="):
        run(compose_sample([*common[:2], "guidance=clip", f"paths.run_dir={tmp_path / 'none'}"]))
