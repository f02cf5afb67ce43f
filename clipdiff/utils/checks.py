"""Numbers from the command line, checked where a command reads them: one line naming the key, not a ``TypeError``
from deep inside torch (``model.optimizer.lr=abc``, ``num_samples=abc``, ``data.batch_size=0``)."""

from __future__ import annotations

import inspect
import numbers
from typing import Any

from clipdiff.errors import ClipdiffError


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def count(value: Any, key: str, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` as an int ≥ ``minimum`` (None passes when ``optional``), else a ClipdiffError naming ``key``."""
    if value is None and optional:
        return None
    if not is_number(value) or int(value) != value or (minimum is not None and value < minimum):
        what = "a whole number" + (f" ≥ {minimum}" if minimum is not None else "")
        raise ClipdiffError(f"{key}={value!r} must be {what}" + (" or null" if optional else ""))
    return int(value)


def number(value: Any, key: str) -> float:
    if not is_number(value):
        raise ClipdiffError(f"{key}={value!r} must be a number")
    return float(value)


def check_call_args(node: Any, key: str) -> None:
    """Every argument in a ``_target_`` config node (and the nodes nested in it) whose default in the target's
    signature is a number must be given as a number: ``model.optimizer.lr=abc`` is named here, before the
    optimizer compares a string with 0.0 in the middle of ``trainer.fit``."""
    from hydra.utils import get_object

    if not isinstance(node, dict):
        return
    for k, v in node.items():
        if isinstance(v, dict):
            check_call_args(v, f"{key}.{k}")
    target = node.get("_target_")
    if not isinstance(target, str):
        return
    try:
        params = inspect.signature(get_object(target)).parameters
    except (ImportError, ValueError, TypeError, AttributeError):
        return  # an unknown target is reported by instantiate itself
    for name, value in node.items():
        default = params[name].default if name in params else inspect.Parameter.empty
        if is_number(default) and value is not None and not is_number(value):
            raise ClipdiffError(f"{key}.{name}={value!r} must be a number (default {default!r})")
