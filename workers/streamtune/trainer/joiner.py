"""Join late labels to their inputs: pure bookkeeping over three mappings, no Kafka, no metrics.

The trainer keeps three tables (Faust tables with changelogs in production, plain dicts in tests):

* ``inputs``  key ``task:event_id`` (text tasks) or ``task:session_id`` (session tasks: the
  session state so far): what a label joins to. Bounded by event-time window and count.
* ``joined``  key ``task:id``: one joined label (:class:`~streamtune.training.online.Example`);
  the first label of an input wins, later ones are duplicates. Bounded per task (replay pool).
* ``pending`` labels that arrived before their input; after the label wait they are orphans.

Every entry records the changelog partition it was written to (``cp``: the partition of the
event being processed when it was written). Entries are only ever written through the mapping
(``table[key] = value``: Faust sends the change to the current event's changelog partition) and
removed through the ``evict`` callback with an :class:`Eviction`, which names the table, the key
and the partition its tombstone must go to (a sweep runs outside any event, so the deletion
cannot go through the mapping).

The stored JSON keeps the one-letter keys of the first trainer release, so changelogs written by
an older trainer recover in a newer one: an input is ``{"x": text, "t": ts, "cp": p}`` or
``{"s": session, "t": ts, "cp": p}``, a pending label ``{"label": {"y", "p", "o", "t"},
"arrived": ts, "cp": p}``, a joined one ``{"ex": Example.to_json(), "cp": p}``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from streamtune.core.events import ClickEvent, LabelEvent
from streamtune.core.features import SessionState, apply_click, session_row, vectorize
from streamtune.core.tasks import TASKS, TaskSpec
from streamtune.training.online import Example, Watermark, is_fresh, label_key, label_name

TableName = Literal["inputs", "joined", "pending"]
Table = MutableMapping[str, Any]


def task_of(key: str) -> str:
    """The task a table key belongs to (keys are ``task:id``)."""
    return key.split(":", 1)[0]


def join_key(spec: TaskSpec, event: Any) -> str:
    """What a label of this input names: the session (session tasks) or the event."""
    return f"{spec.name}:{event.session_id if spec.labels_session else event.event_id}"


# ---------------------------------------------------------------------------------------------
# Records (stored as JSON with one-letter keys)


@dataclass(frozen=True, slots=True)
class TextInput:
    """A text task's held input: the text the model reads."""

    text: str  # "x"
    ts: float  # "t": event time, epoch seconds
    partition: int  # "cp"

    def model_input(self) -> str:
        return self.text

    def to_json(self) -> dict[str, Any]:
        return {"x": self.text, "t": self.ts, "cp": self.partition}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextInput:
        return cls(str(d["x"]), float(d["t"]), int(d["cp"]))


@dataclass(frozen=True, slots=True)
class SessionInput:
    """A session task's held input: the session state after its latest click."""

    state: SessionState  # "s"
    ts: float  # "t": time of the latest click, epoch seconds
    partition: int  # "cp"

    def model_input(self) -> list[float]:
        return vectorize(session_row(self.state))

    def to_json(self) -> dict[str, Any]:
        return {"s": self.state.model_dump(mode="json"), "t": self.ts, "cp": self.partition}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SessionInput:
        return cls(SessionState.model_validate(d["s"]), float(d["t"]), int(d["cp"]))


HeldInput = TextInput | SessionInput


def held_input(spec: TaskSpec, d: Mapping[str, Any]) -> HeldInput:
    """Read an ``inputs`` entry of the task."""
    return SessionInput.from_json(d) if spec.labels_session else TextInput.from_json(d)


@dataclass(frozen=True, slots=True)
class Label:
    """A label as the trainer joins it: the class name and where and when it was labelled."""

    y: str  # "y": class name
    partition: int  # "p": labels topic partition
    offset: int  # "o"
    ts: float  # "t": label time, epoch seconds

    def to_json(self) -> dict[str, Any]:
        return {"y": self.y, "p": self.partition, "o": self.offset, "t": self.ts}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Label:
        return cls(str(d["y"]), int(d["p"]), int(d["o"]), float(d["t"]))


@dataclass(frozen=True, slots=True)
class PendingLabel:
    """A label waiting for its input."""

    label: Label  # "label"
    arrived: float  # "arrived": wall-clock time it was received, epoch seconds
    partition: int  # "cp"

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label.to_json(), "arrived": self.arrived, "cp": self.partition}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PendingLabel:
        return cls(Label.from_json(d["label"]), float(d["arrived"]), int(d["cp"]))


@dataclass(frozen=True, slots=True)
class JoinedLabel:
    """A label joined to its input."""

    example: Example  # "ex"
    partition: int  # "cp"

    def to_json(self) -> dict[str, Any]:
        return {"ex": self.example.to_json(), "cp": self.partition}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> JoinedLabel:
        return cls(Example.from_json(d["ex"]), int(d["cp"]))


# ---------------------------------------------------------------------------------------------
# What happened


@dataclass(frozen=True, slots=True)
class Eviction:
    """Delete ``key`` from ``table`` and send its tombstone to changelog ``partition``."""

    table: TableName
    key: str
    partition: int


@dataclass(frozen=True, slots=True)
class InputAdded:
    """An input was stored (or a session updated)."""

    task: str
    key: str
    joined: Example | None = None  # the pending label that joined it
    evicted: Eviction | None = None  # the pending label's tombstone (also when it did not join)


class LabelStatus(enum.Enum):
    JOINED = "joined"  # its input is held: joined now
    DUPLICATE = "duplicate"  # the input already has a label (joined or pending): dropped
    PENDING = "pending"  # the input is not held (yet): waits


@dataclass(frozen=True, slots=True)
class LabelOutcome:
    status: LabelStatus
    task: str
    key: str
    joined: Example | None = None


@dataclass(frozen=True)
class SweepOutcome:
    inputs_evicted: int  # by window or count
    orphans: dict[str, int]  # pending labels given up, per task
    replay_evicted: dict[str, int]  # joined labels beyond the replay pool, per task (non-zero only)
    evictions: list[Eviction] = field(default_factory=list)  # every tombstone, in the order sent
    inputs_held: int = 0  # after the sweep
    labels_pending: int = 0


@dataclass(frozen=True, slots=True)
class JoinLimits:
    input_window_s: float  # inputs older than this (event time, vs. the sweep's now) go
    max_inputs: int  # at most this many inputs are held; the oldest go first
    label_wait_s: float  # a pending label waits this long for its input, then is an orphan
    replay_max: int  # joined labels already trained on kept per task (the newest by label time)


EvictFn = Callable[[Eviction], None]


class Joiner:
    """Joins labels to inputs over the ``inputs``, ``joined`` and ``pending`` mappings.

    ``watermarks`` (per task, the highest join sequence already trained on) is read when it is
    needed, so the trainer may update it in place. ``evict`` must remove the key from the table
    and send the tombstone; by default the key is only removed from the mapping (plain dicts).
    """

    def __init__(
        self,
        inputs: Table,
        joined: Table,
        pending: Table,
        limits: JoinLimits,
        watermarks: Mapping[str, Watermark],
        evict: EvictFn | None = None,
    ) -> None:
        self.inputs, self.joined, self.pending = inputs, joined, pending
        self.limits = limits
        self.watermarks = watermarks
        self._tables: dict[TableName, Table] = {"inputs": inputs, "joined": joined, "pending": pending}
        self._evict_fn = evict or self._pop
        self._next_seq: int | None = None  # set from the recovered table at the first join

    def _pop(self, e: Eviction) -> None:
        self._tables[e.table].pop(e.key, None)

    def _evict(self, table: TableName, key: str, partition: int) -> Eviction:
        e = Eviction(table, key, partition)
        self._evict_fn(e)
        return e

    def next_seq(self) -> int:
        """The next join sequence number: the first join after a start continues after the
        recovered table and the watermarks."""
        if self._next_seq is None:
            seqs = [JoinedLabel.from_json(v).example.seq for v in self.joined.values()]
            self._next_seq = max([-1, *seqs, *self.watermarks.values()]) + 1
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq

    def _join(self, key: str, label: Label, x: str | list[float], partition: int) -> Example:
        ex = Example(key, x, label.y, label.partition, label.offset, label.ts, self.next_seq())
        self.joined[key] = JoinedLabel(ex, partition).to_json()
        return ex

    def held(self, spec: TaskSpec, key: str) -> HeldInput | None:
        raw = self.inputs.get(key)
        return None if raw is None else held_input(spec, raw)

    def add_input(self, spec: TaskSpec, event: Any, partition: int, offset: int) -> InputAdded | None:
        """Store an input event of the task (read from ``partition`` at ``offset``) and join a
        label that waited for it. None: a re-delivered click, nothing changed."""
        key = join_key(spec, event)
        held: HeldInput
        if spec.labels_session:
            assert isinstance(event, ClickEvent)
            raw = self.inputs.get(key)
            prev = SessionInput.from_json(raw).state if raw else None
            new, applied = apply_click(prev, event, partition, offset)
            if not applied:
                return None
            held = SessionInput(new, event.ts.timestamp(), partition)
        else:
            held = TextInput(spec.model_text(event), event.ts.timestamp(), partition)
        self.inputs[key] = held.to_json()
        waiting = self.pending.get(key)
        if waiting is None:
            return InputAdded(spec.name, key)
        label = PendingLabel.from_json(waiting)
        evicted = self._evict("pending", key, label.partition)  # its tombstone goes where it was written
        if key in self.joined:
            return InputAdded(spec.name, key, evicted=evicted)
        ex = self._join(key, label.label, held.model_input(), partition)
        return InputAdded(spec.name, key, joined=ex, evicted=evicted)

    def add_label(self, label: LabelEvent, partition: int, offset: int, now: float) -> LabelOutcome:
        """Join a label (read from ``partition`` at ``offset``; ``now``: wall-clock epoch seconds)
        to its input, or hold it until the input arrives. The first label of an input wins."""
        key = label_key(label)
        lab = Label(label_name(label), partition, offset, label.ts.timestamp())
        if key in self.joined or key in self.pending:
            return LabelOutcome(LabelStatus.DUPLICATE, label.task, key)
        held = self.held(TASKS[label.task], key)
        if held is None:
            self.pending[key] = PendingLabel(lab, now, partition).to_json()
            return LabelOutcome(LabelStatus.PENDING, label.task, key)
        ex = self._join(key, lab, held.model_input(), partition)
        return LabelOutcome(LabelStatus.JOINED, label.task, key, ex)

    def examples(self, task: str) -> list[Example]:
        """The task's joined labels."""
        prefix = task + ":"
        return [
            JoinedLabel.from_json(v).example for k, v in list(self.joined.items()) if k.startswith(prefix)
        ]

    def sweep(self, now: float) -> SweepOutcome:
        """Bound the tables (``now``: wall-clock epoch seconds): evict inputs out of the window or
        beyond the count (oldest event time first), give up labels that waited too long (orphans),
        and trim each task's labels already trained on to the replay pool (oldest label time first;
        fresh labels are never evicted)."""
        evictions: list[Eviction] = []
        cutoff = now - self.limits.input_window_s
        held = sorted(self.inputs.items(), key=lambda kv: float(kv[1]["t"]))
        excess = max(0, len(held) - self.limits.max_inputs)
        dropped = 0
        for i, (key, value) in enumerate(held):
            if i < excess or float(value["t"]) < cutoff:
                evictions.append(self._evict("inputs", key, int(value["cp"])))
                dropped += 1
        orphans: dict[str, int] = {}
        for key, value in list(self.pending.items()):
            waiting = PendingLabel.from_json(value)
            if now - waiting.arrived > self.limits.label_wait_s:
                evictions.append(self._evict("pending", key, waiting.partition))
                orphans[task_of(key)] = orphans.get(task_of(key), 0) + 1
        replay: dict[str, int] = {}
        for task in TASKS:
            wm = self.watermarks.get(task, -1)
            prefix = task + ":"
            records = ((k, JoinedLabel.from_json(v)) for k, v in self.joined.items() if k.startswith(prefix))
            old = sorted(
                ((k, r) for k, r in records if not is_fresh(r.example, wm)), key=lambda kr: kr[1].example.ts
            )
            over = old[: max(0, len(old) - self.limits.replay_max)]
            for key, rec in over:
                evictions.append(self._evict("joined", key, rec.partition))
            if over:
                replay[task] = len(over)
        return SweepOutcome(dropped, orphans, replay, evictions, len(self.inputs), len(self.pending))
