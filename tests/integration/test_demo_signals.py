"""`streamtune demo` stopped by a signal leaves nothing running (issue 13, "leftover processes").

The demo is started as a user would (``streamtune demo --no-live-view``). Once its broker,
Redis, scorer and trainer run and the replay has begun, it gets SIGTERM (a process manager,
``kill``); while it stops, SIGHUP (the terminal closed after Ctrl-C), which before cut the
shutdown short and left the broker, Redis and the trainer behind. Every process the demo had
started must be gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from streamtune.core.settings import REPO_ROOT
from support.waiting import wait_until

pytestmark = pytest.mark.integration


def _named(procs: list[psutil.Process], needle: str) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if needle in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue  # gone meanwhile
    return out


def test_sigterm_then_sighup_while_stopping_leave_no_process_behind(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTUNE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "workers"), env.get("PYTHONPATH")) if p)
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamtune.cli", "demo", "--no-live-view"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, start_new_session=True,
        )  # fmt: skip
    demo = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        names = ("kafka.Kafka", "redis-server", "streamtune.cli scorer", "streamtune.cli trainer")

        def running() -> bool:
            kids = demo.children(recursive=True)
            up = all(_named(kids, n) for n in names) and "replaying at" in out.read_text(errors="replace")
            started[:] = kids  # the snapshot right before the signal
            return up

        def alive() -> None:
            assert proc.poll() is None, out.read_text(errors="replace")[-3000:]

        wait_until(running, 600, "the demo's broker, Redis, scorer, trainer and replay", guard=alive)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping (SIGTERM)" in out.read_text(errors="replace"), 60, "the demo stopping")
        proc.send_signal(signal.SIGHUP)  # while it stops: ignored, the shutdown goes on
        assert proc.wait(timeout=180) == 0, out.read_text(errors="replace")[-3000:]
        _, left = psutil.wait_procs(started, timeout=30)
        assert not left, f"left running: {[p.cmdline() for p in left]}"
        assert "demo stopped; stack shut down." in out.read_text(errors="replace")
    finally:
        for p in [demo, *started]:  # whatever a failure left: never leak it into the next test
            with contextlib.suppress(psutil.Error):
                p.kill()
