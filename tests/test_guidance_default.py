"""Guidance on the path ``make demo`` samples with: the cosine schedule with v-prediction
(``conf/diffusion/cosine_1000_v.yaml``), DDIM with eta 1 (``conf/sampler/ddim_stochastic.yaml``) and the guidance
settings of ``conf/guidance/*.yaml``, for both guides; and the sampler's timestep check."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf
from tiny_guides import ddpm_export, demo_schedule, tiny_clip, tiny_noisy_clip

from clipdiff.diffusion.guidance import GUIDANCE, score
from clipdiff.diffusion.sampling import Sampler, check_timesteps
from clipdiff.diffusion.schedule import sampling_scheduler
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.unet import load_ddpm
from clipdiff.pipelines.guided import GuidedPipeline

TARGETS = ["a red car", "a blue car", "a green jeep/bus", "a white car"] * 2
STEPS = 10



@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    schedule = demo_schedule()
    assert schedule["prediction_type"] == "v_prediction" and schedule["beta_schedule"] == "squaredcos_cap_v2"
    unet, sched = load_ddpm(ddpm_export(tmp_path_factory.mktemp("default") / "ddpm.pt", schedule))
    return GuidedPipeline(unet, sched, {"clip": tiny_clip(), "noisy_clip": tiny_noisy_clip(schedule=sched)})


def demo_sampler() -> Sampler:
    from hydra.utils import instantiate

    cfg = OmegaConf.merge(OmegaConf.load(f"{CONF}/sampler/ddim.yaml"), OmegaConf.load(f"{CONF}/sampler/ddim_stochastic.yaml"))
    sampler = instantiate({k: v for k, v in cfg.items() if k != "defaults"})
    assert sampler.eta == 1.0 and sampler.name == "ddim"
    return sampler


def draw(pipe, method: str, scale: float | None = None, guidance=None):
    prompts = None if method == "none" else TARGETS
    return pipe(prompts, method=method, scale=scale, guidance=guidance, num_samples=len(TARGETS), sampler=demo_sampler(), steps=STEPS,
                seed=3, batch_size=len(TARGETS))


@pytest.fixture(scope="module")
def unguided(pipe):
    return draw(pipe, "none")


@pytest.mark.parametrize("method", ["clip", "noisy_clip"])
def test_guidance_at_scale_to_zero_is_unguided_sampling(pipe, unguided, method):
    """One update rule for every method: a guided run at scale 1e-9 draws the unguided images (the tiny UNet's
    x0_hat saturates the sampler's clamp, where a guided-only eps correction would part the two)."""
    settings = dataclasses.replace(GUIDANCE[method](), scale=1e-9, recurrence=1)  # the rest as configured; with
    out = draw(pipe, method, guidance=settings)  # recurrence k > 1 (noisy_clip's default) each step is re-noised and
    assert out.guided_steps == STEPS             # taken again: another sampler of the same marginals, not these images
    torch.testing.assert_close(out.images, unguided.images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["clip", "noisy_clip"])
def test_guided_samples_raise_the_guides_target_probability(pipe, unguided, method):
    """At the configured scale, from the same noise, every guided sample scores its target higher under the guide
    than the unguided sample does."""
    out = draw(pipe, method)  # the scale of conf/guidance/<method>.yaml
    guide = pipe.prepare(TARGETS, method=method, sampler=demo_sampler(), steps=STEPS).cond.guide
    with torch.no_grad():
        plain_logits = guide.final_logits(unguided.images)
    before, after = score(plain_logits, out.targets, "classifier"), score(out.guide_logits, out.targets, "classifier")
    open_ = before < math.log(0.9)  # a target the unguided sample already gives p ≥ 0.9 has no room to show a
    assert open_.sum() >= len(TARGETS) // 2 and (after > before)[open_].all(), (before, after)  # direction

    def rank(logits):  # the target's place among the captions (0: the guide's argmax)
        return (logits > logits.gather(1, out.targets[:, None])).sum(1).float()
    assert rank(out.guide_logits).mean() < rank(plain_logits).mean()


@pytest.mark.parametrize("steps", [4, 5])
def test_few_stochastic_ddim_steps_from_t_max_give_finite_images(pipe, steps):
    """From ā_999 ≈ 2e-9 at eta 1, DDIM's sqrt(1 − ā_prev − σ²) is 0 up to rounding: in float32 5 steps made it
    negative, and every image NaN."""
    out = pipe(num_samples=4, sampler=demo_sampler(), steps=steps, seed=0)
    assert out.images.isfinite().all()


def test_trailing_steps_must_land_on_the_next_timestep():
    """diffusers' DDIM steps from t to t − T // steps: with ``trailing`` spacing and a step count that does not
    divide T the model would be called at another t than the one x was moved to; refused, naming sampler.steps."""
    sched = sampling_scheduler(demo_schedule(), "ddim", timestep_spacing="trailing")
    assert check_timesteps(sched, 25)[:3] == [999, 959, 919]
    sched.set_timesteps(30)
    ts = [int(t) for t in sched.timesteps]
    assert ts[1] - ts[2] != 1000 // 30  # the library's spacing, not its step: the mismatch is real
    with pytest.raises(ClipdiffError, match=r"^sampler\.steps=30 with timestep_spacing=trailing: a step from "
                                            r"t=966 lands on t=933 but the model is next called at t=932"):
        Sampler.preset("ddim_stochastic").replace(steps=30).scheduler(demo_schedule())
    leading = sampling_scheduler(demo_schedule(), "ddim", timestep_spacing="leading")
    assert len(check_timesteps(leading, 30)) == 30  # integer spacing: always consistent
    assert check_timesteps(sampling_scheduler(demo_schedule(), "ddpm"), 1000)[:2] == [999, 998]


def test_guided_work_defaults_to_ddim_with_eta_one(pipe):
    from conftest import compose_config

    for name in ("sample", "evaluate"):
        cfg = compose_config(name, [])
        assert cfg.sampler.eta == 1.0 and cfg.sampler.name == "ddim", name
    job = pipe.prepare(["a red car"], method="noisy_clip")
    assert job.sampler.eta == 1.0 and job.sampler.name == "ddim"
