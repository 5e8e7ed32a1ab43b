"""What each version served, kept until its label arrives: how the trainer judges the error rate
of each served version on labelled traffic (``DriftWatch.observe_errors``).

The trainer reads the scorers' output topics; a result names its event (text tasks) or session
(session tasks: the latest result of a session is its prediction when the session's label
arrives) and the version that produced it. Pure and bounded: the oldest answers go first once
``limit`` are held, and a judged answer is dropped (one label, one judgement)."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from streamtune.core.tasks import TASKS, TaskSpec


@dataclass(frozen=True, slots=True)
class Served:
    task: str
    ident: str  # what a label names: the event id, or the session id of a session task
    version: int
    label: str  # the served (most likely) class


def served_of(spec: TaskSpec, value: bytes | str) -> Served | None:
    """A result record of ``spec``'s output topic as what was served (None: not a result)."""
    try:
        doc: Any = json.loads(value)
        ident = doc["session_id"] if spec.labels_session else doc["event_id"]
        version, label = doc["adapter"]["version"], doc["label"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(version, int) or isinstance(version, bool):
        return None
    if not isinstance(ident, str) or not isinstance(label, str) or doc.get("task") != spec.name:
        return None
    return Served(spec.name, ident, version, label)


@dataclass
class ServedBook:
    limit: int = 100_000
    _answers: OrderedDict[tuple[str, str], tuple[int, str]] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, served: Served) -> None:
        key = (served.task, served.ident)
        self._answers.pop(key, None)  # a session's newer result replaces its older one
        self._answers[key] = (served.version, served.label)
        while len(self._answers) > self.limit:
            self._answers.popitem(last=False)

    def judge(self, task: str, ident: str, true_label: str) -> tuple[int, bool] | None:
        """(version, whether its served label was wrong) for a label; None when nothing that
        was served is known for it (never seen, or dropped as the oldest)."""
        answer = self._answers.pop((task, ident), None)
        if answer is None:
            return None
        version, label = answer
        return version, label != true_label


def label_ident(task: str, event_id: str | None, session_id: str | None) -> str | None:
    """What a label of ``task`` names, as :class:`Served` records it."""
    return session_id if TASKS[task].labels_session else event_id
