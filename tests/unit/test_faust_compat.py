"""Contract test for :mod:`streamtune.kafka.compat`, the one module that touches private members
of faust-streaming, mode and aiokafka: the versions it was written for are the installed ones,
every member it touches still exists with the kind it expects, each workaround does what it says
(no broker: a real Faust app and consumer, built offline), and no other module touches those
members."""

from __future__ import annotations

import ast
import asyncio
import contextvars
import importlib
import inspect
import re
import signal
import socket
import tomllib
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import faust
import faust.streams
import faust.transport.consumer
import faust.transport.drivers.aiokafka
import pytest
from faust.types import TP, Message
from mode.worker import Worker as ModeWorker

from streamtune.kafka import compat

PACKAGE_DIR = Path(compat.__file__).resolve().parents[1]  # workers/streamtune
REPO_ROOT = PACKAGE_DIR.parents[1]
COMPAT_FILE = Path(compat.__file__).resolve()
KINDS = {"method", "coroutine", "instance", "contextvar"}
TP0 = TP("events.review", 0)

# --- fixtures: a real Faust app and consumer, and proof that building them sends nothing ------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Any attempt to resolve a name, connect, or open an internet socket is refused and recorded;
    the test fails afterwards if there was one (asyncio's own self-pipe is a local socket pair)."""
    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
            raise OSError(f"test_faust_compat: no network ({what})")

        return call

    init = socket.socket.__init__

    def new_socket(self: socket.socket, family: Any = -1, *args: Any, **kwargs: Any) -> None:
        if family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"socket({family!r})")
        init(self, family, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "__init__", new_socket)
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    yield attempts
    assert attempts == [], f"building the Faust app/consumer/producer/worker used the network: {attempts}"


@pytest.fixture
def app(offline: list[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[faust.App]:
    """A Faust app with an unreachable broker; its consumer and producer are built, never started.
    Faust's transport takes the thread's event loop (a fresh one here) and the consumer's thread
    makes its own: every loop made meanwhile is closed afterwards."""
    loops = [asyncio.new_event_loop()]
    new_event_loop = asyncio.new_event_loop

    def recorded() -> asyncio.AbstractEventLoop:
        loops.append(new_event_loop())
        return loops[-1]

    monkeypatch.setattr(asyncio, "new_event_loop", recorded)
    asyncio.set_event_loop(loops[0])
    try:
        yield faust.App("compat-test", broker="kafka://127.0.0.1:1", store="memory://", loop=loops[0])
    finally:
        asyncio.set_event_loop(None)
        for loop in loops:
            loop.close()


def _consumer(app: faust.App) -> Any:
    consumer: Any = app.consumer
    assert isinstance(consumer, faust.transport.consumer.Consumer)
    return consumer


# --- (a) versions ----------------------------------------------------------------------------


def test_the_installed_versions_are_the_ones_compat_was_written_for() -> None:
    installed = {name: version(name) for name in compat.WRITTEN_FOR}
    assert installed == compat.WRITTEN_FOR, (
        f"installed {installed}, but streamtune/kafka/compat.py was written for {compat.WRITTEN_FOR}. "
        "Before bumping WRITTEN_FOR (or the pins), re-check every workaround in "
        "docs/faust-workarounds.md against the new versions' source: a renamed or changed private "
        "member silently turns a workaround off."
    )


def test_the_pyproject_pins_agree_with_written_for() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(d.split("==", 1) for d in project["dependencies"] if "==" in d)
    pinned = {name: pins[name] for name in compat.WRITTEN_FOR if name in pins}
    assert "faust-streaming" in pinned, "faust-streaming must be pinned in pyproject.toml"
    assert pinned == {name: compat.WRITTEN_FOR[name] for name in pinned}, (
        f"pyproject.toml pins {pinned}, compat.py was written for {compat.WRITTEN_FOR}: re-check every "
        "workaround in docs/faust-workarounds.md before bumping either"
    )


# --- (b) every touched member still exists, with its kind ------------------------------------


def _resolve(dotted: str) -> Any:
    """Import the longest module prefix of ``dotted``, then walk the remaining attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for i, attr in enumerate(parts[cut:], cut):
            if not hasattr(obj, attr):
                pytest.fail(f"TOUCHED owner {dotted}: {'.'.join(parts[:i])} has no {attr!r}")
            obj = getattr(obj, attr)
        return obj
    pytest.fail(f"TOUCHED owner {dotted}: no module of it can be imported")


def _instance_of(owner: type, app: faust.App) -> Any:
    """A real instance of ``owner``, built offline (only the consumer carries "instance" members)."""
    consumer = app.consumer
    if isinstance(consumer, owner):
        return consumer
    pytest.fail(f"no offline instance of {owner!r}: teach _instance_of how to build one")


ENTRIES = [(owner, name, kind) for owner, members in compat.TOUCHED.items() for name, kind in members]


def test_touched_uses_known_kinds_only() -> None:
    assert ENTRIES
    assert {kind for _, _, kind in ENTRIES} <= KINDS, ENTRIES


@pytest.mark.parametrize(("owner", "name", "kind"), ENTRIES, ids=[f"{o}.{n}" for o, n, _ in ENTRIES])
def test_every_touched_member_exists_with_the_expected_kind(
    owner: str, name: str, kind: str, request: pytest.FixtureRequest
) -> None:
    target = _resolve(owner)
    where = f"{owner}.{name} ({kind}, faust-streaming {version('faust-streaming')})"
    if kind == "contextvar":
        assert inspect.ismodule(target), f"{owner} should be a module"
        assert isinstance(getattr(target, name, None), contextvars.ContextVar), f"{where}: not a ContextVar"
        return
    assert inspect.isclass(target), f"{owner} should be a class"
    if kind == "instance":
        instance = _instance_of(target, request.getfixturevalue("app"))
        assert name in vars(instance), f"{where}: not set on a {type(instance).__qualname__} instance"
        return
    member = inspect.getattr_static(target, name, None)
    assert member is not None, f"{where}: gone"
    if kind == "coroutine":
        assert inspect.iscoroutinefunction(member), f"{where}: not a coroutine function ({member!r})"
    else:
        assert inspect.isfunction(member) and not inspect.iscoroutinefunction(member), (
            f"{where}: not a plain method ({member!r})"
        )


def _privates_compat_touches() -> set[str]:
    """Private names compat.py imports from, reads on or overrides in a library's objects (not
    its own: ``self.<name>`` set in compat itself, and module-level ``_helpers``)."""
    tree = ast.parse(COMPAT_FILE.read_text())
    own_defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    own_attrs = {
        t.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found |= {a.name for a in node.names if a.name.startswith("_")}
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr not in own_attrs and node.attr not in own_defs:
                found.add(node.attr)
        elif isinstance(node, ast.ClassDef):  # a private method overriding the library's
            cls = getattr(compat, node.name)
            for item in node.body:
                if (
                    isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                    and item.name.startswith("_")
                    and not item.name.startswith("__")
                    and any(hasattr(b, item.name) for b in cls.__mro__[1:])
                ):
                    found.add(item.name)
    return found


def test_touched_lists_every_private_member_compat_uses() -> None:
    listed = {name for _, name, _ in ENTRIES}
    found = _privates_compat_touches()
    assert {"_add_gap", "_unacked_messages", "_settings_extra", "_stop_on_signal"} <= found  # the scan works
    assert found <= listed, f"compat.py touches {sorted(found - listed)} without listing them in TOUCHED"


# --- (c) each workaround, without a broker ---------------------------------------------------


def test_disable_gap_filling_replaces_add_gap_on_the_instance_with_a_no_op(app: faust.App) -> None:
    consumer = _consumer(app)
    asyncio.run(consumer._add_gap(TP0, 1, 2))  # Faust's own: the gap would count as processed
    assert consumer._gap[TP0]
    consumer._gap.clear()
    compat.disable_gap_filling(consumer)
    assert "_add_gap" in vars(consumer) and inspect.iscoroutinefunction(consumer._add_gap)
    assert asyncio.run(consumer._add_gap(TP0, 3, 5)) is None
    assert not consumer._gap.get(TP0)  # nothing recorded
    # the class is untouched: a consumer built later still has Faust's method
    assert inspect.iscoroutinefunction(inspect.getattr_static(type(consumer), "_add_gap"))
    assert inspect.getattr_static(type(consumer), "_add_gap") is not vars(consumer)["_add_gap"]


def test_disable_gap_filling_works_on_any_object_with_the_method() -> None:
    added: list[tuple[int, int]] = []

    class Consumer:
        async def _add_gap(self, tp: object, a: int, b: int) -> None:
            added.append((a, b))

    c = Consumer()
    asyncio.run(c._add_gap(TP0, 1, 2))
    compat.disable_gap_filling(c)
    asyncio.run(c._add_gap(TP0, 3, 5))
    assert added == [(1, 2)]


def test_leave_pending_pins_the_message_and_stops_tracking_it(app: faust.App) -> None:
    consumer = _consumer(app)
    message = Message("events.review", 0, 7, 0.0, 0, None, b"k", b"v", None, tp=TP0)
    other = Message("events.review", 0, 8, 0.0, 0, None, b"k", b"v", None, tp=TP0)
    for m in (message, other):
        consumer.track_message(m)  # what Faust's conductor does before a stream sees it
    assert message in consumer._unacked_messages
    refcount = message.refcount
    compat.leave_pending(app, message)
    assert message.refcount == refcount + 1  # the stream's own decref cannot acknowledge it
    assert message not in consumer._unacked_messages  # stop and rebalance do not wait for it
    assert other in consumer._unacked_messages
    assert not message.acked


HOOKS = [
    pytest.param("on_partitions_assigned", ({TP0}, 3), id="assignment"),
    pytest.param("on_partitions_assigned", ({TP0},), id="assignment-no-generation"),
    pytest.param("on_partitions_revoked", ({TP0},), id="revocation"),
]


@pytest.mark.parametrize(("handler", "args"), HOOKS)
def test_ours_runs_before_faust_handler_also_when_it_raises_and_installs_once(
    app: faust.App, handler: compat.RebalanceHandler, args: tuple[Any, ...]
) -> None:
    consumer = _consumer(app)
    calls: list[tuple[Any, ...]] = []
    fail = [False]

    async def faust_handler(*a: Any) -> None:  # stands in for Faust's bound handler
        calls.append(("faust", *a))

    async def ours(partitions: Any) -> None:
        calls.append(("ours", partitions))
        if fail[0]:
            raise RuntimeError("a bug in our hook")

    setattr(consumer, handler, faust_handler)
    compat.run_before(app, handler, ours, "compat_test")
    wrapped = getattr(consumer, handler)
    assert wrapped is not faust_handler
    compat.run_before(app, handler, ours, "compat_test")  # once per consumer: the second call changes nothing
    assert getattr(consumer, handler) is wrapped
    assert consumer._streamtune_compat_test is True

    asyncio.run(wrapped(*args))
    assert calls == [("ours", args[0]), ("faust", *args)]  # ours first, once; Faust's with its arguments
    calls.clear()
    fail[0] = True
    asyncio.run(wrapped(*args))
    assert calls == [("ours", args[0]), ("faust", *args)]  # Faust's handler runs all the same

    other = faust.App("compat-test-2", broker="kafka://127.0.0.1:1", store="memory://", loop=app.loop)
    compat.run_before(other, handler, ours, "compat_test")  # the marker is per consumer, not global
    assert _consumer(other)._streamtune_compat_test is True


def test_attributed_to_sets_the_current_event_inside_the_block_only() -> None:
    class Event:  # only needs to be weak-referenceable
        pass

    first, second = Event(), Event()

    def scenario() -> None:
        assert faust.streams.current_event() is None
        with compat.attributed_to(first):
            assert faust.streams.current_event() is first
            ref = faust.streams._current_event.get()  # the variable Faust reads
            assert ref is not None and ref() is first
            with compat.attributed_to(second):
                assert faust.streams.current_event() is second
            assert faust.streams.current_event() is first
        assert faust.streams.current_event() is None
        with pytest.raises(ValueError), compat.attributed_to(first):
            raise ValueError("a failed table write")
        assert faust.streams.current_event() is None  # reset also when the block raises

    contextvars.copy_context().run(scenario)


def test_the_producer_asks_for_acks_all_and_idempotence_outside_transactions(app: faust.App) -> None:
    compat.install(app)
    producer: Any = app.producer
    assert isinstance(producer, compat.IdempotentProducer)
    assert not app.in_transaction
    extra = producer._settings_extra()
    assert extra["acks"] == "all" and extra["enable_idempotence"] is True
    assert faust.transport.drivers.aiokafka.Producer._settings_extra(producer) == {}  # what Faust asks for


@pytest.mark.parametrize("drain_fails", [False, True], ids=["drained", "drain-failed"])
def test_sigterm_drains_before_the_worker_stops(
    app: faust.App, monkeypatch: pytest.MonkeyPatch, drain_fails: bool
) -> None:
    calls: list[str] = []

    async def mode_stop_on_signal(self: ModeWorker, sig: signal.Signals) -> None:
        calls.append(f"stop {sig.name}")

    async def drain() -> None:
        calls.append("drain")
        if drain_fails:
            raise RuntimeError("drain failed")

    monkeypatch.setattr(ModeWorker, "_stop_on_signal", mode_stop_on_signal)
    worker = compat.DrainingWorker(app, before_stop=drain, loop=app.loop)
    app.loop.run_until_complete(asyncio.wait_for(worker._stop_on_signal(signal.SIGTERM), 10))
    assert calls == ["drain", "stop SIGTERM"]


# --- nobody else touches them ----------------------------------------------------------------

PRIVATE_USES = re.compile(
    r"\._unacked_messages\b|\._committed_offset\b|\._add_gap\b|\b_stop_on_signal\b"
    r"|\b_settings_extra\b|\b_current_event\b|(?<!compat)\.force_commit\("
)


def test_no_module_but_compat_touches_the_private_members() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if path.resolve() != COMPAT_FILE
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_USES.search(line)
    ]
    assert offenders == [], (
        "only streamtune/kafka/compat.py may touch these (call its helpers):\n" + "\n".join(offenders)
    )
    assert PRIVATE_USES.search(COMPAT_FILE.read_text())  # the pattern does find them where they are


def test_the_worker_producer_holds_no_record_back() -> None:
    """A batch waits for its own deliveries only (``FaustPublisher.flush``, no producer-wide
    flush), and each of its records goes out at once: no linger."""
    from streamtune.core.settings import Settings
    from streamtune.kafka.app import worker_app

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        app = worker_app(Settings(bootstrap_servers="127.0.0.1:1"), "linger-test")
        assert app.conf.producer_linger == 0.0
        assert app.producer.linger_ms == 0  # what Faust hands aiokafka's producer
    finally:
        asyncio.set_event_loop(None)
        loop.close()
