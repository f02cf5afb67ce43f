"""Tiny models for the guidance and evaluation tests: 8 px DDPM, CLIP, noisy CLIP and judge (models and exports)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import CONF
from omegaconf import OmegaConf
from torch import nn

from clipdiff.models.components.clip import ClipClassifier, model_from_config, tokenizer_for
from clipdiff.models.components.judge import Judge
from clipdiff.models.ddpm_module import CondDdpmModule, DdpmModule

SIZE = 8
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon", "clip_sample": True}
VOCAB = ["a blue car", "a green jeep/bus", "a red car", "a white car"]
CLIP_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "mlp_ratio": 2.0,
                           "patch_size": 4},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                         "mlp_ratio": 2.0}}


def demo_schedule() -> dict:
    """The demo's noise schedule, conf/diffusion/cosine_1000_v.yaml, with its defaults chain resolved (v-prediction:
    guidance and cfg go through the v ↔ eps conversion)."""
    cfg = OmegaConf.create()
    for name in ("linear_1000", "cosine_1000", "cosine_1000_v"):
        cfg = OmegaConf.merge(cfg, OmegaConf.load(f"{CONF}/diffusion/{name}.yaml"))
    out = OmegaConf.to_container(cfg)
    out.pop("defaults", None)
    return out


TINY_UNET = {"block_out_channels": [8, 8], "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "layers_per_block": 1}


def ddpm_export(path: Path, schedule: dict | None = None) -> Path:
    torch.manual_seed(0)
    return DdpmModule(unet=dict(TINY_UNET), diffusion=schedule or LINEAR, image_size=SIZE).export(path)


def tiny_cond_ddpm(schedule: dict | None = None, vocabulary=VOCAB, p_uncond: float = 0.1) -> CondDdpmModule:
    """The conditional DDPM (untrained; its caption embeddings are random, so eps_cond differs from eps_null)."""
    torch.manual_seed(0)
    return CondDdpmModule(unet=dict(TINY_UNET), diffusion=schedule or LINEAR, vocabulary=list(vocabulary),
                          p_uncond=p_uncond, image_size=SIZE)


def cond_ddpm_export(path: Path, schedule: dict | None = None) -> Path:
    return tiny_cond_ddpm(schedule).export(path)


def tiny_clip(vocabulary=VOCAB) -> ClipClassifier:
    torch.manual_seed(1)
    clf = ClipClassifier(model_from_config(CLIP_CFG), vocabulary, tokenizer_for(CLIP_CFG), SIZE, (0.5,) * 3, (0.25,) * 3,
                         model_cfg=CLIP_CFG)
    clf.model.logit_scale.data.fill_(3.0)
    return clf.eval().requires_grad_(False)


def clip_export(path: Path) -> Path:
    return tiny_clip().export(path)


def tiny_judge(vocabulary=VOCAB) -> Judge:
    """An untrained judge (colour net, grey type net) whose refusal rule accepts every image: its threshold is
    -2, the lowest score a k-NN distance between unit vectors allows."""
    torch.manual_seed(2)
    judge = Judge(list(vocabulary), image_size=SIZE, type_net={"widths": [8, 8], "blocks": [1, 1]},
                  colour_net={"widths": [8], "blocks": [1]})
    with torch.no_grad():
        bank = judge.embed(torch.rand(8, 3, SIZE, SIZE))
    judge.calibrate(bank, bank, quantile=0.0)
    judge.threshold.fill_(-2.0)
    return judge.eval()


def judge_export(path: Path, vocabulary=VOCAB) -> Path:
    return tiny_judge(vocabulary).export(path)


def tiny_noisy_clip(image_size: int = SIZE, schedule: dict | None = None):
    """The real NoisyClipClassifier on the tiny CLIP, with a small random timestep embedding (so t matters).
    ``image_size`` other than 8 only changes what it declares (for the size check)."""
    from clipdiff.models.components.noisy_clip import NoisyClipClassifier

    clip = tiny_clip()
    clip.image_size = image_size
    torch.manual_seed(4)
    model = NoisyClipClassifier(clip, schedule or LINEAR)
    nn.init.normal_(model.time_embed.linear_2.weight, std=0.02)
    return model.eval().requires_grad_(False)


def noisy_clip_export(path: Path) -> Path:
    return tiny_noisy_clip().export(path)


class TextlessNoisyClip(nn.Module):
    """A guide model with the noisy-CLIP contract (vocabulary, image_size, schedule, logits(x_t, t),
    encode_image, text_features) but no text tower: free-text prompts must be refused."""

    def __init__(self, vocabulary=VOCAB, image_size: int = SIZE, schedule: dict | None = None, dim: int = 16):
        super().__init__()
        torch.manual_seed(3)
        self.vocabulary, self.image_size, self.schedule = list(vocabulary), image_size, dict(schedule or LINEAR)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1),
                                 nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, dim))
        self.time = nn.Linear(1, dim)
        self.register_buffer("text_features", F.normalize(torch.randn(len(vocabulary), dim), dim=-1))

    def encode_image(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).float().reshape(-1, 1).expand(x_t.shape[0], 1)
        return F.normalize(self.net(x_t) + self.time(t / 1000), dim=-1)

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 20.0 * self.encode_image(x_t, t) @ self.text_features.T
