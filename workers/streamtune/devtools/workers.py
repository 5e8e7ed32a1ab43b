"""Worker processes (`streamtune scorer` / `streamtune trainer`) started by the demo and the
benchmarks, with settings passed as ``STREAMTUNE_*`` variables (the only way workers read them)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from streamtune.core.errors import StartupError
from streamtune.core.settings import REPO_ROOT, Settings


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTUNE_")}
    for name, _, value in settings.flat_items():
        if value is None:
            continue  # unset stays unset (an env var would read as the string "None")
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, dict | list):  # pydantic-settings reads complex values as JSON
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[name] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    # The same checkout as the caller, whatever the virtualenv's editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "workers"), env.get("PYTHONPATH")) if p)
    return env


class Worker:
    """One worker process; its output goes to ``log``; ``nice`` lowers its CPU priority."""

    def __init__(self, command: str, settings: Settings, log: Path, nice: int = 0) -> None:
        self.command = command
        self.settings = settings
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["nice", "-n", str(nice), sys.executable, "-m", "streamtune.cli", command]
                if nice
                else [sys.executable, "-m", "streamtune.cli", command],
                env=settings_env(settings),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.settings.ops.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-15:]
            raise StartupError(f"{self.command} exited with {self.proc.returncode}:\n" + "\n".join(tail))

    def wait_ready(self, timeout_s: float = 600.0, progress: Callable[[], None] | None = None) -> Worker:
        """Until /metrics answers (the worker has loaded its model and started). The bound covers
        a scorer that exports its ONNX artifacts at start (``export_on_start``): about 60 s per
        artifact on 2 idle cores, several times that on busy ones. ``progress`` runs at each poll
        (the demo prints the exports from the log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if progress is not None:
                progress()
            with contextlib.suppress(OSError):
                self.metrics()
                return self
            time.sleep(0.2)
        raise StartupError(f"{self.command} not ready after {timeout_s:.0f} s (log: {self.log})")

    def wait_for(self, cond: Callable[..., object], timeout_s: float, what: str) -> None:
        """Poll ``cond`` while the worker lives; a dead worker or ``timeout_s`` is an error."""
        deadline = time.monotonic() + timeout_s
        while not cond():
            self.check_alive()
            if time.monotonic() > deadline:
                raise StartupError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.05)

    def terminate(self) -> None:
        """SIGTERM to the worker's process group, without waiting (:meth:`stop` waits)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def json_record(line: str) -> dict[str, object] | None:
    """A worker log line's JSON record (after any prefix such as a timestamp), or None."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        rec = json.loads(line[start:])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


class LogTail:
    """What a worker's log gained since the last call, in whole lines (a half-written last line
    waits for the next call)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()

    def records(self) -> list[dict[str, object]]:
        return [rec for line in self.lines() if (rec := json_record(line)) is not None]
