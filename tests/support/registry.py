"""The shipped adapter registry as the tests use it: each task's version 1 only.

The delivery, rollout, trainer and chaos tests build their own later versions (copies of v1, a
corrupt v3, a candidate trained from the live version) and name them by number, so they start
from a registry whose newest version is known: :data:`PINNED`. The versions shipped after it
(the tuned version 2 of each text task) have their own tests: the demo, the benchmark's quick
mode and ``tests/integration/test_shipped_versions.py``."""

from __future__ import annotations

import shutil
from pathlib import Path

from streamtune.core.settings import Settings

PINNED = 1


def pinned_registry(dst: Path, artifacts: bool = True) -> Path:
    """Copy version :data:`PINNED` of every shipped task into the registry ``dst``; without its
    ONNX ``artifacts`` when ``artifacts`` is false (a test that exports them itself)."""
    src = Settings().model.adapter_dir
    ignore = None if artifacts else shutil.ignore_patterns("artifacts")
    for task_dir in sorted(p for p in src.iterdir() if p.is_dir() and (p / str(PINNED)).is_dir()):
        shutil.copytree(task_dir / str(PINNED), dst / task_dir.name / str(PINNED), ignore=ignore)
    return dst
