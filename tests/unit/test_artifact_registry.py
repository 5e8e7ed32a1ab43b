"""Derived artifacts in the registry with real files: publishers racing through the lock,
stale staging directories, and which version serves a never-released task under a backend."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import streamtune.rollout.registry as registry_mod
from streamtune.core.errors import AdapterError
from streamtune.rollout.registry import (
    ARTIFACTS,
    ARTIFACTS_LOCK,
    Artifact,
    BaseModelRef,
    LocalRegistry,
    Manifest,
)

TASK = "review_sentiment"
BACKEND = "onnx-int8"


def _version(reg: LocalRegistry, tmp: Path, version: int, gate: dict[str, object] | None = None) -> None:
    build = tmp / f"build-v{version}"
    build.mkdir()
    (build / "adapter_model.safetensors").write_bytes(b"weights %d" % version)
    (build / "adapter_config.json").write_text("{}")
    reg.publish(
        build,
        Manifest(
            task=TASK,
            version=version,
            kind="text-lora",
            base_model=BaseModelRef(name="base", sha256="b" * 64),
            labels=["negative", "neutral", "positive"],
            created_at=datetime.now(UTC),
            gate=gate or {},
        ),
    )


def _artifact(reg: LocalRegistry, version: int, passed: bool, backend: str = BACKEND) -> Artifact:
    return Artifact(
        task=TASK,
        version=version,
        backend=backend,
        manifest_sha256=reg.manifest_sha256(TASK, version),
        created_at=datetime.now(UTC),
        agreement=0.999 if passed else 0.9,
        eval_rows=100,
        min_agreement=0.99,
        passed=passed,
    )


def _model(tmp: Path, name: str, payload: bytes) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "model.onnx").write_bytes(payload)
    return d


def _hidden(reg: LocalRegistry, version: int) -> list[str]:
    return sorted(p.name for p in (reg.fetch(TASK, version) / ARTIFACTS).iterdir() if p.name.startswith("."))


# -- (a) publishers racing ---------------------------------------------------------------------


def test_a_refused_record_is_replaced_in_place_and_nothing_is_left_behind(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg", hmac_key=b"k")
    _version(reg, tmp_path, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    reg.publish_artifact(empty, _artifact(reg, 1, passed=False))
    reg.publish_artifact(empty, _artifact(reg, 1, passed=False))  # a refused record may be replaced
    assert reg.artifact(TASK, 1, BACKEND) is not None
    art = reg.publish_artifact(_model(tmp_path, "m", b"graph"), _artifact(reg, 1, passed=True))
    stored = reg.artifact_dir(TASK, 1, BACKEND)
    assert sorted(p.name for p in stored.iterdir()) == ["artifact.json", "model.onnx"]
    assert reg.verify_artifact(TASK, 1, BACKEND) == (art, stored / "model.onnx")
    assert _hidden(reg, 1) == [ARTIFACTS_LOCK]  # the lock file only: no staging or aside directory
    with pytest.raises(AdapterError, match="immutable"):
        reg.publish_artifact(empty, _artifact(reg, 1, passed=False))
    assert _hidden(reg, 1) == [ARTIFACTS_LOCK]


def test_an_exporter_that_checked_before_another_published_cannot_replace_its_passed_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrow window, forced: A finds the refused record, B publishes a passed artifact while
    A stages, then A moves into place. A's check under the lock refuses; B's artifact stays."""
    reg = LocalRegistry(tmp_path / "reg")
    _version(reg, tmp_path, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    reg.publish_artifact(empty, _artifact(reg, 1, passed=False))
    a_staged = threading.Event()
    b_published = threading.Event()
    stage = registry_mod._stage

    def slow_stage(
        tmp: Path, build: Path, files: dict[str, str], record: str, final: Artifact, links: object = None
    ) -> None:
        stage(tmp, build, files, record, final, links)  # type: ignore[arg-type]
        if threading.current_thread().name == "A":
            a_staged.set()
            assert b_published.wait(10)

    monkeypatch.setattr(registry_mod, "_stage", slow_stage)
    errors: list[BaseException] = []

    def a() -> None:
        try:
            reg.publish_artifact(_model(tmp_path, "a", b"graph A"), _artifact(reg, 1, passed=True))
        except BaseException as e:
            errors.append(e)

    thread_a = threading.Thread(target=a, name="A")
    thread_a.start()
    assert a_staged.wait(10), "exporter A never staged"
    assert any((reg.fetch(TASK, 1) / ARTIFACTS).glob(f".{BACKEND}.*"))  # A's staging directory
    b = reg.publish_artifact(_model(tmp_path, "b", b"graph B"), _artifact(reg, 1, passed=True))
    b_published.set()
    thread_a.join(10)
    assert not thread_a.is_alive(), "exporter A did not finish"
    assert len(errors) == 1 and isinstance(errors[0], AdapterError) and "immutable" in str(errors[0])
    art, model = reg.verify_artifact(TASK, 1, BACKEND)
    assert art == b and model.read_bytes() == b"graph B"
    assert _hidden(reg, 1) == [ARTIFACTS_LOCK]


# Each child says "ready" once it is set up, then blocks until the test releases them all at once
# (one line on stdin each, after every child is ready); it gives up after START_TIMEOUT_S.
START_TIMEOUT_S = 60
CHILD = """
import json, select, sys
from datetime import UTC, datetime
from pathlib import Path
from streamtune.core.errors import AdapterError
from streamtune.rollout.registry import Artifact, LocalRegistry

root, build, empty, index, rounds, timeout_s = sys.argv[1:]
reg = LocalRegistry(Path(root))
print("ready", flush=True)
if not select.select([sys.stdin], [], [], float(timeout_s))[0] or sys.stdin.readline() != "go\\n":
    sys.exit("not released")
outcomes = []

def publish(directory, passed):
    art = Artifact(task="review_sentiment", version=1, backend="onnx-int8",
                   manifest_sha256=reg.manifest_sha256("review_sentiment", 1), created_at=datetime.now(UTC),
                   agreement=0.999 if passed else 0.9, eval_rows=100, min_agreement=0.99, passed=passed,
                   details={"by": int(index)})
    try:
        reg.publish_artifact(Path(directory), art)
        outcomes.append("published" if passed else "refused")
    except AdapterError as e:
        outcomes.append("immutable" if "immutable" in str(e) else str(e))

for i in range(int(rounds)):
    publish(empty, False)
    if i == int(rounds) // 2:
        publish(build, True)
print(json.dumps(outcomes))
"""


def test_exporting_processes_race_and_one_passed_artifact_wins(tmp_path: Path) -> None:
    """Several processes replace the refused record and publish a passed artifact at once, through
    the real lock; readers (locking and not) never miss the record, and the first passed one stays."""
    reg = LocalRegistry(tmp_path / "reg")
    _version(reg, tmp_path, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    reg.publish_artifact(empty, _artifact(reg, 1, passed=False))
    children = []
    for i in range(4):
        build = _model(tmp_path, f"b{i}", b"graph %d" % i)
        argv = [str(reg.root), str(build), str(empty), str(i), "30", str(START_TIMEOUT_S)]
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    seen: dict[bool, list[str]] = {True: [], False: []}  # locking? -> what each read found
    done = threading.Event()

    def read(locking: bool) -> None:
        while not done.is_set():
            try:
                if locking:
                    with reg.artifact_lock(TASK, 1, shared=True):
                        art = reg.artifact(TASK, 1, BACKEND)
                else:
                    art = reg.artifact(TASK, 1, BACKEND)
            except AdapterError as e:  # e.g. the record vanished between looking and reading it
                seen[locking].append(f"invalid: {e}")
                continue
            found = (
                "missing" if art is None else "refused" if not art.passed else f"passed {art.details['by']}"
            )
            seen[locking].append(found)

    readers = [threading.Thread(target=read, args=(locking,)) for locking in (True, False)]
    for t in readers:
        t.start()
    try:
        for c in children:  # every child set up before any starts publishing
            assert c.stdout is not None
            assert select.select([c.stdout], [], [], START_TIMEOUT_S)[0], "a child never got ready"
            assert c.stdout.readline() == "ready\n"
        for c in children:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        outcomes = [json.loads(c.communicate(timeout=120)[0]) for c in children]
    finally:
        done.set()
        for t in readers:
            t.join(10)
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait(10)
    assert not any(t.is_alive() for t in readers)
    assert all(c.returncode == 0 for c in children)
    flat = [o for out in outcomes for o in out]
    assert set(flat) <= {"published", "refused", "immutable"}, flat
    assert flat.count("published") == 1  # exactly one passed artifact got in; every later one refused
    art, model = reg.verify_artifact(TASK, 1, BACKEND)
    assert model.read_bytes() == b"graph %d" % art.details["by"]
    assert outcomes[art.details["by"]].count("published") == 1
    for locking, reads in seen.items():
        who = "locking" if locking else "plain"
        assert reads and set(reads) <= {"refused", f"passed {art.details['by']}"}, (who, set(reads))
        first_passed = next((i for i, r in enumerate(reads) if r.startswith("passed")), len(reads))
        assert set(reads[first_passed:]) <= {f"passed {art.details['by']}"}  # never replaced once passed
    assert _hidden(reg, 1) == [ARTIFACTS_LOCK]


# -- (b) stale staging directories -------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when), follow_symlinks=False)


def test_clean_stale_removes_only_old_staging_dirs_and_never_the_lock(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    _version(reg, tmp_path, 1)
    reg.publish_artifact(_model(tmp_path, "m", b"graph"), _artifact(reg, 1, passed=True))
    arts = reg.fetch(TASK, 1) / ARTIFACTS
    old = arts / f".{BACKEND}.killed"
    fresh = arts / f".{BACKEND}.staging"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"half")
    old_version = reg.root / TASK / ".2.killed"
    old_version.mkdir()
    (old_version / "adapter_model.safetensors").write_bytes(b"half")
    _age(old, 2 * 3600)
    _age(old_version, 2 * 3600)
    _age(arts / ARTIFACTS_LOCK, 2 * 3600)
    (fresh / "model.onnx").touch()  # another process is staging right now
    _age(fresh, 2 * 3600)
    (fresh / "artifact.json").write_text("{}")  # ... and just wrote its record: it is fresh

    assert sorted(reg.clean_stale()) == sorted([old, old_version])
    assert fresh.is_dir() and (arts / ARTIFACTS_LOCK).is_file()
    assert reg.verify_artifact(TASK, 1, BACKEND)[0].passed and reg.versions(TASK) == [1]
    assert reg.clean_stale(max_age_s=0, now=time.time() + 1) == [fresh]  # the threshold is a parameter
    assert (arts / ARTIFACTS_LOCK).is_file()
    assert _hidden(reg, 1) == [ARTIFACTS_LOCK]


# -- (e) the default version under a backend ---------------------------------------------------


def test_default_version_skips_a_version_whose_artifact_was_refused(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    empty = tmp_path / "empty"
    empty.mkdir()
    _version(reg, tmp_path, 1)  # bootstrap
    _version(reg, tmp_path, 2, gate={"passed": True})  # trainer-published, passed its release gate
    _version(reg, tmp_path, 3, gate={"passed": False, "reason": "margin"})
    reg.publish_artifact(empty, _artifact(reg, 2, passed=False))
    assert reg.default_version(TASK) == 2  # without a backend: as before
    assert reg.default_version(TASK, BACKEND) == 1  # v2's int8 graph was refused: it cannot serve
    assert reg.default_version(TASK, "onnx-fp32") == 2  # no artifact yet: a scorer exports it at start
    assert reg.default_version(TASK, "torch") == 2
    (reg.artifact_dir(TASK, 1, BACKEND)).mkdir(parents=True)
    (reg.artifact_dir(TASK, 1, BACKEND) / "artifact.json").write_text("not json")
    assert reg.default_version(TASK, BACKEND) is None  # an invalid record cannot serve either
    reg.publish_artifact(_model(tmp_path, "m", b"graph"), _artifact(reg, 2, passed=True))
    assert reg.default_version(TASK, BACKEND) == 2  # the refused record was replaced by a passed one
