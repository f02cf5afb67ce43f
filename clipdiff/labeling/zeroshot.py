"""Zero-shot labels from a CLIP export (``python -m clipdiff.label clip_ckpt=RUN/export.pt``).

For a user with real pretrained CLIP weights on disk: each object's caption is the CLIP's best caption,
averaging its logits over at most ``views`` views. ``vocabulary=restricted`` keeps the CLIP's captions that
are among the 43 original ones; ``free`` keeps all of its vocabulary. Confidence: the softmax probability.
Bad input is flagged like in the image-statistics labeller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipdiff.data.srn import load_image, select_views
from clipdiff.data.vocab import caption_prior, parse_caption
from clipdiff.errors import ClipdiffError
from clipdiff.labeling.colour import car_mask
from clipdiff.labeling.labeller import BLANK_PIXELS, Analysis, Decision, list_views


def _load_views(obj_dir: Path, views: int | None) -> tuple[Analysis, list[np.ndarray]]:
    a = Analysis(obj_dir.name)
    found = list_views(obj_dir)
    a.views_found = len(found)
    images = []
    for v in select_views(found, views) if found else []:
        try:
            rgb = load_image(v)
        except ClipdiffError:
            a.unreadable += 1
            continue
        if car_mask(rgb).mean() < BLANK_PIXELS:
            a.blank += 1
            continue
        images.append(rgb)
        a.used_paths.append(str(v))
    a.views_used = len(images)
    return a, images


def clip_decisions(dirs: Sequence[Path], views: int | None, clip_ckpt: str, device: str = "cpu",
                   vocabulary: str = "restricted", progress: bool = True) -> list[tuple[Analysis, Decision]]:
    import torch
    from tqdm import tqdm

    from clipdiff.models.components.clip import load_clip

    clf = load_clip(clip_ckpt, key="clip_ckpt", device=device)
    vocab = list(clf.vocabulary)
    allowed = np.array([vocabulary == "free" or c in caption_prior() for c in vocab])
    if not allowed.any():
        raise ClipdiffError(f"clip_ckpt={clip_ckpt}: none of its {len(vocab)} captions is among the 43 original "
                            "ones; use vocabulary=free")
    parsed = [parse_caption(c) for c in vocab]
    fallback = max(caption_prior().items(), key=lambda kv: kv[1])[0]
    out = []
    for d in tqdm(dirs, unit="obj", desc="clip", disable=not progress, dynamic_ncols=True):
        a, images = _load_views(Path(d), views)
        if not images:
            p = parse_caption(fallback)
            out.append((a, Decision(fallback, 0.0, p.colours, p.body_type, 0.0, 0.0, fallback, float("inf"), [])))
            continue
        x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            logp = torch.log_softmax(clf.logits(x), dim=-1).mean(0).cpu().numpy()
        free_best = int(np.argmax(logp))
        logp = np.where(allowed, logp, -np.inf)
        prob = np.exp(logp - logp.max())
        prob /= prob.sum()
        best = int(np.argmax(prob))
        colour_conf = float(sum(prob[i] for i, c in enumerate(parsed) if c.colours == parsed[best].colours))
        type_conf = float(sum(prob[i] for i, c in enumerate(parsed) if c.body_type == parsed[best].body_type))
        order = np.argsort(-prob)
        out.append((a, Decision(vocab[best], float(prob[best]), parsed[best].colours, parsed[best].body_type,
                                colour_conf, type_conf, vocab[free_best], float(-logp[best]),
                                [(vocab[int(i)], float(prob[int(i)])) for i in order[1:3]])))
    return out
