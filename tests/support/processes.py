"""Real worker processes (``streamtune scorer`` / ``trainer``) driven from a test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.devtools.workers import settings_env as worker_env
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
        return f"--- {self.log_path.name} (last {chars} chars) ---\n{self.log()[-chars:]}"

    def stacks(self) -> str:
        """What a stalled worker is doing, for a timeout's message: every thread's Python stack
        from outside (py-spy: works while the event loop is blocked) and, from inside, every
        asyncio task's (mode's SIGUSR1 handler; needs the loop to run), bounded by 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        spy = Path(sys.executable).with_name("py-spy")
        try:
            dump = subprocess.run(
                [str(spy), "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True, timeout=30
            )
            threads = dump.stdout + dump.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            threads = f"(py-spy failed: {e})"
        size = self.log_path.stat().st_size
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return f"--- {self.log_path.name}: threads ---\n{threads}\n(the process ended meanwhile)"
        deadline, last = time.monotonic() + 10, -1
        while time.monotonic() < deadline:
            now = self.log_path.stat().st_size
            if now > size and now == last:  # the dump started and stopped growing
                break
            last = now
            time.sleep(0.5)
        with self.log_path.open("rb") as f:
            f.seek(size)
            tasks = f.read().decode(errors="replace")
        return f"--- {self.log_path.name}: threads ---\n{threads}\n--- asyncio tasks ---\n{tasks[-20000:]}"

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
