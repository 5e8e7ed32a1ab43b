"""What each version served, kept until its label arrives: how the trainer judges the error rate
of each served version on labelled traffic (``DriftWatch.observe_errors``).

The trainer reads the scorers' output topics; a result names its event (text tasks) or session
(session tasks: the latest result of a session is its prediction when the session's label
arrives) and the version that produced it. Pure and bounded: the oldest answers go first once
``limit`` are held, and a judged answer is dropped (one label, one judgement).

A label can be read before the answer it judges: a trainer that starts (or restarts) behind
both topics reads their backlogs in no set order. An event task's label then waits, bounded
like the answers, for its one answer. A session's label does not: its session has many answers
and the label judges the last, which a waiting label cannot tell from the first."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from streamtune.core.tasks import TaskSpec


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
    _waiting: OrderedDict[tuple[str, str], str] = field(default_factory=OrderedDict)  # true labels

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def waiting(self) -> int:
        """Labels read before their answer, still waiting for it."""
        return len(self._waiting)

    def add(self, served: Served) -> tuple[int, bool] | None:
        """Remember an answer; if its label was read first, the judgement (as :meth:`judge`)."""
        key = (served.task, served.ident)
        true_label = self._waiting.pop(key, None)
        if true_label is not None:
            return served.version, served.label != true_label
        self._answers.pop(key, None)  # a session's newer result replaces its older one
        self._answers[key] = (served.version, served.label)
        _trim(self._answers, self.limit)
        return None

    def judge(self, task: str, ident: str, true_label: str, wait: bool = False) -> tuple[int, bool] | None:
        """(version, whether its served label was wrong) for a label; None when nothing that
        was served is known for it (not seen yet, or dropped as the oldest). With ``wait`` the
        label is kept, and :meth:`add` judges it when its answer arrives."""
        answer = self._answers.pop((task, ident), None)
        if answer is None:
            if wait:
                self._waiting.pop((task, ident), None)
                self._waiting[(task, ident)] = true_label
                _trim(self._waiting, self.limit)
            return None
        version, label = answer
        return version, label != true_label


def _trim(book: OrderedDict[tuple[str, str], Any], limit: int) -> None:
    while len(book) > limit:
        book.popitem(last=False)
