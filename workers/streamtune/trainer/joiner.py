"""Join late labels to their inputs: pure bookkeeping over three mappings, no Kafka, no metrics.

The trainer keeps three tables (Faust tables with changelogs in production, plain dicts in tests):

* ``inputs``  key ``task:event_id`` (text tasks) or ``task:session_id`` (session tasks: the
  session state so far): what a label joins to. Bounded by event-time window, count and bytes
  (the oldest arrivals go).
* ``joined``  key ``task:id``: one joined label (:class:`~streamtune.training.online.Example`);
  the first label of an input wins, later ones are duplicates. The labels already trained on
  (the replay pool) are bounded per task by count and over the whole table by bytes (the oldest
  joins go); fresh labels are never evicted.
* ``pending`` labels that arrived before their input; once the input stream has moved past
  them they are orphans (:meth:`Joiner.sweep`). Bounded by count and bytes (the oldest arrivals
  go).

The byte bounds count an entry as its compact JSON (:func:`entry_bytes`, about what the
changelog and the in-memory table hold of it; the key is not counted). The joiner keeps the
size of every entry in a tally, so a sweep never serialises the tables again.

Every entry records the changelog partition it was written to (``cp``: the partition of the
event being processed when it was written). Entries are only ever written through the mapping
(``table[key] = value``: Faust sends the change to the current event's changelog partition) and
removed through the ``evict`` callback with an :class:`Eviction`, which names the table, the key
and the partition its tombstone must go to (a sweep runs outside any event, so the deletion
cannot go through the mapping).

Time and order come from the streams, never from the wall clock or the producers' timestamps
alone. *Order* (what is evicted first) is arrival: the trainer's own arrival counter (``a``) for
inputs and pending labels, the join sequence number for joined labels. *Time* (when a pending
label is an orphan, when an input is out of the window) is stream time: how far the streams'
event times have got (:class:`StreamClock`), so a trainer that was down and reads a backlog
gives up on nothing whose counterpart is still in the backlog.

The stored JSON keeps the one-letter keys of the first trainer release, so changelogs written by
an older trainer recover in a newer one: an input is ``{"x": text, "t": ts, "cp": p, "a": n}``
or ``{"s": session, "t": ts, "cp": p, "a": n}``, a pending label ``{"label": {"y", "p", "o",
"t"}, "arrived": ts, "cp": p, "a": n}``, a joined one ``{"ex": Example.to_json(), "cp": p}``.
Entries without ``a`` (written before it) count as the oldest arrivals.
"""

from __future__ import annotations

import enum
import json
import math
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


def entry_bytes(value: Any) -> int:
    """The size of a table entry for the byte bounds: its compact JSON, UTF-8 encoded."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


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
    arrival: int = -1  # "a": the trainer's arrival counter when it was stored (-1: before it)

    def model_input(self) -> str:
        return self.text

    def to_json(self) -> dict[str, Any]:
        return {"x": self.text, "t": self.ts, "cp": self.partition, "a": self.arrival}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextInput:
        return cls(str(d["x"]), float(d["t"]), int(d["cp"]), arrival_of(d))


@dataclass(frozen=True, slots=True)
class SessionInput:
    """A session task's held input: the session state after its latest click."""

    state: SessionState  # "s"
    ts: float  # "t": time of the latest click, epoch seconds
    partition: int  # "cp"
    arrival: int = -1  # "a": arrival counter of the latest click (-1: stored before it)

    def model_input(self) -> list[float]:
        return vectorize(session_row(self.state))

    def to_json(self) -> dict[str, Any]:
        return {
            "s": self.state.model_dump(mode="json"),
            "t": self.ts,
            "cp": self.partition,
            "a": self.arrival,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SessionInput:
        return cls(SessionState.model_validate(d["s"]), float(d["t"]), int(d["cp"]), arrival_of(d))


HeldInput = TextInput | SessionInput


def arrival_of(d: Mapping[str, Any]) -> int:
    """The arrival counter of a stored input or pending label (-1: written before there was one)."""
    return int(d.get("a", -1))


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
    arrived: float  # "arrived": wall-clock time it was received, epoch seconds (for people only)
    partition: int  # "cp"
    arrival: int = -1  # "a": the trainer's arrival counter when it was received (-1: before it)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label.to_json(),
            "arrived": self.arrived,
            "cp": self.partition,
            "a": self.arrival,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PendingLabel:
        return cls(Label.from_json(d["label"]), float(d["arrived"]), int(d["cp"]), arrival_of(d))


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
    inputs_evicted: int  # by window, count or bytes
    orphans: dict[str, int]  # pending labels given up (their task's inputs moved past), per task
    # joined labels beyond the replay pool (count or bytes), per task (non-zero only)
    replay_evicted: dict[str, int]
    evictions: list[Eviction] = field(default_factory=list)  # every tombstone, in the order sent
    inputs_held: int = 0  # after the sweep
    labels_pending: int = 0
    # pending labels beyond max_pending or max_pending_bytes, per task
    dropped: dict[str, int] = field(default_factory=dict)
    inputs_bytes: int = 0  # bytes held (entry_bytes) after the sweep, per table
    pending_bytes: int = 0
    joined_bytes: int = 0


@dataclass(frozen=True, slots=True)
class JoinLimits:
    input_window_s: float  # an input goes once the labels stream is this far past it (event time)
    max_inputs: int  # at most this many inputs are held; the oldest arrivals go first
    label_wait_s: float  # a pending label is an orphan once its task's inputs are this far past it
    replay_max: int  # joined labels already trained on kept per task (the latest joined)
    max_pending: int = 50_000  # at most this many labels wait; the oldest arrivals are dropped
    # Byte bounds (entry_bytes summed over a table); the oldest go first, as for the counts:
    max_input_bytes: int = 256 << 20  # inputs: the oldest arrivals go
    max_pending_bytes: int = 16 << 20  # pending labels: the oldest arrivals are dropped
    # The joined table: labels already trained on go, oldest join first, while it is over; fresh
    # labels are never evicted, so the table stays over while the fresh ones alone are.
    max_replay_bytes: int = 64 << 20


class StreamClock:
    """How far a stream has got in event time: the latest event time seen on each partition.

    The stream is past a time once *every* partition seen is (:meth:`low`: the low watermark).
    With the maximum over partitions, one partition that caught up would declare past what a
    lagging one still holds in its backlog. A partition that goes quiet holds the clock back:
    safe (nothing is given up early), and the tables stay bounded by count and bytes meanwhile."""

    def __init__(self) -> None:
        self.latest: dict[int, float] = {}

    def see(self, partition: int, ts: float) -> None:
        if ts > self.latest.get(partition, -math.inf):
            self.latest[partition] = ts

    def low(self, cap: float) -> float | None:
        """The time every partition seen has reached, but not beyond ``cap`` (the wall clock: a
        producer whose clock runs ahead does not move the stream); None: nothing seen yet."""
        return min(min(self.latest.values()), cap) if self.latest else None


EvictFn = Callable[[Eviction], None]


class Joiner:
    """Joins labels to inputs over the ``inputs``, ``joined`` and ``pending`` mappings.

    ``watermarks`` (per task, the highest join sequence already trained on) is read when it is
    needed, so the trainer may update it in place. ``evict`` must remove the key from the table
    and send the tombstone; by default the key is only removed from the mapping (plain dicts).

    Two stream clocks (:class:`StreamClock`, in memory; after a start they begin from what the
    recovered tables hold) decide when something is given up, in :meth:`sweep`:

    * a pending label is an orphan once the **inputs of its task** are more than
      ``label_wait_s`` past the label's own time, on every partition seen (a label does not
      say which input partition its input is on). Its input, made before the label, is then
      behind the stream on its partition, whichever it is: it was not seen (or is out of
      order by more than the wait). A trainer that was down reads its backlog in stream order,
      so a label read ahead of its input waits until the input stream catches up to it, however
      long that takes on the wall clock;
    * an input is out of the window once the **labels stream** is more than ``input_window_s``
      past the input's time on every labels partition seen: the labels that could still come for
      it would be that late. So inputs read ahead of their labels in a backlog wait for them.

    Both clocks are capped at the sweep's ``now``, so producer clocks running ahead of the
    trainer's cannot make it give up early; a quiet stream gives up nothing (the count bounds,
    ``max_inputs`` and ``max_pending``, and the byte bounds still hold).

    The byte bounds (:class:`JoinLimits`) read a tally of every entry's size
    (:func:`entry_bytes`), per table and key: built from the (recovered) tables at first use, then
    kept up to date by every write the joiner makes (:meth:`_put`) and every eviction. Each sweep
    first reconciles it with the tables' keys, sizing only entries it does not know (written
    outside the joiner, e.g. a rebalance recovering partitions into the tables after the first
    use) and forgetting keys that are gone.
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
        self._next_arrival: int | None = None  # set from the recovered tables at the first arrival
        self._input_clocks: dict[str, StreamClock] | None = None  # per task; from the tables at first use
        self._label_clock = StreamClock()
        self._sizes: dict[TableName, dict[str, int]] | None = None  # from the tables at first use
        self._totals: dict[TableName, int] = {"inputs": 0, "joined": 0, "pending": 0}

    def _tally(self) -> dict[TableName, dict[str, int]]:
        """Every entry's size, per table and key; at the first use, from the (recovered) tables."""
        if self._sizes is None:
            self._sizes = {
                name: {k: entry_bytes(v) for k, v in t.items()} for name, t in self._tables.items()
            }
            self._totals = {name: sum(sizes.values()) for name, sizes in self._sizes.items()}
        return self._sizes

    def _reconcile(self) -> None:
        """Size the entries the tally does not know and forget the keys no longer in the tables
        (both only where something bypassed the joiner); known entries are not serialised again."""
        for name, sizes in self._tally().items():
            table = self._tables[name]
            for key in [k for k in sizes if k not in table]:
                self._totals[name] -= sizes.pop(key)
            for key in [k for k in table if k not in sizes]:
                sizes[key] = n = entry_bytes(table[key])
                self._totals[name] += n

    def bytes_held(self) -> dict[TableName, int]:
        """Bytes held per table (the tally's totals)."""
        self._tally()
        return dict(self._totals)

    def sizes(self) -> dict[TableName, dict[str, int]]:
        """A copy of the tally: every entry's size, per table and key."""
        return {name: dict(sizes) for name, sizes in self._tally().items()}

    def _put(self, table: TableName, key: str, value: dict[str, Any]) -> None:
        """Write an entry (through the mapping: its change goes to the current event's changelog
        partition) and its size to the tally, in place of the size of what it replaces."""
        sizes = self._tally()[table]
        self._tables[table][key] = value
        n = entry_bytes(value)
        self._totals[table] += n - sizes.get(key, 0)
        sizes[key] = n

    def _pop(self, e: Eviction) -> None:
        self._tables[e.table].pop(e.key, None)

    def _evict(self, table: TableName, key: str, partition: int) -> Eviction:
        e = Eviction(table, key, partition)
        self._totals[table] -= self._tally()[table].pop(key, 0)
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

    def next_arrival(self) -> int:
        """The next arrival number (inputs and pending labels): the first after a start continues
        after the recovered tables."""
        if self._next_arrival is None:
            seen = [arrival_of(v) for table in (self.inputs, self.pending) for v in table.values()]
            self._next_arrival = max([-1, *seen]) + 1
        n, self._next_arrival = self._next_arrival, self._next_arrival + 1
        return n

    def _clocks(self) -> dict[str, StreamClock]:
        """The input clocks, per task; at the first use after a start, the labels clock too, both
        from what the recovered tables hold (never ahead of what was really seen)."""
        if self._input_clocks is None:
            self._input_clocks = {}
            for key, v in self.inputs.items():
                self._input_clocks.setdefault(task_of(key), StreamClock()).see(int(v["cp"]), float(v["t"]))
            for v in self.pending.values():
                lab = PendingLabel.from_json(v).label
                self._label_clock.see(lab.partition, lab.ts)
            for v in self.joined.values():
                ex = JoinedLabel.from_json(v).example
                self._label_clock.see(ex.partition, ex.ts)
        return self._input_clocks

    def _join(self, key: str, label: Label, x: str | list[float], partition: int) -> Example:
        ex = Example(key, x, label.y, label.partition, label.offset, label.ts, self.next_seq())
        self._put("joined", key, JoinedLabel(ex, partition).to_json())
        return ex

    def held(self, spec: TaskSpec, key: str) -> HeldInput | None:
        raw = self.inputs.get(key)
        return None if raw is None else held_input(spec, raw)

    def add_input(self, spec: TaskSpec, event: Any, partition: int, offset: int) -> InputAdded | None:
        """Store an input event of the task (read from ``partition`` at ``offset``) and join a
        label that waited for it. None: a re-delivered click, nothing changed."""
        key = join_key(spec, event)
        ts = event.ts.timestamp()
        self._clocks().setdefault(spec.name, StreamClock()).see(partition, ts)
        held: HeldInput
        if spec.labels_session:
            assert isinstance(event, ClickEvent)
            raw = self.inputs.get(key)
            prev = SessionInput.from_json(raw).state if raw else None
            new, applied = apply_click(prev, event, partition, offset)
            if not applied:
                return None
            held = SessionInput(new, ts, partition, self.next_arrival())
        else:
            held = TextInput(spec.model_text(event), ts, partition, self.next_arrival())
        self._put("inputs", key, held.to_json())
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
        """Join a label (read from ``partition`` at ``offset``; ``now``: wall-clock epoch seconds,
        recorded for people only) to its input, or hold it until the input arrives. The first
        label of an input wins."""
        key = label_key(label)
        lab = Label(label_name(label), partition, offset, label.ts.timestamp())
        self._clocks()
        self._label_clock.see(partition, lab.ts)
        if key in self.joined or key in self.pending:
            return LabelOutcome(LabelStatus.DUPLICATE, label.task, key)
        held = self.held(TASKS[label.task], key)
        if held is None:
            self._put("pending", key, PendingLabel(lab, now, partition, self.next_arrival()).to_json())
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
        """Bound the tables, in this order (``now``: wall-clock epoch seconds, only a cap on the
        stream clocks, see the class):

        * inputs out of the window (the labels stream moved past them) or beyond the count
          (oldest arrival first), then the oldest arrivals while the inputs are over
          ``max_input_bytes``;
        * pending labels whose task's inputs moved past them (orphans), then those beyond
          ``max_pending`` (oldest arrival first: dropped), then the oldest arrivals while the
          pending labels are over ``max_pending_bytes`` (dropped);
        * each task's labels already trained on beyond the replay pool (oldest join first;
          fresh labels are never evicted), then, over all tasks, the oldest joined labels already
          trained on while the joined table is over ``max_replay_bytes``."""
        clocks = self._clocks()
        self._reconcile()
        lim = self.limits
        evictions: list[Eviction] = []
        labels_at = self._label_clock.low(now)
        cutoff = -math.inf if labels_at is None else labels_at - lim.input_window_s
        held = sorted(self.inputs.items(), key=lambda kv: arrival_of(kv[1]))
        excess = max(0, len(held) - lim.max_inputs)
        dropped_inputs = 0
        kept_inputs: list[tuple[str, Any]] = []
        for i, (key, value) in enumerate(held):
            if i < excess or float(value["t"]) < cutoff:
                evictions.append(self._evict("inputs", key, int(value["cp"])))
                dropped_inputs += 1
            else:
                kept_inputs.append((key, value))
        for key, value in kept_inputs:  # oldest arrival first, while over the bytes
            if self._totals["inputs"] <= lim.max_input_bytes:
                break
            evictions.append(self._evict("inputs", key, int(value["cp"])))
            dropped_inputs += 1
        orphans: dict[str, int] = {}
        kept: list[tuple[str, PendingLabel]] = []
        waiting = sorted(
            ((k, PendingLabel.from_json(v)) for k, v in self.pending.items()), key=lambda kv: kv[1].arrival
        )
        for key, label in waiting:
            task = task_of(key)
            clock = clocks.get(task)
            inputs_at = None if clock is None else clock.low(now)
            if inputs_at is not None and inputs_at - label.label.ts > lim.label_wait_s:
                evictions.append(self._evict("pending", key, label.partition))
                orphans[task] = orphans.get(task, 0) + 1
            else:
                kept.append((key, label))
        dropped: dict[str, int] = {}
        beyond = max(0, len(kept) - lim.max_pending)
        for i, (key, label) in enumerate(kept):
            if i >= beyond and self._totals["pending"] <= lim.max_pending_bytes:
                break  # within the count and the bytes
            evictions.append(self._evict("pending", key, label.partition))
            dropped[task_of(key)] = dropped.get(task_of(key), 0) + 1
        replay: dict[str, int] = {}
        pool: list[tuple[str, JoinedLabel]] = []  # labels already trained on that the count keeps
        for task in TASKS:
            wm = self.watermarks.get(task, -1)
            prefix = task + ":"
            records = ((k, JoinedLabel.from_json(v)) for k, v in self.joined.items() if k.startswith(prefix))
            old = sorted(
                ((k, r) for k, r in records if not is_fresh(r.example, wm)), key=lambda kr: kr[1].example.seq
            )
            cut = max(0, len(old) - lim.replay_max)
            for key, rec in old[:cut]:
                evictions.append(self._evict("joined", key, rec.partition))
            if cut:
                replay[task] = cut
            pool.extend(old[cut:])
        for key, rec in sorted(pool, key=lambda kr: kr[1].example.seq):  # oldest join first, over bytes
            if self._totals["joined"] <= lim.max_replay_bytes:
                break
            evictions.append(self._evict("joined", key, rec.partition))
            replay[task_of(key)] = replay.get(task_of(key), 0) + 1
        return SweepOutcome(
            dropped_inputs,
            orphans,
            replay,
            evictions,
            len(self.inputs),
            len(self.pending),
            dropped,
            inputs_bytes=self._totals["inputs"],
            pending_bytes=self._totals["pending"],
            joined_bytes=self._totals["joined"],
        )
