"""GPU figures (``benchmarks/gpu.sh`` = ``python -m clipdiff.bench --gpu``): DDPM training images/s in fp32, in bf16
autocast (what ``trainer=gpu`` runs) and in bf16 + channels-last, and guided sampling images/s (the default recipe:
DDIM + noisy CLIP) at ``--gpu-sample-batch`` (256: the GPU preset's evaluation batch).

Absolute rates, not ratios: a GPU run is not shared like the CPU machine. ``--gpu-device cpu`` with tiny sizes is
the dry run the tests use (it checks the code path, not the speed).
"""

from __future__ import annotations

import time

import torch

from clipdiff.bench.common import Claim
from clipdiff.bench.overhead import BareLoop, build_module, fake_batch


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def train_images_per_s(model: str, image_size: int, batch: int, steps: int, warmup: int, device: torch.device,
                       bf16: bool, channels_last: bool = False) -> float:
    """Training steps (the module's loss, AdamW, EMA) per second × batch, in fp32 or bf16 autocast, channels-last or
    not."""
    module = build_module(model, image_size).to(device)
    if channels_last:
        module.hparams.channels_last = True  # _prepare makes the inputs channels-last too
        module.unet.to(memory_format=torch.channels_last)
    runner = BareLoop(module, fake_batch(batch, image_size, 43), warmup + steps)
    runner.batches = ({k: v.to(device) for k, v in b.items()} for b in runner.batches)
    sync = _sync(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(warmup):
            runner.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        sync()
    return batch * steps / (time.perf_counter() - t0)


def sample_images_per_s(model: str, image_size: int, batch: int, device: torch.device, steps: int | None) -> float:
    from clipdiff.bench.sampling import build_parts, pipeline, recipe, seconds_per_image

    parts = build_parts(image_size, model, clean=None)
    parts["unet"].to(device)
    parts["noisy"].to(device)
    pipe = pipeline(parts)
    sampler, guidance = recipe("noisy_clip", "ddim")
    seconds_per_image(pipe, sampler, guidance, batch, 1)  # warm-up (the loop ends with a copy to the CPU: synced)
    return 1.0 / seconds_per_image(pipe, sampler, guidance, batch, steps)


def bench_gpu(device: str = "cuda", model: str = "ddpm_64", image_size: int = 64, batch: int = 64, steps: int = 20,
              warmup: int = 3, sample_batch: int = 64, sample_steps: int | None = None) -> list[Claim]:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    fp32 = train_images_per_s(model, image_size, batch, steps, warmup, dev, bf16=False)
    bf16 = train_images_per_s(model, image_size, batch, steps, warmup, dev, bf16=True)
    fast = train_images_per_s(model, image_size, batch, steps, warmup, dev, bf16=True, channels_last=True)
    where = f"{model} {image_size} px, batch {batch}, {name}"
    return [Claim("gpu/ddpm_train_images_per_s_fp32", fp32, None, f"images/s ({where})"),
            Claim("gpu/ddpm_train_images_per_s_bf16", bf16, None, f"images/s ({where}; trainer=gpu)"),
            Claim("gpu/ddpm_train_images_per_s_bf16_channels_last", fast, None, f"images/s ({where})"),
            Claim("gpu/bf16_vs_fp32", bf16 / fp32, None, "x"),
            Claim("gpu/bf16_channels_last_vs_fp32", fast / fp32, None, "x"),
            Claim("gpu/guided_sample_images_per_s", sample_images_per_s(model, image_size, sample_batch, dev,
                                                                        sample_steps), None,
                  f"images/s (DDIM {sample_steps or 'default'} steps + noisy CLIP, batch {sample_batch}, {name})")]
