"""Evaluate guided sampling honestly: ``python -m clipdiff.evaluate ddpm_ckpt=… clip_ckpt=… noisy_clip_ckpt=…
judge_ckpt=… realism_ckpt=… [real_root=…] [captions=[…]] num_per_caption=16 scales=[3,10,30] methods=[none,clip,noisy_clip]``;
with a conditional DDPM (``model=ddpm_cond``) also ``cfg`` and ``cfg_noisy_clip`` (the other methods then sample on its
null condition, from the same initial noise).

For every method × scale one sampling call draws ``num_per_caption`` images of every caption from the same seed, so
sample i of every row starts from the same noise (a pair). Nothing that scores a row was optimised against it:

- **the judge** (never a guide) judges body type from grey images and colour separately, and refuses what does not
  look like a car render (a refused sample is wrong on every attribute);
- **realism** against held-out real renders (a split no model trained on): the unguided row against the
  unconditional mix of ``data.root``'s ``real_split``, a guided row against real renders of its target captions
  (``real_root``'s, which holds more objects per caption): a two-sample classifier test in colour and in grey
  (``c2st_rgb``, ``c2st_grey``: 0.5 = indistinguishable), and FD, KID, precision and recall in the realism net's
  feature space (``realism_ckpt``: camera pose from grey images, no captions); real against real is the floor;
- **statistics**: Wilson intervals for proportions, the judge's ceiling with intervals over objects, and each
  row's paired difference against unguided (the same initial noise) with a bootstrap interval.

Each guided method's default row (``is_default``) is its most accurate scale whose ``c2st_grey`` stays within
``default.tolerance`` of unguided (:mod:`clipdiff.eval.front`). The clean CLIP's FD (``fd``, ``kid``: the
guide's own feature space, flattering guided rows) stays in the tables for comparison with older runs.

Writes into a new run directory: ``samples/<method>/<scale>/<caption>/NNNN.png``, ``grids/<method>_s<scale>.png``,
``results.csv`` (method × caption × scale), ``summary.csv`` (captions pooled), ``judge_real.csv`` (the ceiling),
``controls.csv`` (the judge on images that are not cars), ``realism_check.csv`` (the realism measure under graded
distortions), ``steps.csv`` (the realised RMS change of eps per step), ``front.png``, ``eps_change.png``,
``accuracy_vs_scale.png``, ``report.md`` and an (offline by default) wandb run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipdiff.errors import ClipdiffError
from clipdiff.utils.cli import hydra_entry

if TYPE_CHECKING:
    import torch

    from clipdiff.pipelines.guided import GuidedPipeline, Prepared

# torch, the models and the measures are imported where they are used, after the option checks: `--help`,
# `--cfg job` and a mistyped method answer at once instead of after ~10 s of imports
log = logging.getLogger("clipdiff.evaluate")


def plan(cfg: DictConfig, pipe: GuidedPipeline, targets: list[str]) -> list[tuple[str, float, Prepared]]:
    """Every method × scale, checked and ready to draw (bad option values, prompts or guides fail here, one line
    naming the key, before anything is sampled). The unguided row comes first: the others pair with it."""
    sampler = instantiate(cfg.sampler).check()
    common = {"sampler": sampler, "seed": int(cfg.seed), "batch_size": int(cfg.batch_size)}
    methods = [str(m) for m in cfg.methods]
    jobs = [("none", 0.0, pipe.prepare(targets, method="none", **common))] if "none" in methods else []
    for method in (m for m in methods if m != "none"):
        settings = instantiate(cfg.guides[method])
        for scale in (cfg.method_scales.get(method) or cfg.scales):
            job = pipe.prepare(targets, guidance=dataclasses.replace(settings, scale=float(scale)),
                               prefix=f"guides.{method}", **common)
            jobs.append((method, float(scale), job))
    return jobs


def load(cfg: DictConfig, methods: list[str]) -> GuidedPipeline:
    """The DDPM, each guide a method needs and the clean CLIP (``clip_ckpt``, the FD/KID space), loaded once."""
    from clipdiff.pipelines.guided import GuidedPipeline, pick_device

    kinds = {instantiate(cfg.guides[m]).guide_kind for m in methods if m != "none"} - {None}  # cfg needs no guide
    paths = {kind: cfg.get(f"{kind}_ckpt") for kind in kinds}
    if cfg.clip_ckpt:
        paths["clip"] = cfg.clip_ckpt
    return GuidedPipeline.from_exports(cfg.ddpm_ckpt, paths, device=pick_device(str(cfg.device)))


def load_realism_space(cfg: DictConfig, device: torch.device):
    """The realism net of ``realism_ckpt`` as a feature space (None, with a warning, when not given)."""
    if not cfg.get("realism_ckpt"):
        log.warning("no realism_ckpt: fd_indep, kid_indep, precision and recall stay empty "
                    "(train one: python -m clipdiff.train model=realism)")
        return None
    from clipdiff.eval.realism import realism_features
    from clipdiff.models.components.realism import load_realism

    net = load_realism(str(cfg.realism_ckpt), key="realism_ckpt", map_location=device)
    return realism_features(net, name=f"realism net `{cfg.realism_ckpt}` (camera pose from grey images)")


def save_pngs(images: torch.Tensor, targets: list[str], folder: Path) -> None:
    from PIL import Image

    from clipdiff.eval import report

    arr = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    counter: Counter = Counter()
    for img, caption in zip(arr, targets):
        path = folder / report.slug(caption) / f"{counter[caption]:04d}.png"
        counter[caption] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def check(cfg: DictConfig, out_dir: Path) -> list[str]:
    if (out_dir / "results.csv").exists():
        raise ClipdiffError(f"{out_dir} already holds results; evaluation writes into a new run directory")
    methods = [str(m) for m in cfg.methods]
    bad = [m for m in methods if m != "none" and m not in cfg.guides]
    if bad or not methods:
        raise ClipdiffError(f"methods={methods}: choose from none, {', '.join(cfg.guides)}")
    if int(cfg.num_per_caption) < 2:
        raise ClipdiffError("num_per_caption must be at least 2 (FD/KID and the two-sample test need 2 samples)")
    return methods


def run(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.run_dir)
    methods = check(cfg, out_dir)
    # the DDPM export is checked (missing, not an export, another kind of model) with torch alone, before the model
    # libraries load (seconds); the pipeline reads it again, from the page cache
    from clipdiff.models.export import load_export

    load_export(cfg.ddpm_ckpt, "ddpm", key="ddpm_ckpt")
    import torch
    from tqdm.auto import tqdm

    from clipdiff.eval import front, judge_controls, report
    from clipdiff.eval.fid import clip_features, fd_kid, random_features
    from clipdiff.eval.measures import RealismMeasures
    from clipdiff.eval.real import choose_captions, judge_on_real, open_references, train_caption_counts
    from clipdiff.models.components.judge import load_judge

    pipe = load(cfg, methods)
    device, seed = pipe.device, int(cfg.seed)
    judge = load_judge(cfg.judge_ckpt, key="judge_ckpt")
    mix, by_caption = open_references(cfg, pipe.image_size)
    captions, captions_from = choose_captions(cfg, train_caption_counts(cfg) if mix is not None else None,
                                              judge.vocabulary)
    n = int(cfg.num_per_caption)
    targets = [c for c in captions for _ in range(n)]
    target_ids = torch.tensor([judge.vocabulary.index(c) for c in targets])
    jobs = plan(cfg, pipe, targets)

    clean = pipe.guides.get("clip") if cfg.clip_ckpt else None
    clip_space = clip_features(clean, name=f"clip:{cfg.clip_ckpt}") if clean is not None else random_features()
    measures = RealismMeasures(load_realism_space(cfg, device), folds=int(cfg.c2st.folds),
                                repeats=int(cfg.c2st.repeats), seed=seed, device=device)
    # the references: a guided row against real renders of its targets, the unguided row against the mix
    matched = by_caption.matched(captions, n, seed) if by_caption is not None else None
    if by_caption is not None and matched is None:
        log.warning("some captions have fewer than %d held-out real images in %s: guided rows get no realism "
                    "measures (give real_root=… with more held-out objects)", n, by_caption.name)
    reference = {"none": mix.mix(len(targets), seed) if mix is not None else None, "guided": matched}
    floor = measures.floor(mix, len(targets), seed) if mix is not None else None
    ceiling = judge_on_real(judge, by_caption, captions, int(cfg.num_real), seed) if by_caption else []
    sanity, sanity_failures = measures.distortion_check(mix, seed) if mix is not None else ([], [])

    sampler = jobs[0][2].sampler
    pipe.draw(pipe.prepare(method="none", num_samples=min(len(targets), int(cfg.batch_size)),
                           sampler=sampler.replace(steps=1)))  # warm-up (timings)
    rows, summary, grids, steps, hits_of, types = [], [], {}, [], {}, []
    bar = tqdm(jobs, desc="evaluate", unit="run", disable=not cfg.progress)
    for method, scale, job in bar:
        bar.set_postfix_str(f"{method} scale {scale:g}, {len(targets)} images")
        out = pipe.draw(job, progress=bool(cfg.progress))
        images, sec = out.images, out.seconds / len(targets)
        save_pngs(images, targets, out_dir / "samples" / method / report.scale_name(scale))
        hits = judge.correct(images, target_ids)
        raw = judge.correct(images, target_ids, refuse=False)
        hits_of[(method, scale)] = hits
        types.append({"method": method, "scale": scale,
                      **judge_controls.control_row(judge, f"{method} s{report.scale_name(scale)}", images, targets)})
        guide_hit = out.guide_correct() if out.guide_logits is not None else torch.full((len(targets),), math.nan)
        with torch.no_grad():
            clip_hit = (clean.logits(images.to(device)).argmax(1).cpu() == torch.tensor(
                [clean.vocabulary.index(c) if c in clean.vocabulary else -1 for c in targets])
                if clean is not None else torch.full((len(targets),), math.nan))
        by_cap = {}
        for k, caption in enumerate(captions):
            sl = slice(k * n, (k + 1) * n)
            by_cap[caption] = images[sl]
            fid = {"fd": math.nan, "kid": math.nan, "kid_std": math.nan}
            real = by_caption.of(caption, int(cfg.num_real), seed) if by_caption is not None else None  # (images, objects)
            if real is not None and len(real[0]) >= 2:
                fid = fd_kid(images[sl], real[0], clip_space, seed=seed, device=device)
            rows.append({"method": method, "caption": caption, "scale": scale, "n": n,
                         **report.accuracy_columns({p: hits[p][sl] for p in report.ACC}),
                         "refused": hits["refused"][sl].float().mean().item(),
                         "fd": fid["fd"], "kid": fid["kid"], "kid_std": fid["kid_std"],
                         "guide_acc": guide_hit[sl].float().mean().item(), "clip_acc": clip_hit[sl].float().mean().item(),
                         "sec_per_image": sec})
        mine = rows[-len(captions):]
        ref = reference["none" if method == "none" else "guided"]
        real_measures = measures(images, ref) if ref is not None else measures.empty()
        pooled = {"fd": math.nan, "kid": math.nan}
        if matched is not None:
            pooled = fd_kid(images, matched[0], clip_space, seed=seed, device=device)
        eps_change = [s["eps_shift_rms"] for s in out.steps]
        steps += [{"method": method, "scale": scale, **s} for s in out.steps]
        summary.append({"method": method, "scale": scale, "n": len(targets), "fd": pooled["fd"], "kid": pooled["kid"],
                        **report.accuracy_columns(hits),
                        "acc_type_raw": raw["type"].float().mean().item(),
                        "acc_colour_raw": raw["colour"].float().mean().item(),
                        "refused": hits["refused"].float().mean().item(), **real_measures,
                        "fd_mean": _mean(r["fd"] for r in mine), "kid_mean": _mean(r["kid"] for r in mine),
                        "guide_acc": guide_hit.float().mean().item(), "clip_acc": clip_hit.float().mean().item(),
                        "eps_change_rms": sum(eps_change) / len(eps_change) if eps_change else 0.0,
                        "sec_per_image": sec, "guided_steps": out.guided_steps})
        name = f"{method}_s{report.scale_name(scale)}"
        grids[name] = report.caption_grid(by_cap, int(cfg.grid_per_caption), out_dir / "grids" / f"{name}.png")

    report.add_paired_differences(summary, hits_of)
    defaults = front.mark_defaults(summary, str(cfg.default.measure), float(cfg.default.tolerance))
    controls = judge_controls.in_evaluation(cfg, pipe, judge, jobs, matched[0] if matched else None, targets)
    if controls:
        grids["controls"] = report.caption_grid({r["set"]: r["images"] for r in controls},
                                                int(cfg.grid_per_caption), out_dir / "grids" / "controls.png")

    results = report.write_csv(rows, report.RESULT_COLUMNS, out_dir / "results.csv")
    report.write_csv(summary, report.SUMMARY_COLUMNS, out_dir / "summary.csv")
    for name, table, columns in (("judge_real", ceiling, report.CEILING_COLUMNS),
                                 ("controls", controls, [c for c in controls[0] if c != "images"] if controls else None),
                                 ("realism_check", sanity, report.SANITY_COLUMNS),
                                 ("steps", steps, report.STEP_COLUMNS), ("types", types, None),
                                 ("real_vs_real", [floor] if floor else [], ["n", *report.REALISM_COLUMNS])):
        if table:
            report.write_csv(table, columns or list(table[0]), out_dir / f"{name}.csv")
    plots = {"front": front.plot_front(summary, out_dir / "front.png", tolerance=float(cfg.default.tolerance),
                                       tolerance_measure=str(cfg.default.measure)),
             "eps_change": front.plot_eps_change(steps, out_dir / "eps_change.png")}
    if len({r["scale"] for r in summary if r["method"] != "none"}) > 1:
        plots["accuracy_vs_scale"] = report.plot_accuracy_vs_scale(summary, out_dir / "accuracy_vs_scale.png")
    plots = {k: v for k, v in plots.items() if v is not None}
    guided = {m: job.guidance.guide_kind for m, _, job in jobs if job.guidance is not None}
    info = {"ddpm_ckpt": cfg.ddpm_ckpt, "judge_ckpt": cfg.judge_ckpt, "seed": seed, "captions": captions,
            "captions_from": captions_from, "num_per_caption": n,
            "sampler": f"{sampler.name} ({sampler.steps} steps)",
            "guides": "; ".join(f"{m}: `{cfg.get(kind + '_ckpt')}`" if kind else f"{m}: the conditional DDPM itself"
                                for m, kind in guided.items()) or "none",
            "mix": mix.name if mix is not None else None, "by_caption": by_caption.name if by_caption else None,
            "realism": measures.name, "clip_space": clip_space.name, "floor": floor, "defaults": defaults,
            "default": OmegaConf.to_container(cfg.default), "types": types, "sanity_failures": sanity_failures}
    md = report.markdown_report(summary, rows, info, grids, plots, out_dir, ceiling, controls, sanity)
    wandb_dir = None
    if cfg.wandb.enabled:
        wcfg = {**OmegaConf.to_container(cfg.wandb, resolve=True),
                "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)}
        wandb_dir = report.log_wandb(wcfg, rows, summary, {**grids, **plots}, out_dir, ceiling, steps)
    return {"run_dir": out_dir, "rows": rows, "summary": summary, "ceiling": ceiling, "controls": controls,
            "results": results, "report": md, "grids": grids, "plots": plots, "plot": plots.get("accuracy_vs_scale"),
            "steps": steps, "floor": floor, "defaults": defaults, "wandb_dir": wandb_dir}


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def summary_table(summary: list[dict[str, Any]]) -> str:
    from clipdiff.eval import report

    head = (f"{'method':<11} {'scale':>6} {'n':>4} {'caption':>8} {'colour':>7} {'type':>6} {'refused':>8} "
            f"{'c2st_grey':>9} {'fd_indep':>9} {'default':>7}")
    lines = [head]
    for r in summary:
        lines.append(f"{r['method']:<11} {report.scale_name(r['scale']):>6} {r['n']:>4} {r['acc_caption']:>8.2f} "
                     f"{r['acc_colour']:>7.2f} {r['acc_type']:>6.2f} {r['refused']:>8.2f} {r['c2st_grey']:>9.2f} "
                     f"{r['fd_indep']:>9.3g} {'yes' if r.get('is_default') else '':>7}")
    return "\n".join(lines)


@hydra_entry("evaluate")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(summary_table(result["summary"]))
    print(f"report: {result['report']}")
    print(f"evaluation: {result['run_dir']}")


if __name__ == "__main__":
    main()
