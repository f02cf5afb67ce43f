"""Evaluate guided sampling with an independent judge: ``python -m clipdiff.evaluate ddpm_ckpt=… clip_ckpt=…
noisy_clip_ckpt=… judge_ckpt=… [data.root=…] [captions=[…]] num_per_caption=16 scales=[2,8] methods=[none,clip,noisy_clip]``.

For every method × scale one sampling call draws ``num_per_caption`` images of every caption (per-sample targets),
from the same seed, so every method starts from the same initial noise. Writes into a new run directory:
``samples/<method>/<scale>/<caption>/NNNN.png``, ``grids/<method>_s<scale>.png`` (a row per caption),
``results.csv`` (a row per method × caption × scale), ``summary.csv`` (captions pooled), ``judge_real.csv`` (the
judge on held-out real images of each caption: the ceiling), ``accuracy_vs_scale.png`` (several scales),
``report.md`` and an (offline by default) wandb run. ``none`` runs once, as scale 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from clipdiff.diffusion.guidance import instantiate_guidance
from clipdiff.diffusion.sampling import sample
from clipdiff.diffusion.schedule import sampling_scheduler
from clipdiff.errors import ClipdiffError
from clipdiff.eval import report
from clipdiff.models.components.judge import load_judge
from clipdiff.models.components.unet import load_ddpm
from clipdiff.sample import SAMPLER_ONLY, pick_device
from clipdiff.utils.cli import hydra_entry

log = logging.getLogger("clipdiff.evaluate")

EVAL_ONLY = ("scales",)  # keys of guides.<method> read here, not passed to the factory


# -- real images and captions -------------------------------------------------------------------------------------
class RealImages:
    """Real images of one caption from the dataset (``data`` config), at the DDPM's size; None when absent.

    ``split`` gives the images FD/KID compare against; ``extra`` names other stages read here (``judge_split``)."""

    def __init__(self, data_cfg: DictConfig, image_size: int, split: str, extra: dict[str, str] | None = None):
        splits = dict(data_cfg.splits)
        for key, stage in {"real_split": split, **(extra or {})}.items():
            if stage not in splits:
                raise ClipdiffError(f"{key}={stage}: data.splits has no such stage (have: {', '.join(splits)})")
        read = ("train", split, *(extra or {}).values())
        wanted = {s: splits[s] for s in splits if s in read}  # only the splits read here are scanned
        node = {**OmegaConf.to_container(data_cfg, resolve=True), "splits": wanted, "image_size": image_size,
                "progress": False}
        self.dm = instantiate(node, _convert_="all")
        self.split, self.extra = split, dict(extra or {})
        self.index = self.dm.index()

    def train_counts(self) -> Counter:
        return Counter(self.index["train" if "train" in self.index else self.split].captions)

    def objects(self, caption: str, split: str) -> int:
        return Counter(self.index[split].captions)[caption]

    def of(self, caption: str, limit: int, seed: int, split: str | None = None) -> torch.Tensor | None:
        if caption not in self.dm.vocab:
            return None
        ds = self.dm._dataset(split or self.split)
        rows = (torch.as_tensor(ds.caption_ids) == self.dm.vocab.index(caption)).nonzero().flatten()
        if len(rows) == 0:
            return None
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]].sort().values
        return ds.float_images(rows)


def open_real(cfg: DictConfig, image_size: int) -> RealImages | None:
    root = Path(str(cfg.data.root))
    if not root.is_dir():
        log.warning("data.root=%s does not exist: no FD/KID (give data.root=… for real images)", root)
        return None
    extra = None
    if cfg.get("judge_split"):
        folder = root / str(dict(cfg.data.splits).get(str(cfg.judge_split), ""))
        if folder.is_dir() and folder != root:
            extra = {"judge_split": str(cfg.judge_split)}
        else:
            log.warning("judge_split=%s: no split folder %s, so the judge is not checked on held-out real images "
                        "(judge_split=null silences this)", cfg.judge_split, folder)
    return RealImages(cfg.data, image_size, str(cfg.real_split), extra)


def judge_on_real(judge, real: RealImages, captions: list[str], n: int, split: str, resamples: int,
                  seed: int) -> list[dict[str, Any]]:
    """The judge on up to ``n`` held-out real images of each caption (``split``, which it never trained on): what
    a sampler that drew real renders would score, the ceiling for the samples' judged accuracy. The last row
    (``caption`` "all") averages the captions that have images there, each weighing the same, as in the sample rows."""
    rows, hits_by_caption = [], {}
    for caption in captions:
        images = real.of(caption, n, seed, split=split)
        row = {"caption": caption, "split": split, "n": 0 if images is None else len(images),
               "objects": real.objects(caption, split)}
        if images is not None:
            hits_by_caption[caption] = judge.correct(images, torch.full((len(images),), judge.vocabulary.index(caption)))
            row |= report.accuracy_columns(hits_by_caption[caption], resamples, seed)
        rows.append(row)
    if hits_by_caption:
        rows.append({"caption": "all", "split": split, "n": sum(r["n"] for r in rows),
                     "objects": sum(r["objects"] for r in rows),
                     **report.macro_accuracy_columns(list(hits_by_caption.values()), resamples, seed)})
    return rows


def choose_captions(cfg: DictConfig, real: RealImages | None, judge_vocab: list[str]) -> tuple[list[str], str]:
    if cfg.captions:
        captions, source = [str(c) for c in cfg.captions], "given"
    elif real is not None:
        counts = real.train_counts()
        captions = [c for c, _ in counts.most_common() if c in judge_vocab][: int(cfg.num_captions)]
        source = "the most frequent training labels"
    else:
        from clipdiff.data.vocab import caption_prior

        captions = [c for c in caption_prior() if c in judge_vocab][: int(cfg.num_captions)]
        source = "the most frequent of the reference caption prior (no data.root)"
    unknown = [c for c in captions if c not in judge_vocab]
    if unknown:
        raise ClipdiffError(f"captions {unknown} are not in the judge's vocabulary of {len(judge_vocab)} captions: "
                            f"the judge could not score them")
    if not captions:
        raise ClipdiffError("no captions to evaluate (captions=[…] or a dataset with training labels)")
    return list(dict.fromkeys(captions)), source


# -- one method × scale --------------------------------------------------------------------------------------------
def build_cond(cfg: DictConfig, method: str, scale: float, targets: list[str], schedule: dict, scheduler, unet,
               device: torch.device, loaded: dict[str, Any]):
    """The method's cond_fn at ``scale``; the guide model is loaded once (``loaded``) and shared across scales."""
    if method == "none":
        return None
    node = OmegaConf.to_container(cfg.guides[method], resolve=True)
    for k in EVAL_ONLY:
        node.pop(k, None)
    if method in loaded:
        node["checkpoint"] = loaded[method]
    cond = instantiate_guidance(node, scale=scale, schedule=schedule, num_samples=len(targets), device=device,
                                targets=targets, scheduler=scheduler, unet=unet, image_size=unet.config.sample_size)
    guide = cond.guide
    loaded[method] = guide.clf if hasattr(guide, "clf") else guide.model
    return cond


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
    device = pick_device(str(cfg.device))
    unet, schedule = load_ddpm(cfg.ddpm_ckpt, key="ddpm_ckpt", device=device)
    size = int(unet.config.sample_size)
    judge = load_judge(cfg.judge_ckpt, key="judge_ckpt")
    real = open_real(cfg, size)
    captions, captions_from = choose_captions(cfg, real, judge.vocabulary)
    n = int(cfg.num_per_caption)
    targets = [c for c in captions for _ in range(n)]
    target_ids = torch.tensor([judge.vocabulary.index(c) for c in targets])

    from clipdiff.eval.fid import clip_features, fd_kid, random_features

    clean = None
    if cfg.clip_ckpt:
        from clipdiff.models.components.clip import load_clip

        clean = load_clip(cfg.clip_ckpt, key="clip_ckpt", device=device)
    space = clip_features(cfg.clip_ckpt, device=device) if clean is not None else random_features()
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
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    scheduler = sampling_scheduler(schedule, sampler["name"], **{k: v for k, v in sampler.items() if k not in SAMPLER_ONLY})

    sample(unet, scheduler, min(len(targets), int(cfg.batch_size)), steps=1, progress=False)  # warm-up (timings)
    loaded: dict[str, Any] = {}  # guide models, loaded once
    if clean is not None and str(cfg.guides.get("clip", {}).get("checkpoint")) == str(cfg.clip_ckpt):
        loaded["clip"] = clean
    rows, summary, grids = [], [], {}
    jobs = [(m, s) for m in methods for s in ([0.0] if m == "none" else
                                               (cfg.guides[m].get("scales") or cfg.scales))]
    bar = tqdm(jobs, desc="evaluate", unit="run", disable=not cfg.progress)
    for method, scale in bar:
        scale = float(scale)
        bar.set_postfix_str(f"{method} scale {scale:g}, {len(targets)} images")
        cond = build_cond(cfg, method, scale, targets, schedule, scheduler, unet, device, loaded)
        start = time.perf_counter()
        images = sample(unet, scheduler, len(targets), generator=torch.Generator().manual_seed(int(cfg.seed)),
                        steps=int(sampler["steps"]), batch_size=int(cfg.batch_size), cond_fn=cond,
                        eta=float(sampler.get("eta", 0.0)), progress=bool(cfg.progress))
        sec = (time.perf_counter() - start) / len(targets)
        save_pngs(images, targets, out_dir / "samples" / method / report.scale_name(scale))
        hits = judge.correct(images, target_ids)
        with torch.no_grad():
            guide_hit = (cond.guide.final_logits(images.to(device)).argmax(1).cpu() == cond.targets.cpu()
                         if cond is not None else torch.full((len(targets),), math.nan))
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
                        "sec_per_image": sec, "guided_steps": getattr(cond, "guided_calls", 0)})
        name = f"{method}_s{report.scale_name(scale)}"
        grids[name] = report.caption_grid(by_caption, int(cfg.grid_per_caption), out_dir / "grids" / f"{name}.png")

    results = report.write_csv(rows, report.RESULT_COLUMNS, out_dir / "results.csv")
    report.write_csv(summary, report.SUMMARY_COLUMNS, out_dir / "summary.csv")
    scales = {r["scale"] for r in summary if r["method"] != "none"}
    plot = report.plot_accuracy_vs_scale(summary, out_dir / "accuracy_vs_scale.png") if len(scales) > 1 else None
    info = {"ddpm_ckpt": cfg.ddpm_ckpt, "judge_ckpt": cfg.judge_ckpt, "seed": int(cfg.seed), "captions": captions,
            "captions_from": captions_from, "num_per_caption": n,
            "sampler": f"{sampler['name']} ({sampler['steps']} steps)",
            "guides": "; ".join(f"{m}: `{cfg.guides[m].checkpoint}`" for m in methods if m != "none") or "none",
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
