"""GuidedPipeline: loads and checks exports once, resolves prompts, draws what ``python -m clipdiff.sample`` draws."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_guides import (
    LINEAR,
    SIZE,
    VOCAB,
    TextlessNoisyClip,
    clip_export,
    ddpm_export,
    noisy_clip_export,
    tiny_clip,
    tiny_noisy_clip,
)

import clipdiff
from clipdiff.diffusion.guidance import NoisyClipGuidance
from clipdiff.diffusion.sampling import Sampler
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.unet import load_ddpm
from clipdiff.pipelines import prompts
from clipdiff.pipelines.guided import GuidedPipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipelines")
    return {"ddpm": ddpm_export(tmp / "ddpm.pt"), "clip": clip_export(tmp / "clip.pt"),
            "noisy": noisy_clip_export(tmp / "noisy.pt")}


@pytest.fixture(scope="module")
def unet(exports):
    return load_ddpm(exports["ddpm"])[0]


def test_clipdiff_exports_the_pipeline_class():
    assert clipdiff.GuidedPipeline is GuidedPipeline
    with pytest.raises(AttributeError):
        clipdiff.NoSuchThing  # noqa: B018


def test_noisy_guide_must_match_the_ddpm_size_and_schedule(unet):
    assert GuidedPipeline(unet, LINEAR, {"noisy_clip": tiny_noisy_clip()}).guides["noisy_clip"].vocabulary == VOCAB
    keys = {"noisy_clip": "guide_ckpt"}
    with pytest.raises(ClipdiffError, match=r"^guide_ckpt: the noisy CLIP reads 16 px x_t but the DDPM makes 8 px"):
        GuidedPipeline(unet, LINEAR, {"noisy_clip": tiny_noisy_clip(image_size=16)}, keys=keys)
    cosine = {**LINEAR, "beta_schedule": "squaredcos_cap_v2"}
    with pytest.raises(ClipdiffError, match=r"noise schedules differ: beta_schedule .* ddpm_ckpt .* guide_ckpt"):
        GuidedPipeline(unet, LINEAR, {"noisy_clip": tiny_noisy_clip(schedule=cosine)}, keys=keys)
    with pytest.raises(ClipdiffError, match=r"^guides: no guide kind 'glide' \(choose clip or noisy_clip\)$"):
        GuidedPipeline(unet, LINEAR, {"glide": tiny_clip()})


def test_wrong_checkpoint_kinds_are_one_line_naming_the_key(exports):
    with pytest.raises(ClipdiffError, match=r"^guide_ckpt=.*ddpm.pt holds a ddpm model, but a clip model is needed here$"):
        GuidedPipeline.from_exports(exports["ddpm"], {"clip": exports["ddpm"]}, keys={"clip": "guide_ckpt"})
    with pytest.raises(ClipdiffError, match=r"^noisy_clip_ckpt=.*clip.pt holds a clip model, but a noisy_clip model"):
        GuidedPipeline.from_exports(exports["ddpm"], {"noisy_clip": exports["clip"]})
    with pytest.raises(ClipdiffError, match=r"^noisy_clip_ckpt is not set"):
        GuidedPipeline.from_exports(exports["ddpm"], {"noisy_clip": None})
    with pytest.raises(ClipdiffError, match=r"^ddpm_ckpt=.*clip.pt holds a clip model, but a ddpm model"):
        GuidedPipeline.from_exports(exports["clip"])


def test_prompt_outside_the_vocabulary(unet, caplog):
    """Free text: appended to the guide's captions with a warning (both CLIPs have a text tower), or refused."""
    for kind, model in (("clip", tiny_clip), ("noisy_clip", tiny_noisy_clip)):
        pipe = GuidedPipeline(unet, LINEAR, {kind: model()})
        kw = {"method": kind, "num_samples": 2, "sampler": "ddim", "steps": 2}
        settings = pipe.prepare("a red car", **kw).guidance
        with pytest.raises(ClipdiffError, match=r"prompt 'a shiny purple car' is not in the (noisy )?CLIP's vocabulary"
                                                r" .* and guidance.free_text=error"):
            pipe.prepare("a shiny purple car", guidance=type(settings)(free_text="error"), **kw)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=prompts.__name__):
            job = pipe.prepare("a shiny purple car", **kw)
        assert "free-text embedding" in caplog.text
        assert job.captions == VOCAB + ["a shiny purple car"] and job.cond.targets.tolist() == [len(VOCAB)] * 2
        x = torch.randn(2, 3, SIZE, SIZE)
        assert job.cond.guide.logits(x, 500, torch.zeros_like(x)).shape == (2, len(VOCAB) + 1)
    pipe = GuidedPipeline(unet, LINEAR, {"noisy_clip": TextlessNoisyClip()})
    with pytest.raises(ClipdiffError, match=r"is not in the noisy CLIP's vocabulary .* it has no text tower"):
        pipe.prepare("a shiny purple car", method="noisy_clip", num_samples=2)


def test_prompts_are_normalised_and_empty_or_too_long_ones_refused(unet, caplog):
    pipe = GuidedPipeline(unet, LINEAR, {"clip": tiny_clip()})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        job = pipe.prepare(["A  Red CAR ", "a blue car", "\ta WHITE car"], method="clip")
    assert job.prompts == ["a red car", "a blue car", "a white car"] and job.captions == VOCAB  # no free text
    assert job.cond.targets.tolist() == [VOCAB.index(c) for c in job.prompts] and "free-text" not in caplog.text
    for bad in ("", "   "):
        with pytest.raises(ClipdiffError, match=rf"^prompt {bad!r} is empty: give a caption such as 'a blue car'$"):
            pipe.prepare([bad, "a red car"], method="clip")
    long = "a car " + " ".join(["very"] * 20) + " red"  # the tiny CLIP's text tower reads 16 tokens
    with pytest.raises(ClipdiffError, match=rf"^prompt '{long}' needs 25 tokens but the CLIP's text tower reads 16"):
        pipe.prepare(long, method="clip", num_samples=1)
    with pytest.raises(ClipdiffError, match=r"got 3 prompts for 4 samples"):
        pipe.prepare(["a red car"] * 3, method="clip", num_samples=4)
    with pytest.raises(ClipdiffError, match=r"^guidance needs a target: set prompt="):
        pipe.prepare(method="clip", num_samples=2)
    with pytest.raises(ClipdiffError, match=r"^method='noisy_clip': this pipeline has none, clip$"):
        pipe.prepare("a red car", method="noisy_clip", num_samples=1)


def test_sampler_presets_are_the_configs():
    from conftest import compose_config
    from hydra.utils import instantiate

    for name in ("ddim", "ddim_stochastic", "ddpm"):
        node = instantiate(compose_config("sample", [f"sampler={name}"]).sampler)
        assert isinstance(node, Sampler) and node.as_dict() == Sampler.preset(name).as_dict(), name
    with pytest.raises(ClipdiffError, match=r"^sampler='dpm': choose ddim, ddim_stochastic, ddpm"):
        Sampler.preset("dpm")


def test_output_carries_the_guides_reading_and_per_step_statistics(unet):
    pipe = GuidedPipeline(unet, LINEAR, {"noisy_clip": tiny_noisy_clip()})
    job = pipe.prepare("a red car", guidance=NoisyClipGuidance(scale=5.0, window=[0.0, 1.0], every=2, recurrence=1),
                       num_samples=3, sampler="ddim", steps=5, batch_size=2, seed=1)
    out = pipe.draw(job)
    assert out.images.shape == (3, 3, SIZE, SIZE) and 0 <= out.images.min() and out.images.max() <= 1
    assert out.guide_logits.shape == (3, len(VOCAB)) and out.targets.tolist() == [VOCAB.index("a red car")] * 3
    assert out.guide_correct().shape == (3,)
    assert [s["step"] for s in out.steps] == [0, 2, 4] * 2  # two batches, every second of five steps
    assert all(s["grad_rms"] > 0 and s["eps_shift_rms"] > 0 for s in out.steps) and out.guided_steps == 6
    assert out.settings["guidance"]["name"] == "noisy_clip" and out.settings["sampler"]["steps"] == 5
    pil = out.pil()
    assert len(pil) == 3 and pil[0].size == (SIZE, SIZE)
    again = pipe.draw(job)
    assert torch.equal(again.images, out.images) and again.steps == out.steps  # drawn again: the same
    plain = pipe(num_samples=3, sampler="ddim", steps=5, batch_size=2, seed=1)
    assert plain.guide_logits is None and plain.steps == [] and not torch.equal(plain.images, out.images)


def test_the_cli_and_the_pipeline_draw_the_same_images(exports, tmp_path):
    """``python -m clipdiff.sample`` (a subprocess, as a user runs it) and GuidedPipeline in this process: the same
    exports, seed and settings give the same pixels."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "clipdiff.sample", f"paths.log_dir={tmp_path}", "progress=false",
           f"ddpm_ckpt={exports['ddpm']}", "guidance=noisy_clip", f"guide_ckpt={exports['noisy']}",
           "prompt=A red car", "guidance.scale=50", "guidance.every=2", "sampler=ddpm", "sampler.steps=6",
           "num_samples=3", "batch_size=2", "seed=3", "device=cpu"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "sample" / "runs").iterdir()
    cli = [np.asarray(Image.open(p)) for p in sorted((run / "samples").glob("*.png"))]
    pipe = GuidedPipeline.from_exports(exports["ddpm"], {"noisy_clip": exports["noisy"]})
    out = pipe("a red car", guidance=NoisyClipGuidance(scale=50.0, every=2), num_samples=3, sampler="ddpm", steps=6,
               batch_size=2, seed=3)
    assert len(cli) == 3 and all(np.array_equal(a, np.asarray(b)) for a, b in zip(cli, out.pil()))
    info = json.loads((run / "sample.json").read_text())
    assert info["guidance"]["name"] == "noisy_clip" and info["guidance"]["recurrence"] == 2  # the default
    assert info["guided_steps"] == out.guided_steps == 2 * 3 * 2  # batches × guided steps (every 2nd of 6) × recurrence
