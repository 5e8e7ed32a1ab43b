"""Rollout state: which version serves a task, which one is in canary, for what share.

Release records live on the compacted ``adapters.releases`` topic, keyed by task, so the
topic always holds each task's current state; a new scorer reads it to the end on start.
Refusals by scorers are keyed ``<task>/refused`` so they never overwrite the state.
Routing is a pure function of the entity key: a product or session stays on one version.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from streamtune.core.events import TaskName

Stage = Literal["canary", "live", "rolled_back", "refused"]


class Release(BaseModel):
    """One rollout action and the state it leaves the task in."""

    model_config = ConfigDict(frozen=True)

    task: TaskName
    version: int = Field(ge=1, description="The version this action is about")
    stage: Stage
    live_version: int = Field(ge=1, description="The version serving everything not in canary")
    canary_version: int | None = None
    canary_fraction: float = Field(0.0, ge=0.0, le=1.0)
    manifest_sha256: str = Field(
        "", description="sha256 of the served version's manifest; scorers refuse a record without it"
    )
    forced: bool = Field(
        False,
        description=(
            "Released by an operator although its gate rejected it (`adapters promote|canary --force`, "
            "or a rollback to such a version): scorers serve a version whose manifest is not "
            "releasable only from a forced record"
        ),
    )
    reason: str = ""
    by: str = ""
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def key(self) -> bytes:
        return (f"{self.task}/refused" if self.stage == "refused" else self.task).encode()


def canary_bucket(key: str) -> float:
    """A stable number in [0, 1) for an entity key (same on every scorer and every run)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_canary(key: str, fraction: float) -> bool:
    return fraction > 0.0 and canary_bucket(key) < fraction


def canary(
    task: TaskName, version: int, fraction: float, live: int, sha: str, by: str = "", forced: bool = False
) -> Release:
    return Release(
        task=task, version=version, stage="canary", live_version=live, canary_version=version,
        canary_fraction=fraction, manifest_sha256=sha, by=by, forced=forced,
    )  # fmt: skip


def promote(task: TaskName, version: int, sha: str, by: str = "", forced: bool = False) -> Release:
    return Release(
        task=task,
        version=version,
        stage="live",
        live_version=version,
        manifest_sha256=sha,
        by=by,
        forced=forced,
    )


def rollback(
    task: TaskName, bad: int, to: int, sha: str, reason: str = "", by: str = "", forced: bool = False
) -> Release:
    return Release(
        task=task,
        version=bad,
        stage="rolled_back",
        live_version=to,
        manifest_sha256=sha,
        forced=forced,
        reason=reason,
        by=by,
    )


def current_states(records: list[Release]) -> dict[str, Release]:
    """The latest state record per task (refusals excluded), as compaction keeps it."""
    state: dict[str, Release] = {}
    for r in records:
        if r.stage != "refused":
            state[r.task] = r
    return state
