"""The shipped registry as a scorer loads it: every version verifies, and the newest text
version with a linear stage serves, on the whole held-out split, what its manifest recorded
(its cascade's metric and the share of each path), through the runtime the scorer uses."""

from __future__ import annotations

import math
import shutil

import pytest

from streamtune.core.settings import Settings
from streamtune.core.tasks import TASK_NAMES, TASKS
from streamtune.model.cascade import ScorePath, shares
from streamtune.model.runtime import ModelRuntime
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
