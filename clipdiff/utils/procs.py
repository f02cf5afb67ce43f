"""Child processes whose output goes to a log file in full and to the console prefixed with their name.

Several pipeline stages run at once; their lines are prefixed (``[ddpm] …``) so they can be told apart, and
progress-bar redraws (``\\r`` updates) reach the console at most every ``progress_every`` seconds per process
(the log file keeps them all).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


class LoggedProcess:
    """``subprocess.Popen`` of ``cmd`` with stdout+stderr teed to ``log_path`` and to ``console`` with a prefix."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 console: TextIO | None = None, progress_every: float = 30.0):
        self.name, self.started = name, time.time()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed by poll() when the process ends)
        self._console = console or sys.stdout
        self._progress_every = progress_every
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _show(self, text: str) -> None:
        self._console.write(f"[{self.name}] {text}\n")
        self._console.flush()

    def _pump(self) -> None:
        buf, last_redraw = b"", 0.0
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self._log.write(chunk)
            self._log.flush()
            buf += chunk
            # complete segments end in \n (a line) or \r (a progress-bar redraw); the tail waits for more bytes
            *segments, buf = re.split(rb"(?<=[\r\n])", buf)
            for seg in segments:
                text = seg.rstrip(b"\r\n").decode(errors="replace").strip()
                if not text:
                    continue
                if seg.endswith(b"\n"):
                    self._show(text)
                elif time.time() - last_redraw >= self._progress_every:
                    last_redraw = time.time()
                    self._show(text)
        if buf.strip():
            self._show(buf.decode(errors="replace").strip())

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None:
            self._reader.join()
            self._log.close()
        return code

    def send_signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 300) -> int:
        """Wait for the process to end, killing it after ``timeout`` s; its exit code."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.poll()
        return self.proc.returncode


def terminate_all(processes: list[LoggedProcess], timeout: float = 300) -> list[int]:
    """SIGTERM to every process at once (a training stage writes last.ckpt before it exits), then wait for each
    (killed after ``timeout`` s); their exit codes, in order."""
    for p in processes:
        p.send_signal(signal.SIGTERM)
    return [p.wait(timeout) for p in processes]


@contextlib.contextmanager
def stop_requests(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """While inside, SIGTERM and SIGINT do not end this process: they are appended to the yielded list, for the
    caller to stop its children in order (outside the main thread nothing is installed)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
