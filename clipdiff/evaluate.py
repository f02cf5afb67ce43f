"""Evaluate guided sampling with an independent judge: ``python -m clipdiff.evaluate ddpm_ckpt=… clip_ckpt=…
noisy_clip_ckpt=… judge_ckpt=… [data.root=…] [captions=[…]] num_per_caption=16 scales=[2,8] methods=[none,clip,noisy_clip]``.

For every method × scale one sampling call draws ``num_per_caption`` images of every caption (per-sample targets),
from the same seed, so every method starts from the same initial noise. Writes into a new run directory:
``samples/<method>/<scale>/<caption>/NNNN.png``, ``grids/<method>_s<scale>.png`` (a row per caption),
``results.csv`` (a row per method × caption × scale), ``summary.csv`` (captions pooled), ``judge_real.csv`` (the
judge on held-out real images of each caption: the ceiling), ``accuracy_vs_scale.png`` (several scales),
``report.md`` and an (offline by default) wandb run. ``none`` runs once, as scale 0.

A thin caller of :class:`clipdiff.pipelines.guided.GuidedPipeline`: the DDPM, the guides and the clean CLIP (also
the FD/KID feature space) are loaded once, and every method × scale is checked (options, prompts, exports) before
the first image is drawn.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from clipdiff.errors import ClipdiffError
from clipdiff.eval import report
from clipdiff.eval.fid import clip_features, fd_kid, random_features
from clipdiff.eval.real import RealImages, choose_captions, judge_on_real, open_real  # noqa: F401 (API)
from clipdiff.models.components.judge import load_judge
from clipdiff.pipelines.guided import GuidedPipeline, Prepared, pick_device
from clipdiff.utils.cli import hydra_entry

log = logging.getLogger("clipdiff.evaluate")


def plan(cfg: DictConfig, pipe: GuidedPipeline, targets: list[str]) -> list[tuple[str, float, Prepared]]:
    """Every method × scale, checked and ready to draw (bad option values, prompts or guides fail here, one line
    naming the key, before anything is sampled)."""
    sampler = instantiate(cfg.sampler).check()
    common = {"sampler": sampler, "seed": int(cfg.seed), "batch_size": int(cfg.batch_size)}
    jobs = []
    for method in [str(m) for m in cfg.methods]:
        if method == "none":
            jobs.append(("none", 0.0, pipe.prepare(targets, method="none", **common)))
            continue
        settings = instantiate(cfg.guides[method])
        for scale in (cfg.method_scales.get(method) or cfg.scales):
            job = pipe.prepare(targets, guidance=dataclasses.replace(settings, scale=float(scale)),
                               prefix=f"guides.{method}", **common)
            jobs.append((method, float(scale), job))
    return jobs


def load(cfg: DictConfig, methods: list[str]) -> GuidedPipeline:
    """The DDPM, each guide a method needs and the clean CLIP (``clip_ckpt``, the FD/KID space), loaded once."""
    kinds = {instantiate(cfg.guides[m]).kind for m in methods if m != "none"}
    paths = {kind: cfg.get(f"{kind}_ckpt") for kind in kinds}
    if cfg.clip_ckpt:
        paths["clip"] = cfg.clip_ckpt
    return GuidedPipeline.from_exports(cfg.ddpm_ckpt, paths, device=pick_device(str(cfg.device)))


def save_pngs(images: torch.Tensor, targets: list[str], folder: Path) -> None:
    arr = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    counter: Counter = Counter()
    for img, caption in zip(arr, targets):
        path = folder / report.slug(caption) / f"{counter[caption]:04d}.png"
        counter[caption] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def run(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.run_dir)
    if (out_dir / "results.csv").exists():
        raise ClipdiffError(f"{out_dir} already holds results; evaluation writes into a new run directory")
    methods = [str(m) for m in cfg.methods]
    bad = [m for m in methods if m != "none" and m not in cfg.guides]
    if bad or not methods:
        raise ClipdiffError(f"methods={methods}: choose from none, {', '.join(cfg.guides)}")
    if int(cfg.num_per_caption) < 2:
        raise ClipdiffError("num_per_caption must be at least 2 (FD/KID and bootstrap CIs need 2 samples)")
    pipe = load(cfg, methods)
    device = pipe.device
    judge = load_judge(cfg.judge_ckpt, key="judge_ckpt")
    real = open_real(cfg, pipe.image_size)
    captions, captions_from = choose_captions(cfg, real, judge.vocabulary)
    n = int(cfg.num_per_caption)
    targets = [c for c in captions for _ in range(n)]
    target_ids = torch.tensor([judge.vocabulary.index(c) for c in targets])
    jobs = plan(cfg, pipe, targets)

    clean = pipe.guides.get("clip") if cfg.clip_ckpt else None
    space = clip_features(clean, name=f"clip:{cfg.clip_ckpt}") if clean is not None else random_features()
    if clean is None:
        log.warning("no clip_ckpt: FD/KID in a fixed random conv feature space instead of the CLIP's")
    ceiling = (judge_on_real(judge, real, captions, n, real.extra["judge_split"], int(cfg.bootstrap), int(cfg.seed))
               if real is not None and "judge_split" in real.extra else [])
    if ceiling:
        report.write_csv(ceiling, report.CEILING_COLUMNS, out_dir / "judge_real.csv")
    real_by_caption = {c: real.of(c, int(cfg.num_real), int(cfg.seed)) if real is not None else None for c in captions}
    have = [r for r in real_by_caption.values() if r is not None and len(r) >= 2]
    per = min((len(r) for r in have), default=0)  # the same number of real images of every caption
    real_pool = torch.cat([r[:per] for r in have]) if len(have) == len(captions) else None
    sampler = jobs[0][2].sampler

    pipe.draw(pipe.prepare(method="none", num_samples=min(len(targets), int(cfg.batch_size)),
                           sampler=sampler.replace(steps=1)))  # warm-up (timings)
    rows, summary, grids = [], [], {}
    bar = tqdm(jobs, desc="evaluate", unit="run", disable=not cfg.progress)
    for method, scale, job in bar:
        bar.set_postfix_str(f"{method} scale {scale:g}, {len(targets)} images")
        out = pipe.draw(job, progress=bool(cfg.progress))
        images, sec = out.images, out.seconds / len(targets)
        save_pngs(images, targets, out_dir / "samples" / method / report.scale_name(scale))
        hits = judge.correct(images, target_ids)
        guide_hit = out.guide_correct() if out.guide_logits is not None else torch.full((len(targets),), math.nan)
        with torch.no_grad():
            clip_hit = (clean.logits(images.to(device)).argmax(1).cpu() == torch.tensor(
                [clean.vocabulary.index(c) if c in clean.vocabulary else -1 for c in targets])
                if clean is not None else torch.full((len(targets),), math.nan))
        by_caption = {}
        for k, caption in enumerate(captions):
            sl = slice(k * n, (k + 1) * n)
            by_caption[caption] = images[sl]
            fid = {"fd": math.nan, "kid": math.nan, "kid_std": math.nan}
            if real_by_caption[caption] is not None and len(real_by_caption[caption]) >= 2:
                fid = fd_kid(images[sl], real_by_caption[caption], space, seed=int(cfg.seed), device=device)
            rows.append({"method": method, "caption": caption, "scale": scale, "n": n,
                         **report.accuracy_columns({p: hits[p][sl] for p in report.ACC}, int(cfg.bootstrap), int(cfg.seed)),
                         "fd": fid["fd"], "kid": fid["kid"], "kid_std": fid["kid_std"],
                         "guide_acc": guide_hit[sl].float().mean().item(), "clip_acc": clip_hit[sl].float().mean().item(),
                         "sec_per_image": sec})
        mine = rows[-len(captions):]
        pooled = {"fd": math.nan, "kid": math.nan}
        if real_pool is not None:
            pooled = fd_kid(images, real_pool, space, seed=int(cfg.seed), device=device)
        summary.append({"method": method, "scale": scale, "n": len(targets), "fd": pooled["fd"], "kid": pooled["kid"],
                        **report.accuracy_columns(hits, int(cfg.bootstrap), int(cfg.seed), groups=len(captions)),
                        "fd_mean": _mean(r["fd"] for r in mine), "kid_mean": _mean(r["kid"] for r in mine),
                        "guide_acc": guide_hit.float().mean().item(), "clip_acc": clip_hit.float().mean().item(),
                        "sec_per_image": sec, "guided_steps": out.guided_steps})
        name = f"{method}_s{report.scale_name(scale)}"
        grids[name] = report.caption_grid(by_caption, int(cfg.grid_per_caption), out_dir / "grids" / f"{name}.png")

    results = report.write_csv(rows, report.RESULT_COLUMNS, out_dir / "results.csv")
    report.write_csv(summary, report.SUMMARY_COLUMNS, out_dir / "summary.csv")
    scales = {r["scale"] for r in summary if r["method"] != "none"}
    plot = report.plot_accuracy_vs_scale(summary, out_dir / "accuracy_vs_scale.png") if len(scales) > 1 else None
    guided = {m: job.guidance.kind for m, _, job in jobs if job.guidance is not None}
    info = {"ddpm_ckpt": cfg.ddpm_ckpt, "judge_ckpt": cfg.judge_ckpt, "seed": int(cfg.seed), "captions": captions,
            "captions_from": captions_from, "num_per_caption": n,
            "sampler": f"{sampler.name} ({sampler.steps} steps)",
            "guides": "; ".join(f"{m}: `{cfg.get(kind + '_ckpt')}`" for m, kind in guided.items()) or "none",
            "real": (f"up to {cfg.num_real} real `{cfg.real_split}` images of the caption from `{cfg.data.root}`"
                     if real is not None else "no real images (no data.root): FD/KID not computed"),
            "features": space.name + (" (the clean CLIP's image tower)" if clean is not None else " (no clip_ckpt)")}
    md = report.markdown_report(summary, rows, info, grids, plot, out_dir, ceiling)
    wandb_dir = None
    if cfg.wandb.enabled:
        wcfg = {**OmegaConf.to_container(cfg.wandb, resolve=True),
                "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)}
        wandb_dir = report.log_wandb(wcfg, rows, summary, {**grids, **({"accuracy_vs_scale": plot} if plot else {})},
                                     out_dir, ceiling)
    return {"run_dir": out_dir, "rows": rows, "summary": summary, "ceiling": ceiling, "results": results, "report": md,
            "grids": grids, "plot": plot, "wandb_dir": wandb_dir}


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def summary_table(summary: list[dict[str, Any]]) -> str:
    head = f"{'method':<11} {'scale':>6} {'n':>4} {'caption':>8} {'colour':>7} {'type':>6} {'FD':>8} {'guide':>6} {'s/img':>6}"
    lines = [head]
    for r in summary:
        lines.append(f"{r['method']:<11} {report.scale_name(r['scale']):>6} {r['n']:>4} {r['acc_caption']:>8.2f} "
                     f"{r['acc_colour']:>7.2f} {r['acc_type']:>6.2f} {r['fd']:>8.3g} {r['guide_acc']:>6.2f} "
                     f"{r['sec_per_image']:>6.3f}")
    return "\n".join(lines)


@hydra_entry("evaluate")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(summary_table(result["summary"]))
    print(f"report: {result['report']}")
    print(f"evaluation: {result['run_dir']}")


if __name__ == "__main__":
    main()
