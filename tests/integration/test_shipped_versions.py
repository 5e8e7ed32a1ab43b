"""The shipped registry as a scorer loads it: every version verifies, and the newest text
version with a linear stage serves, on the whole held-out split, what its manifest recorded
(its cascade's metric and the share of each path), through the runtime the scorer uses."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from streamtune.core.scored import Scored
from streamtune.core.settings import Settings
from streamtune.core.tasks import TASK_NAMES, TASKS
from streamtune.model.cascade import ScorePath, shares
from streamtune.model.runtime import ModelRuntime, Route
from streamtune.rollout.registry import LocalRegistry
from streamtune.training import metrics as M
from streamtune.training.bootstrap import TrainConfig, text_split

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> LocalRegistry:
    root = tmp_path_factory.mktemp("shipped") / "adapters"
    shutil.copytree(Settings().model.adapter_dir, root, ignore=shutil.ignore_patterns("artifacts"))
    return LocalRegistry(root)


def test_every_shipped_version_verifies(shipped: LocalRegistry) -> None:
    for task in TASK_NAMES:
        versions = shipped.versions(task)
        assert versions and versions[0] == 1, task
        for v in versions:
            m = shipped.verify(task, v)  # every file's checksum
            assert (m.task, m.version) == (task, v)


def _newest_cascade(reg: LocalRegistry) -> list[tuple[str, int]]:
    out = []
    for task in TASK_NAMES:
        with_stage = [v for v in reg.versions(task) if reg.manifest(task, v).cascade]
        if with_stage:
            out.append((task, with_stage[-1]))
    return out


def test_the_newest_cascade_serves_what_its_manifest_recorded(shipped: LocalRegistry) -> None:
    found = _newest_cascade(shipped)
    assert {task for task, _ in found} >= {t for t in TASK_NAMES if TASKS[t].cascade}, found
    s = Settings()
    for task, version in found:
        m = shipped.manifest(task, version)
        held = m.cascade["held_out"]
        split = text_split(task, s.model.data_dir, TrainConfig())
        texts, y = split.held_out
        assert len(texts) == held["rows"] == m.training["held_out_rows"]
        rt = ModelRuntime(s.model.base_model, shipped, max_len=m.training["max_len"], threads=2)
        rt.activate(rt.load(task, version))
        scored = rt.score(task, texts)
        assert scored.version == version and scored.paths is not None
        # the path of each row depends on the row and the version only: scored again, one by one
        # for a sample, each row takes the same path
        for i in range(0, len(texts), 97):
            again = rt.score(task, [texts[i]])
            assert again.paths is not None and again.paths[0] == scored.paths[i]
        served = shares(scored.paths)
        for path in ScorePath:
            assert math.isclose(served[path.label], held["shares"][path.label], abs_tol=0.01), served
        metric = m.cascade["metric"]
        score = M.METRICS[TASKS[task].metric_family](y, scored.probs)[metric]
        # recorded by `streamtune train` from the same rows: equal up to float noise between
        # thread counts (a few argmax flips)
        assert math.isclose(score, held["cascade"][metric], abs_tol=0.01), (score, held["cascade"])


def _split_scored(rt: ModelRuntime, task: str, texts: list[str], keys: list[str] | None = None) -> Scored:
    """What the scorer's two steps serve (the linear pass, then the transformer's rows), put back
    in batch order."""
    split = rt.split(task, texts, keys)
    assert split is not None
    assert sorted(split.early_rows + split.later_rows) == list(range(len(texts)))
    n, parts = len(texts), []
    if split.early is not None:
        parts.append((split.early_rows, split.early))
    if split.later_rows:
        parts.append((split.later_rows, rt.score_later(split)))
    probs = np.zeros((n, parts[0][1].probs.shape[1]), dtype=np.float32)
    versions, paths = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int8)
    reasons: list[object] = [None] * n
    for rows, part in parts:
        assert part.paths is not None
        probs[rows], versions[rows], paths[rows] = part.probs, part.versions, part.paths
        for r, why in zip(rows, part.reasons or [None] * len(rows), strict=True):
            reasons[r] = why
    if split.early is not None:  # the linear pass answered these alone: no transformer row
        assert (split.early.paths == ScorePath.LINEAR).all()
    return Scored(task, [], probs, versions, paths=paths, reasons=reasons)  # type: ignore[arg-type]


def test_publishing_linear_answers_first_serves_what_one_pass_serves(shipped: LocalRegistry) -> None:
    """The scorer publishes the linear stage's answers before the transformer runs on the rest of
    the batch (``ModelRuntime.split`` then ``score_later``): the same probabilities, paths,
    reasons and versions as :meth:`ModelRuntime.score`, with a canary on some entities too (a
    version without a linear stage), and rows whose version a swap unloaded in between are scored
    by what serves now."""
    s = Settings()
    (task, version), *_ = _newest_cascade(shipped)
    m = shipped.manifest(task, version)
    texts = text_split(task, s.model.data_dir, TrainConfig()).held_out[0][:160]
    keys = [f"product-{i % 37}" for i in range(len(texts))]
    rt = ModelRuntime(s.model.base_model, shipped, max_len=m.training["max_len"], threads=2)
    for canary in (None, 1):  # (set_route unloads the versions it leaves unused: load each time)
        live = rt.load(task, version)
        plain = None if canary is None else rt.load(task, canary)
        assert live.linear is not None and (plain is None or plain.linear is None)
        rt.set_route(task, Route(live=live, canary=plain, fraction=0.5))
        whole = rt.score(task, texts, keys)
        two = _split_scored(rt, task, texts, keys)
        assert whole.paths is not None
        np.testing.assert_allclose(two.probs, whole.probs, rtol=1e-5, atol=1e-6)
        assert two.versions.tolist() == whole.versions.tolist()
        assert two.paths.tolist() == whole.paths.tolist()  # type: ignore[union-attr]
        assert two.reasons == (whole.reasons or [None] * len(texts))
        assert {ScorePath.LINEAR, ScorePath.TRANSFORMER} <= {int(p) for p in whole.paths}
    assert rt.split(task, texts, keys, shadow=True) is None  # shadowing needs the whole batch
    # a swap between the two steps unloads the canary's torch adapter: its rows are scored by
    # what serves now, and their version says so
    split = rt.split(task, texts, keys)
    assert split is not None and split.later_rows
    rt.set_route(task, Route(live=live))
    later = rt.score_later(split)
    assert set(later.versions.tolist()) == {version}
    now = rt.score(task, [texts[i] for i in split.later_rows])
    np.testing.assert_allclose(later.probs, now.probs, rtol=1e-5, atol=1e-6)
