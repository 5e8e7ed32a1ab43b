"""Real worker processes (``streamtune scorer`` / ``trainer``) driven from a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.devtools.workers import settings_env as worker_env
from streamtune.ops.tasks_dump import DUMP_EVENT, DUMP_SIGNAL
from support.waiting import wait_until


def settings_env(settings: Settings) -> dict[str, str]:
    """A worker's environment: the settings as ``STREAMTUNE_*``, this checkout on PYTHONPATH."""
    return worker_env(settings)


class ScorerProcess:
    """A real ``streamtune scorer`` process."""

    def __init__(self, settings: Settings, log_path: Path, command: str = "scorer") -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ScorerProcess:
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamtune.cli", self.command],
            env=settings_env(self.settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        wait_until(self.ready, 180, f"the {self.command} to start and serve /metrics", poll_s=0.3)
        return self

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.settings.ops.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.command} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")

    def ready(self) -> bool:
        self.assert_alive()
        try:
            self.metrics()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 8000) -> str:
        text = "".join(line for line in self.log().splitlines(keepends=True) if DUMP_MARK not in line)
        return f"--- {self.log_path.name} (last {chars} chars) ---\n{text[-chars:]}"

    def stacks(self) -> str:
        """What a stalled worker is doing, for a timeout's message: from inside, every asyncio
        task's await chain, ours first (SIGUSR2: streamtune/ops/tasks_dump.py; needs the loop to
        run), then every thread's Python stack from outside (py-spy: works while the event loop
        is blocked). Compact, and tasks first: CI keeps the start of a long message."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        size = self.log_path.stat().st_size
        try:
            os.kill(self.proc.pid, DUMP_SIGNAL)
        except ProcessLookupError:
            return f"--- {self.log_path.name}: (the process ended meanwhile)"

        def dumped() -> str | None:
            with self.log_path.open("rb") as f:
                f.seek(size)
                lines = f.read().decode(errors="replace").splitlines()
            return next((line for line in lines if DUMP_MARK in line), None)

        try:
            tasks = _format_tasks(wait_until(dumped, 10, f"an {DUMP_EVENT} line", 0.2))
        except AssertionError:
            tasks = f"(no {DUMP_EVENT} line within 10 s: the event loop is blocked)"
        spy = Path(sys.executable).with_name("py-spy")
        try:
            dump = subprocess.run(
                [str(spy), "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True, timeout=30
            )
            threads = dump.stdout + dump.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            threads = f"(py-spy failed: {e})"
        return f"--- {self.log_path.name}: asyncio tasks ---\n{tasks}\n--- threads ---\n{threads[-6000:]}"

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        return int(self.proc.returncode)


DUMP_MARK = f'"{DUMP_EVENT}"'  # the dump's event name, as it appears in a JSON log line


def _format_tasks(line: str) -> str:
    """One ``asyncio_tasks`` log line as a task per paragraph, the await chain innermost last."""
    try:
        tasks = json.loads(line)["tasks"]
    except (ValueError, KeyError, TypeError):
        return line
    return "\n".join(f"{name}\n    " + "\n    ".join(chain) for name, chain in tasks.items())
