"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab, 2017, "Revisiting Classifier Two-Sample Tests", ICLR).

Can a fresh classifier tell the images of ``a`` from those of ``b``? A small CNN, initialised anew in every fold
(never a pretrained or project model, so no guide or judge shares its features), is trained on k − 1 folds and
predicts the held-out fold; held-out accuracy pooled over the k folds is the statistic. 0.5 means the sets cannot
be told apart (the real-against-real floor sits there), 1.0 that every image gives its set away. The interval is
Wilson's on the pooled held-out predictions, over objects when views are grouped
(:func:`clipdiff.eval.stats.clustered_proportion`).

``grey=True`` compares luminance only (Rec. 601 weights), so a set that differs from the other in colour alone
cannot be told apart: shape, not colour. Classes are balanced by subsampling the larger set (with ``seed``);
folds are stratified. Several views of one object (real renders) must be grouped (``groups_a``/``groups_b``):
otherwise the net recognises an object seen in training from its other views, and two sets of different objects
from the same distribution look separable.

What the number means depends on the classifier's budget: a longer-trained net separates more. On the demo's
32-px data (128 against 128, mean of 3 seeds, RGB/grey), held-out renders against other held-out renders give
0.53/0.53 at the default 8 epochs and 0.50/0.54 at 12; unguided samples against renders 0.84/0.87 at 8 epochs
but 0.99/0.96 at 12, where the test saturates and guided rows can no longer be ranked against unguided; the
blobs of an over-guided run 0.99/0.99 at both. Compare accuracies only at the same settings and image counts. One
run varies by several points with ``seed`` (folds, subsample and initialisation: unguided RGB gave 0.79, 0.89
and 0.84); :func:`c2st_repeats` averages seeds. Everything is seeded: the same inputs, seed and thread count
give the same result on one machine.

Cost: 128 against 128 images at 32 px, 5 folds, default settings: about 2.3 s of CPU time on one thread for RGB
and 1.8 s for grey (measured on a shared 2-core EPYC), plus a one-off ~3 s in a fresh process, where
``torch.optim`` first imports ``torch._dynamo``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipdiff.errors import ClipdiffError
from clipdiff.eval.stats import clustered_proportion, seed_spread

LUMA = (0.299, 0.587, 0.114)


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ClipdiffError(f"c2st: {name} must be float images [N, 3, H, W] in [0, 1], got "
                            f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not x.is_floating_point():
        raise ClipdiffError(f"c2st: {name} must be float images in [0, 1], got dtype {x.dtype}")
    return x.detach().float()


def prepare(x: torch.Tensor, grey: bool, max_size: int | None) -> torch.Tensor:
    """Images as the classifier sees them: downsampled (antialiased) to ``max_size`` if larger, luminance if
    ``grey``, mapped to [-1, 1]."""
    if max_size is not None and max(x.shape[-2:]) > max_size:
        x = F.interpolate(x, size=(max_size, max_size), mode="bilinear", antialias=True, align_corners=False)
    if grey:
        x = (x * torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.clamp(0, 1) * 2 - 1


class FoldCNNs(nn.Module):
    """``k`` independent small CNNs run as one network (grouped convolutions): fold f's net sees only channel group f.

    Each net: three stride-2 3×3 convolutions (``width``, 2·``width``, 2·``width`` channels, batch norm, ReLU),
    global average and max pooling, one logit. Grouped layers initialise every group as a separate layer would, so this is k fresh
    nets; running them together only saves the per-step overhead that dominates such small nets on a CPU.
    """

    def __init__(self, k: int, channels: int, width: int = 8):
        super().__init__()
        self.k, self.feat = k, 2 * width
        w1, w2 = k * width, k * 2 * width
        self.body = nn.Sequential(
            nn.Conv2d(k * channels, w1, 3, 2, 1, groups=k), nn.BatchNorm2d(w1), nn.ReLU(),
            nn.Conv2d(w1, w2, 3, 2, 1, groups=k), nn.BatchNorm2d(w2), nn.ReLU(),
            nn.Conv2d(w2, w2, 3, 2, 1, groups=k), nn.BatchNorm2d(w2), nn.ReLU(),
        )
        self.head = nn.Conv1d(k * 2 * self.feat, k, 1, groups=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, k, C, H, W] (image b of net f at ``x[b, f]``) → logits [B, k]."""
        batch = x.shape[0]
        x = x.flatten(1, 2).contiguous(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU
        h = self.body(x).reshape(batch, self.k, self.feat, -1)
        pooled = torch.cat([h.mean(-1), h.amax(-1)], 2).view(batch, -1, 1)
        return self.head(pooled).squeeze(-1)


def _augment(padded: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Augment a batch of edge-padded images [B, C, H + 2s, W + 2s] (rows in random order): one random shift of
    up to ``shift`` px for the batch, and the first half of the rows mirrored (so a random half)."""
    dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    h, w = padded.shape[-2] - 2 * shift, padded.shape[-1] - 2 * shift
    x = padded[..., dy : dy + h, dx : dx + w]
    half = len(x) // 2
    return torch.cat([x[:half].flip(-1), x[half:]])


def _groups(g, length: int, name: str) -> torch.Tensor | None:
    if g is None:
        return None
    g = torch.as_tensor(g)
    if g.shape != (length,):
        raise ClipdiffError(f"c2st: {name} must hold one group id per image ({length}), got shape {tuple(g.shape)}")
    return torch.unique(g, return_inverse=True)[1]


def _deal(groups: torch.Tensor | None, n: int, folds: int, gen: torch.Generator) -> torch.Tensor:
    """Fold of each of ``n`` (already shuffled) images: round-robin, or whole groups to the emptiest fold."""
    if groups is None:
        return torch.arange(n) % folds
    ids, sizes = torch.unique(groups, return_counts=True)
    if len(ids) < folds:
        raise ClipdiffError(f"c2st with {folds} folds needs images of at least {folds} groups (objects) in each "
                            f"set, got {len(ids)}")
    fill = [0] * folds
    fold_of_group = {}
    for j in torch.randperm(len(ids), generator=gen).tolist():  # seeded order; largest-first would be greedier
        k = min(range(folds), key=lambda f: (fill[f], f))
        fold_of_group[int(ids[j])] = k
        fill[k] += int(sizes[j])
    return torch.tensor([fold_of_group[int(g)] for g in groups])


def _batches(train: list[torch.Tensor], epochs: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Image indices [steps, batch, nets]: for each net a stream of reshuffled passes over its own training
    images ``train[f]``, ``epochs`` passes over the largest set (smaller sets wrap round), cut into batches."""
    batch = min(batch_size, min(len(t) for t in train))
    steps = epochs * math.ceil(max(len(t) for t in train) / batch)
    streams = []
    for t in train:
        reps = math.ceil(steps * batch / len(t))
        streams.append(torch.cat([t[torch.randperm(len(t), generator=gen)] for _ in range(reps)])[: steps * batch])
    return torch.stack(streams, 1).view(steps, batch, len(train))


def _train(x: torch.Tensor, y: torch.Tensor, fold_of: torch.Tensor, folds: int, seed: int, *, width: int,
           epochs: int, batch_size: int, lr: float, weight_decay: float, shift: int) -> nn.Module:
    """Train net f of a :class:`FoldCNNs` on the images outside fold f: ``epochs`` passes over the largest
    training set, each net drawing its own batches (AdamW, one-cycle learning rate, flip and shift augmentation).
    ``x`` and ``y`` live on the training device, ``fold_of`` on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FoldCNNs(folds, x.shape[1], width).to(x.device, memory_format=torch.channels_last)
    train = [torch.nonzero(fold_of != f).squeeze(1) for f in range(folds)]
    index = _batches(train, epochs, batch_size, gen).to(x.device)
    steps, batch = index.shape[:2]
    # class weights per net so that both classes weigh half of its loss even when whole groups left its folds
    # unequal: no net can lean on the class prior of its training set
    labels = y.cpu()
    weight = torch.zeros(len(x), folds)
    for f, t in enumerate(train):
        pos = labels[t].sum()
        weight[t, f] = torch.where(labels[t] > 0, len(t) / (2 * pos), len(t) / (2 * (len(t) - pos)))
    weight, nets = weight.to(x.device), torch.arange(folds, device=x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    model.train()
    for idx in index:
        xb = _augment(padded[idx].flatten(0, 1), shift, gen).view(batch, folds, *x.shape[1:])
        # sum over nets of each net's mean loss: the nets share no parameter, so each gets its own gradient
        loss = F.binary_cross_entropy_with_logits(model(xb), y[idx], reduction="none") * weight[idx, nets]
        loss = loss.mean(0).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def c2st(a: torch.Tensor, b: torch.Tensor, *, groups_a=None, groups_b=None, grey: bool = False, folds: int = 5,
         seed: int = 0, max_size: int | None = 32, width: int = 8, epochs: int = 8, batch_size: int = 16, lr: float = 1e-2,
         weight_decay: float = 1e-2, shift: int = 2, level: float = 0.95,
         device: str | torch.device = "cpu") -> dict[str, Any]:
    """Classifier two-sample test of image sets ``a`` and ``b`` (float [N, 3, H, W] in [0, 1], same H and W).

    Both sets are cut to ``n = min(len(a), len(b))`` images (a seeded subsample of the larger); ``folds``
    stratified folds each train a fresh small CNN (:class:`FoldCNNs`) for ``epochs`` (AdamW, one-cycle learning
    rate, flips and shifts of up to ``shift`` px, class-weighted loss) on the other folds and predict their own.
    ``groups_a``/``groups_b`` (one id per image, e.g. the object id of a real render's view) keep each group in
    one fold and make the interval one over groups. ``grey`` compares luminance only; images larger than
    ``max_size`` are first downsampled to it.

    Returns ``acc`` (held-out accuracy pooled over folds), ``lo``/``hi`` (Wilson interval at ``level``, over
    groups where given), ``n`` (images per set used), ``n_test`` (2n predictions), ``correct``, ``n_eff``
    (effective number of independent predictions behind the interval), ``fold_acc`` (list), ``grey``, ``folds``
    and ``seed``.
    """
    a, b = _check(a, "a"), _check(b, "b")
    if a.shape[-2:] != b.shape[-2:]:
        raise ClipdiffError(f"c2st: a and b must have the same image size, got {tuple(a.shape[-2:])} and "
                            f"{tuple(b.shape[-2:])}")
    if folds < 2:
        raise ClipdiffError(f"c2st needs at least 2 folds, got {folds}")
    n = min(len(a), len(b))
    if n < 2 * folds:
        raise ClipdiffError(f"c2st with {folds} folds needs at least {2 * folds} images in each set, got "
                            f"{len(a)} and {len(b)}")
    groups = [_groups(g, len(s), name) for g, s, name in ((groups_a, a, "groups_a"), (groups_b, b, "groups_b"))]
    gen = torch.Generator().manual_seed(seed)
    # balance by a seeded subsample, then deal each class into folds (stratified; whole groups when given)
    picks = [torch.randperm(len(s), generator=gen)[:n] for s in (a, b)]
    x = torch.cat([prepare(s[p], grey, max_size) for s, p in zip((a, b), picks, strict=True)]).to(device)
    y = torch.cat([torch.zeros(n), torch.ones(n)]).to(device)
    fold_of = torch.cat([_deal(None if g is None else g[p], n, folds, gen) for g, p in zip(groups, picks, strict=True)])
    model = _train(x, y, fold_of, folds, seed, width=width, epochs=epochs, batch_size=batch_size,
                   lr=lr, weight_decay=weight_decay, shift=shift)
    with torch.no_grad():
        logits = torch.cat([model(chunk[:, None].expand(-1, folds, -1, -1, -1)) for chunk in x.split(256)])
    own = logits.cpu().gather(1, fold_of.view(-1, 1)).squeeze(1)  # each image judged by the net it was held out of
    hits = (own > 0) == y.cpu().bool()
    fold_acc = [float(hits[fold_of == f].float().mean()) for f in range(folds)]
    # interval over independent units: a group (object) of views counts as a cluster, an ungrouped image alone
    cluster, offset = torch.arange(2 * n), 2 * n
    for c, (g, p) in enumerate(zip(groups, picks, strict=True)):
        if g is not None:
            cluster[c * n : (c + 1) * n] = offset + g[p]
            offset += int(g.max()) + 1
    interval = clustered_proportion(hits.numpy(), cluster.numpy(), level)
    correct = int(hits.sum())
    acc, lo, hi = correct / (2 * n), interval["lo"], interval["hi"]
    return {"acc": acc, "lo": lo, "hi": hi, "n": n, "n_test": 2 * n, "correct": correct, "fold_acc": fold_acc,
            "n_eff": interval["n_eff"], "grey": grey, "folds": folds, "seed": seed}


def c2st_repeats(a: torch.Tensor, b: torch.Tensor, *, repeats: int = 3, seed: int = 0, **kwargs) -> dict[str, Any]:
    """:func:`c2st` with seeds ``seed … seed + repeats − 1`` (new folds, subsample and nets each time), averaged.

    Returns ``acc`` (mean accuracy), ``spread`` (:func:`clipdiff.eval.stats.seed_spread` of the accuracies: std,
    min, max and a t-interval over the repeats, i.e. the training noise only) and ``runs`` (each :func:`c2st`
    result; a run's ``lo``/``hi`` is the sampling interval of that run).
    """
    if repeats < 1:
        raise ClipdiffError(f"c2st_repeats needs at least 1 repeat, got {repeats}")
    runs = [c2st(a, b, seed=seed + r, **kwargs) for r in range(repeats)]
    spread = seed_spread([r["acc"] for r in runs])
    return {"acc": spread["mean"], "spread": spread, "runs": runs}
