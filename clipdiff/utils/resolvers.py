"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

import netrc
import os

from omegaconf import DictConfig, OmegaConf


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


def group_choice(group: str, *, _root_: DictConfig) -> str:
    """The option chosen for a config group (``${clipdiff_choice:model}`` → ``clip``), wherever it is resolved.

    ``${hydra:runtime.choices.model}`` needs a job's HydraConfig, which does not exist yet when a multirun's
    launcher resolves ``hydra.sweep.dir``: there the composed config still holds its ``hydra`` node (with the
    choices), while inside a job Hydra has removed that node and set HydraConfig."""
    hydra_node = _root_.get("hydra") if isinstance(_root_, DictConfig) else None
    if hydra_node is not None and "runtime" in hydra_node:
        choices = hydra_node.runtime.choices
    else:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    value = choices.get(group)
    if value is None:
        raise KeyError(f"no option chosen for config group '{group}'")
    return str(value)


def seeded(path: str, seed) -> str:
    """``${clipdiff_seeded:outputs/demo,${seed}}``: the path itself for seed 0, ``<path>_seed<N>`` for another seed,
    so a seed sweep of the pipeline keeps the demo as its seed-0 member and gives every other seed its own workdir."""
    return str(path) if int(seed) == 0 else f"{path}_seed{int(seed)}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("clipdiff_seeded"):
        OmegaConf.register_new_resolver("clipdiff_seeded", seeded)
    if not OmegaConf.has_resolver("clipdiff_wandb_mode"):
        OmegaConf.register_new_resolver("clipdiff_wandb_mode", wandb_mode)
    if not OmegaConf.has_resolver("clipdiff_choice"):
        OmegaConf.register_new_resolver("clipdiff_choice", group_choice)
