"""The timestep-aware noisy CLIP: an open_clip ViT that reads x_t and t, scored against the caption vocabulary.

:class:`NoisyClipClassifier` wraps a :class:`~clipdiff.models.components.clip.ClipClassifier` (composition, not a
copy of open_clip's forward):

* **Input.** ``x_t`` is in the DDPM's scale (data in [-1, 1] plus noise, exactly what the UNet sees). It is mapped
  to the clean CLIP's input statistics the naive way — ``x01 = (x_t + 1) / 2``, resized to ``image_size``, then
  the CLIP mean/std — without clamping, so the map is linear and differentiable.
* **Timestep.** ``TimestepEmbedding(Timesteps(t))`` (diffusers) gives a ``[B, width]`` vector that a forward hook on
  the vision transformer's ``ln_pre`` adds to every token of the sequence entering the transformer. The last
  projection is zero-initialised, so before training the model is exactly the clean CLIP it started from.
* **Text.** The text tower is the clean CLIP's (frozen by default in training), so caption features are shared.

``logits(x_t, t) = exp(logit_scale) · cos(f(x_t, t), T_k)`` over the vocabulary. :func:`load_noisy_clip` rebuilds
it from an ``export.pt`` alone (no Lightning) — the guided sampler's entry point.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from clipdiff.diffusion.schedule import check_compatible, schedule_config
from clipdiff.errors import ClipdiffError
from clipdiff.models.components.clip import ClipClassifier, model_from_config, tokenizer_for
from clipdiff.models.export import load_export, save_export

KIND = "noisy_clip"


def clip_from_export(obj: Mapping[str, Any], vocabulary: list[str] | None = None) -> ClipClassifier:
    """A trainable ClipClassifier from a clean ``clip`` export dict, over ``vocabulary`` (default: the export's)."""
    cfg = obj["open_clip_config"]
    model = model_from_config(cfg)
    model.load_state_dict(obj["state_dict"])
    return ClipClassifier(model, list(vocabulary or obj["vocabulary"]), tokenizer_for(cfg, obj.get("model_name")),
                          obj["image_size"], obj["image_mean"], obj["image_std"], model_cfg=cfg,
                          model_name=obj.get("model_name"))


def to_unit_range(x_t: torch.Tensor) -> torch.Tensor:
    """DDPM scale → the [0, 1] scale a clean CLIP reads (not clamped: noise keeps its full range)."""
    return (x_t + 1.0) * 0.5


class NoisyClipClassifier(nn.Module):
    """``logits(x_t, t)`` / ``encode_image(x_t, t)`` / ``text_features``: see the module docstring.

    ``embedding`` configures the timestep embedding: ``freq_channels`` (sinusoidal features of t) and
    ``hidden_dim`` (null: 4 × the vision width).
    """

    def __init__(self, clip: ClipClassifier, schedule: Mapping[str, Any], embedding: Mapping[str, Any] | None = None):
        super().__init__()
        visual = getattr(clip.model, "visual", None)
        if not hasattr(visual, "ln_pre") or not hasattr(visual, "class_embedding"):
            raise ClipdiffError(f"the noisy CLIP needs an open_clip ViT image tower; {type(visual).__name__} is not one")
        self.clip = clip
        self.schedule = schedule_config(schedule)
        self.num_timesteps = int(self.schedule.get("num_train_timesteps", 1000))
        width = int(visual.class_embedding.shape[-1])
        emb = dict(embedding or {})
        self.embedding_config = {"freq_channels": int(emb.get("freq_channels") or 128),
                                 "hidden_dim": int(emb.get("hidden_dim") or 4 * width), "width": width}
        c = self.embedding_config
        self.time_proj = Timesteps(c["freq_channels"], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(c["freq_channels"], c["hidden_dim"], out_dim=width)
        nn.init.zeros_(self.time_embed.linear_2.weight)
        nn.init.zeros_(self.time_embed.linear_2.bias)
        self._cond: torch.Tensor | None = None
        visual.ln_pre.register_forward_hook(self._add_timestep)

    # -- conditioning ------------------------------------------------------------------------------------------
    def _add_timestep(self, module: nn.Module, args: Any, tokens: torch.Tensor) -> torch.Tensor:
        if self._cond is None:
            raise ClipdiffError("the noisy CLIP's image tower needs a timestep: call encode_image(x_t, t)")
        return tokens + self._cond[:, None, :].to(tokens.dtype)

    def timesteps(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """``t`` (int, 0-d or [B], on the training scale 0..T-1) as a float [B] tensor."""
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ClipdiffError(f"timesteps of shape {tuple(t.shape)} for a batch of {batch} images")
        return t.float()

    def time_embedding(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        proj = self.time_proj(self.timesteps(t, batch, device))
        return self.time_embed(proj.to(self.time_embed.linear_1.weight.dtype))

    # -- images ------------------------------------------------------------------------------------------------
    def encode_image(self, x_t: torch.Tensor, t: int | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, D] features of noisy images in the DDPM's scale at timesteps ``t``; differentiable in ``x_t``."""
        self._cond = self.time_embedding(t, x_t.shape[0], x_t.device)
        try:
            return self.clip.encode_image(to_unit_range(x_t), normalize=normalize)
        finally:
            self._cond = None

    # -- text --------------------------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> list[str]:
        return self.clip.vocabulary

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    @property
    def text_features(self) -> torch.Tensor:
        """[K, D] normalised caption features (cached; :meth:`refresh_text_features` after the weights change)."""
        return self.clip.get_text_features()

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Features of free text (e.g. a prompt outside the vocabulary), with the shared text tower."""
        return self.clip.encode_text(texts, normalize)

    def refresh_text_features(self) -> torch.Tensor:
        return self.clip.refresh_text_features()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    # -- scores ------------------------------------------------------------------------------------------------
    def logits(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """[B, K] caption logits: logit_scale · cosine(f(x_t, t), T_k)."""
        return self.logit_scale * self.encode_image(x_t, t) @ self.text_features.T

    forward = logits

    def caption_id(self, caption: str) -> int:
        return self.clip.caption_id(caption)

    def check_schedule(self, schedule: Mapping[str, Any], name: str = "the DDPM") -> None:
        """One ClipdiffError line when ``schedule`` does not give the x_t this model was trained on."""
        check_compatible(schedule, self.schedule, names=(name, "the noisy CLIP"))

    # -- export ------------------------------------------------------------------------------------------------
    def export(self, path: str | Path, **extra: Any) -> Path:
        clip = self.clip
        if clip.model_cfg is None:
            raise ClipdiffError("this noisy CLIP has no open_clip config to export")
        return save_export(
            path, KIND, open_clip_config=clip.model_cfg, model_name=clip.model_name,
            state_dict={k: v.detach().cpu() for k, v in self.state_dict().items()},
            timestep_embedding=dict(self.embedding_config), vocabulary=list(clip.vocabulary),
            image_size=clip.image_size, image_mean=clip.mean.flatten().tolist(), image_std=clip.std.flatten().tolist(),
            schedule=copy.deepcopy(self.schedule), **extra,
        )


def load_noisy_clip(path: str | Path | Mapping[str, Any], key: str = "noisy_clip_ckpt",
                    schedule: Mapping[str, Any] | None = None,
                    device: str | torch.device = "cpu") -> NoisyClipClassifier:
    """A NoisyClipClassifier (eval mode, frozen weights, text features cached) from its ``export.pt`` or run dir.

    A missing file, a Lightning checkpoint or another kind of export is one ClipdiffError line naming ``key``;
    with ``schedule`` (e.g. the DDPM's) a noise-schedule mismatch is one too.
    """
    obj = dict(path) if isinstance(path, Mapping) else load_export(path, KIND, key=key)
    if obj.get("kind") != KIND:
        raise ClipdiffError(f"{key}: the export given holds a {obj.get('kind')} model, but a {KIND} model is needed here")
    clip = ClipClassifier(model_from_config(obj["open_clip_config"]), obj["vocabulary"],
                          tokenizer_for(obj["open_clip_config"], obj.get("model_name")), obj["image_size"],
                          obj["image_mean"], obj["image_std"], model_cfg=obj["open_clip_config"],
                          model_name=obj.get("model_name"))
    guide = NoisyClipClassifier(clip, obj["schedule"], obj["timestep_embedding"])
    guide.load_state_dict(obj["state_dict"])
    guide = guide.to(device).eval().requires_grad_(False)
    if schedule is not None:
        guide.check_schedule(schedule)
    guide.refresh_text_features()
    return guide
