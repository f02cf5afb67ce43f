"""Shared plumbing for the Hydra entry points (``python -m clipdiff.<command>``)."""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from clipdiff.errors import ClipdiffError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

log = logging.getLogger("clipdiff")


WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an exception a user can fix, or None for a bug (which keeps its traceback).

    A :class:`ClipdiffError` anywhere in the ``raise … from`` chain counts (Hydra's ``instantiate`` wraps whatever a
    constructor raised in an ``InstantiationException``), and so does a file that cannot be written or read for lack
    of permission (a read-only output, cache or checkpoint folder), named with what to do."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClipdiffError):
            return str(seen)
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            where = str(seen.filename or "a file")
            if os.path.basename(where).startswith(".") and where.endswith(".tmp"):  # an atomic write's temporary
                where = os.path.dirname(where)
            return (f"cannot write {where} ({seen.strerror}): make that folder writable, or point the command at "
                    "one that is (hydra.run.dir=…, paths.output_dir=…, data.cache_dir=…)")
        seen = seen.__cause__
    return None


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Turn ``fn(cfg)`` into a Hydra command that reports a user's error (:func:`user_error`) as one line, exit
    code 2, and Ctrl-C outside training (which stops itself, saving a checkpoint) as one line, exit code 130."""

    def wrap(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            _hand_errors_back_to_hydra()
            try:
                return fn(cfg)
            except KeyboardInterrupt:
                print("clipdiff: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
                sys.exit(128 + signal.SIGINT)
            except Exception as e:
                message = user_error(e)
                if message is None:
                    raise
                print(f"clipdiff: error: {message}", file=sys.stderr, flush=True)
                sys.exit(2)

        main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)

        @functools.wraps(fn)
        def entry() -> Any:
            """Hydra reports what fails before the task starts (a run directory it cannot create) as a traceback:
            until the task starts, ``HYDRA_FULL_ERROR`` makes it raise here instead, where a user's error becomes
            one line and anything else goes back to Hydra's own report."""
            global _full_error_ours
            _full_error_ours = "HYDRA_FULL_ERROR" not in os.environ
            if _full_error_ours:
                os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return main()
            except Exception as e:
                if not _hand_errors_back_to_hydra():
                    raise
                message = user_error(e)
                if message is None:
                    from hydra._internal.utils import run_and_report

                    def again(error: Exception = e) -> None:
                        raise error

                    run_and_report(again)  # prints as Hydra would have, exits 1
                    raise
                print(f"clipdiff: error: {message}", file=sys.stderr, flush=True)
                sys.exit(2)
            finally:
                _hand_errors_back_to_hydra()

        return entry

    return wrap


_full_error_ours = False


def _hand_errors_back_to_hydra() -> bool:
    """Unset the ``HYDRA_FULL_ERROR`` that :func:`hydra_entry` set (not a user's): True when it was ours."""
    global _full_error_ours
    ours, _full_error_ours = _full_error_ours, False
    if ours:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    return ours


def run_dir() -> Path:
    """The current Hydra run directory (or the working directory outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(os.getcwd())


class KeepEarlierConfig(HydraCallback):
    """Hydra writes ``.hydra/`` (config, overrides) into the run directory before a command starts, so a command
    pointed at an existing run directory (``hydra.run.dir=…``: refused, resumed or overwritten) would replace the
    earlier run's record of how it was made: it is kept as ``.hydra.bak-<time>`` first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        earlier = Path(str(config.hydra.run.dir)) / str(config.hydra.output_subdir or ".hydra")
        if earlier.is_dir():
            kept = earlier.with_name(f"{earlier.name}.bak-{datetime.now():%Y%m%d-%H%M%S-%f}")
            os.replace(earlier, kept)
