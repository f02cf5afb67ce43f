"""open_clip models for clipdiff, and :class:`ClipClassifier`: a CLIP read as a classifier over the captions.

* Architectures are open_clip JSON configs. The tiny ones shipped in ``clip_configs/`` (``clipdiff-tiny-32``,
  ``clipdiff-tiny-64``) train on a CPU; ``clipdiff-vitb-64`` (ViT-B/32's size reading 64 px through 8 px patches: the
  GPU preset's) and open_clip's own (``ViT-B-32`` …) are there for GPUs.
* ``pretrained`` is ``None`` (random init) or a local weights file in one of open_clip's formats
  (``.pt``/``.bin``/``.safetensors``/``.npz``, an OpenAI JIT file, a state_dict or ``{"state_dict": …}``).
  Hub tags such as ``openai`` need a network; here they fail with a ClipdiffError naming the config key.
* :class:`ClipClassifier` takes images in ``[0, 1]``, resizes them to the model's input size, applies the
  model's mean/std as tensor ops (differentiable, so a guide can backpropagate to the pixels), and scores them
  against the tokenised caption vocabulary. :func:`load_clip` rebuilds it from an ``export.pt`` alone.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from clipdiff.errors import ClipdiffError
from clipdiff.models.export import load_export, save_export

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("clip_configs")
open_clip.add_model_config(CONFIG_DIR)


def model_config(name: str, image_size: int | None = None) -> dict[str, Any]:
    """The open_clip config dict registered as ``name`` (with an optional vision input size override)."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        tiny = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ClipdiffError(
            f"model.model_name={name} is not an open_clip architecture (clipdiff's: {', '.join(tiny)}; "
            f"open_clip's include ViT-B-32, ViT-B-16, RN50)"
        )
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    return cfg


def create_clip(name: str, pretrained: str | None = None, image_size: int | None = None,
                key: str = "model.pretrained") -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Build ``name`` with open_clip (random init or local weights): ``(model, model_cfg, preprocess_cfg)``."""
    cfg = model_config(name, image_size)
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ClipdiffError(
                f"{key}={pretrained} is not a file: give a local open_clip weights file (.pt/.bin/.safetensors) "
                f"or null for random init (hub tags cannot be downloaded here)"
            )
        pretrained = str(path)
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, output_dict=True, force_image_size=image_size
        )
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipdiffError(f"{key}={pretrained} could not be loaded into {name}: {first[:300]}") from None
    return model, cfg, dict(open_clip.get_model_preprocess_cfg(model))


def model_from_config(cfg: dict[str, Any]) -> nn.Module:
    """An open_clip model from a config dict alone (no JSON file, no registry), as ``create_model`` builds it."""
    cfg = copy.deepcopy(cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        raise ClipdiffError("CoCa-style open_clip configs are not supported by clipdiff")
    return (CustomTextCLIP if custom else CLIP)(**cfg, output_dict=True)


def tokenizer_for(cfg: dict[str, Any], name: str | None = None):
    """open_clip's tokenizer for a model: by registered name when it matches ``cfg``, else from ``cfg`` itself."""
    if name and open_clip.get_model_config(name) == cfg:
        return open_clip.get_tokenizer(name)
    text = cfg.get("text_cfg", {})
    if text.get("hf_tokenizer_name"):
        return open_clip.HFTokenizer(text["hf_tokenizer_name"], context_length=text.get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=text.get("context_length", 77), **(text.get("tokenizer_kwargs") or {}))


class ClipClassifier(nn.Module):
    """A CLIP over a fixed caption vocabulary: images in [0, 1] → normalised features → caption logits.

    ``logits(x) = exp(logit_scale) · cos(f(x), T_k)`` for every caption ``k``; ``text_features`` ([V, D],
    normalised) is cached and refreshed by :meth:`refresh_text_features` (after the weights change).
    """

    def __init__(self, model: nn.Module, vocabulary: Sequence[str], tokenizer, image_size: int,
                 mean: Sequence[float], std: Sequence[float], model_cfg: dict[str, Any] | None = None,
                 model_name: str | None = None):
        super().__init__()
        self.model = model
        self.vocabulary = list(vocabulary)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.model_cfg = copy.deepcopy(model_cfg) if model_cfg is not None else None
        self.model_name = model_name
        self.register_buffer("tokens", tokenizer(self.vocabulary), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("text_features", torch.empty(0), persistent=False)

    # -- images ------------------------------------------------------------------------------------------------
    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → the model's input (resized, normalised); differentiable."""
        if x01.shape[-2:] != (self.image_size, self.image_size):
            x01 = F.interpolate(x01, size=(self.image_size, self.image_size), mode="bilinear",
                                align_corners=False, antialias=x01.shape[-1] > self.image_size)
        return (x01 - self.mean) / self.std

    def encode_image(self, x01: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(x01), normalize=normalize)

    # -- text --------------------------------------------------------------------------------------------------
    def encode_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def encode_captions(self, ids: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """Text features of vocabulary entries ``ids`` (all when None), with gradients."""
        tokens = self.tokens if ids is None else self.tokens[ids]
        return self.encode_tokens(tokens, normalize)

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Features of free text (e.g. a caption outside the vocabulary)."""
        return self.encode_tokens(self.tokenizer(list(texts)).to(self.tokens.device), normalize)

    @torch.no_grad()
    def refresh_text_features(self) -> torch.Tensor:
        self.text_features = self.encode_captions().detach()
        return self.text_features

    def get_text_features(self) -> torch.Tensor:
        if self.text_features.numel() == 0 or self.text_features.device != self.tokens.device:
            self.refresh_text_features()
        return self.text_features

    # -- scores ------------------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, V] caption logits: logit_scale · cosine(image, caption)."""
        return self.logit_scale * self.encode_image(x01) @ self.get_text_features().T

    forward = logits

    def caption_id(self, caption: str) -> int:
        try:
            return self.vocabulary.index(caption)
        except ValueError:
            raise ClipdiffError(f"caption {caption!r} is not in this CLIP's vocabulary of {len(self.vocabulary)}") from None

    # -- export ------------------------------------------------------------------------------------------------
    def export(self, path: str | Path, **extra: Any) -> Path:
        if self.model_cfg is None:
            raise ClipdiffError("this ClipClassifier has no open_clip config to export")
        return save_export(
            path, "clip", open_clip_config=self.model_cfg, model_name=self.model_name,
            state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            vocabulary=self.vocabulary, image_size=self.image_size,
            image_mean=self.mean.flatten().tolist(), image_std=self.std.flatten().tolist(), **extra,
        )


def classifier_from_export(obj: dict[str, Any]) -> ClipClassifier:
    cfg = obj["open_clip_config"]
    model = model_from_config(cfg)
    model.load_state_dict(obj["state_dict"])
    clf = ClipClassifier(model, obj["vocabulary"], tokenizer_for(cfg, obj.get("model_name")), obj["image_size"],
                         obj["image_mean"], obj["image_std"], model_cfg=cfg, model_name=obj.get("model_name"))
    return clf.eval().requires_grad_(False)


def load_clip(path_or_export: str | Path | dict[str, Any], key: str = "clip_checkpoint",
              device: str | torch.device = "cpu") -> ClipClassifier:
    """A ClipClassifier (eval mode, frozen, text features cached) from an ``export.pt``, its run dir, or its dict.

    Anything else (a DDPM or judge export, a Lightning ``.ckpt``, a missing file) is one ClipdiffError line
    naming ``key``.
    """
    if isinstance(path_or_export, dict):
        obj = path_or_export
        if obj.get("kind") != "clip":
            raise ClipdiffError(f"{key}: the export given holds a {obj.get('kind')} model, but a clip model is needed here")
    else:
        obj = load_export(path_or_export, "clip", key=key)
    clf = classifier_from_export(obj).to(device)
    clf.refresh_text_features()
    return clf
