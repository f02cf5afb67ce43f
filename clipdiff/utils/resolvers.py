"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

import netrc
import os

from omegaconf import OmegaConf


def wandb_mode() -> str:
    """WANDB_MODE when set; else 'online' for a logged-in user (API key or ~/.netrc entry); else 'offline'."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return "offline"
    return "online" if any("wandb" in h for h in hosts) else "offline"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("clipdiff_wandb_mode"):
        OmegaConf.register_new_resolver("clipdiff_wandb_mode", wandb_mode)
