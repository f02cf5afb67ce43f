"""The label-aware contrastive loss against hand-written references, alone and gathered over 2 DDP processes."""

from __future__ import annotations

import math
import os
import socket

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipdiff.models.components.losses import LabelAwareClipLoss, label_aware_clip_loss, same_caption_targets


def reference_loss(img: torch.Tensor, txt: torch.Tensor, scale: float, labels: list[int]) -> torch.Tensor:
    """Straight from the definition, one row at a time: the positives of row i are all items of caption y_i."""
    n = len(labels)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            logits = [scale * float(a[i] @ b[j]) for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(n) if labels[j] == labels[i]]
            total += -sum(logits[j] - log_z for j in pos) / len(pos) / n
    return torch.tensor(total / 2)


def features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_loss_matches_hand_computation_with_duplicate_captions():
    labels = [0, 2, 0, 1, 2, 0]
    img, txt = features(len(labels))
    got = LabelAwareClipLoss()(img, txt, torch.tensor(3.0), torch.tensor(labels))
    assert torch.allclose(got, reference_loss(img, txt, 3.0, labels), atol=1e-5)
    assert same_caption_targets(torch.tensor(labels), torch.tensor(labels))[0].tolist() == pytest.approx(
        [1 / 3, 0, 1 / 3, 0, 0, 1 / 3])


def test_duplicate_captions_are_not_negatives():
    """The loss pulls together (negative gradient on the logit) every pair of one caption; plain CLIP pushes them apart.

    With one-hot image features, text feature ``txt[j, i]`` *is* the logit of the pair (image i, text j).
    """
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    n = len(labels)
    txt0 = 0.1 * torch.randn(n, n, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, y in (("aware", labels), ("plain", None)):
        txt = txt0.clone().requires_grad_(True)
        label_aware_clip_loss(torch.eye(n), txt, torch.tensor(1.0), y).backward()
        grads[name] = txt.grad.T  # [image, text]
    same = labels[:, None] == labels[None, :]
    duplicates = same & ~torch.eye(n, dtype=torch.bool)
    assert duplicates.sum() == 8
    assert (grads["aware"][duplicates] < 0).all()  # a positive: pulled together
    assert (grads["plain"][duplicates] > 0).all()  # a negative under plain CLIP
    assert (grads["aware"][~same] > 0).all() and (grads["plain"][~same] > 0).all()


def test_distinct_captions_reduce_to_open_clip_loss():
    img, txt = features(7, seed=1)
    ours = LabelAwareClipLoss()(img, txt, torch.tensor(10.0), torch.arange(7))
    theirs = open_clip.ClipLoss()(img, txt, torch.tensor(10.0))
    assert torch.allclose(ours, theirs, atol=1e-6)
    plain = LabelAwareClipLoss(label_aware=False)(img, txt, torch.tensor(10.0), torch.zeros(7, dtype=torch.long))
    assert torch.allclose(plain, theirs, atol=1e-6)


def _ddp_worker(rank: int, world: int, port: int, img, txt, labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = len(labels) // world
        local_img = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        local_txt = txt[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss = LabelAwareClipLoss(rank=rank, world_size=world)(local_img, local_txt, torch.tensor(5.0),
                                                                labels[rank * n:(rank + 1) * n])
        loss.backward()
        # DDP averages gradients over ranks: what a rank applies is its gradient / world
        out[rank] = (loss.item(), local_img.grad / world, local_txt.grad / world)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_gather_gives_the_global_batch_gradient():
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    img, txt = features(len(labels), seed=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, img, txt, labels, out), nprocs=2, join=True)

    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    full = LabelAwareClipLoss()(full_img, full_txt, torch.tensor(5.0), labels)
    full.backward()
    losses = [out[r][0] for r in range(2)]
    assert sum(losses) / 2 == pytest.approx(full.item(), abs=1e-5)
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), full_img.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]), full_txt.grad, atol=1e-6)
