"""The trainer loses no label and always restarts: undefined metrics are recorded and readable,
the gate refuses them saying why, and a run stopped at its budget leaves what it did not reach
fresh. No services; the one training run is the small purchase-intent MLP on CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from streamtune.core.errors import StreamtuneError
from streamtune.core.events import ClickEvent
from streamtune.core.features import apply_click, session_row, vectorize
from streamtune.core.settings import Settings
from streamtune.core.tasks import TASKS, MetricFamily
from streamtune.model.encoder import Head
from streamtune.ops.telemetry import TrainerMetrics
from streamtune.rollout.registry import BaseModelRef, LocalRegistry, Manifest
from streamtune.trainer.main import last_trainer_manifest, recovered_watermarks
from streamtune.training import metrics as M
from streamtune.training.candidate import (
    METRIC_NAMES,
    OnlineConfig,
    Reference,
    _ClickModel,
    _ReadLog,
    _TextModel,
    evaluate,
    fresh_in_training_order,
    train_candidate,
    undefined_metrics,
)
from streamtune.training.online import (
    CLICK_LABELS,
    Example,
    Metrics,
    RunProgress,
    TrainingSet,
    gate,
    select,
    trained_watermark,
)

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
T0 = datetime(2026, 11, 29, 12, tzinfo=UTC)
CLICK = "purchase_intent"
NAN = math.nan


def ex(seq: int, y: str = "Desks", x: str | list[float] = "q") -> Example:
    return Example(f"query_class:q{seq}", x, y, 0, seq, T0.timestamp() + seq, seq)


def session_x(i: int) -> list[float]:
    """A session's model input (one product page view of ``10 + i`` seconds)."""
    click = ClickEvent.model_validate(
        {
            "event_id": f"c{i}", "ts": T0, "session_id": f"s{i}", "page_type": "product",
            "duration_s": 10.0 + i, "page_value": float(i % 7), "bounce_rate": 0.1, "exit_rate": 0.2,
            "month": 11, "visitor_type": "returning", "weekend": bool(i % 2), "special_day": 0.0,
            "traffic_type": 2, "region": 3, "browser": 4, "operating_system": 1,
        }
    )  # fmt: skip
    state, _ = apply_click(None, click, 0, i)
    return vectorize(session_row(state))


def click_manifest(version: int, training: dict[str, Any], metrics: dict[str, float]) -> Manifest:
    return Manifest(
        task=CLICK,
        version=version,
        parent_version=1,
        kind="click-mlp-lora",
        base_model=BaseModelRef(name="click-mlp", sha256="0" * 64),
        labels=list(CLICK_LABELS),
        created_at=T0,
        training=training,
        metrics=metrics,
        baselines={"live_v1": metrics},
        gate={"passed": False, "reason": "roc_auc undefined", "holdout": {"live": metrics}},
    )


def publish(registry: LocalRegistry, tmp_path: Path, m: Manifest) -> Manifest:
    build = tmp_path / f"build-{m.version}"
    build.mkdir()
    (build / "adapter_model.safetensors").write_bytes(b"weights")
    return registry.publish(build, m)


# --- undefined metrics in the registry ---------------------------------------------------------


@pytest.mark.parametrize("key", [None, b"k"], ids=["unsigned", "signed"])
def test_a_manifest_with_an_undefined_metric_is_written_read_verified_and_recovered(
    tmp_path: Path, key: bytes | None
) -> None:
    registry = LocalRegistry(tmp_path / "adapters", key)
    metrics = {"roc_auc": NAN, "pr_auc": NAN, "positive_rate": 0.0}
    publish(registry, tmp_path, click_manifest(2, {"source": "trainer", "joined_seq": 41}, metrics))

    raw = json.loads((tmp_path / "adapters" / CLICK / "2" / "manifest.json").read_text())
    assert raw["metrics"] == {"roc_auc": None, "pr_auc": None, "positive_rate": 0.0}  # JSON: null
    m = registry.manifest(CLICK, 2)
    assert math.isnan(m.metrics["roc_auc"]) and math.isnan(m.baselines["live_v1"]["pr_auc"])
    assert m.metrics["positive_rate"] == 0.0
    assert registry.verify(CLICK, 2).version == 2  # checksums, and the signature over the same JSON
    assert registry.default_version(CLICK) is None  # refused by its gate: never serves

    last = last_trainer_manifest(registry, CLICK)
    assert last is not None and last.version == 2
    assert recovered_watermarks(registry) == {CLICK: 41}


def test_recovery_skips_a_version_whose_manifest_cannot_be_read(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "adapters")
    publish(registry, tmp_path, click_manifest(2, {"source": "trainer", "joined_seq": 7}, {"roc_auc": 0.7}))
    publish(registry, tmp_path, click_manifest(3, {"source": "trainer", "joined_seq": 9}, {"roc_auc": 0.7}))
    (tmp_path / "adapters" / CLICK / "3" / "manifest.json").write_text('{"task": "purchase_intent", "ver')
    last = last_trainer_manifest(registry, CLICK)
    assert last is not None and last.version == 2
    assert recovered_watermarks(registry) == {CLICK: 7}  # the older watermark: labels fresh again, none lost


# --- evaluation records what is undefined and why ---------------------------------------------


def test_a_one_class_holdout_leaves_the_ranking_metrics_undefined_and_says_why() -> None:
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    m = evaluate(CLICK, CLICK_LABELS, ["no_purchase"] * 3, probs)
    assert isinstance(m, Metrics) and set(m) == {"roc_auc", "pr_auc", "positive_rate"}
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"]) and m["positive_rate"] == 0.0
    assert m.undefined == {
        "roc_auc": "one class only (no_purchase) in 3 rows",
        "pr_auc": "one class only (no_purchase) in 3 rows",
    }


def test_rows_of_classes_the_model_lacks_leave_every_metric_undefined() -> None:
    labels = ["negative", "neutral", "positive"]
    probs = np.full((3, 3), 1 / 3)
    m = evaluate("review_sentiment", labels, ["positive", "superb", "negative"], probs)
    assert set(m) == {"accuracy", "macro_f1"} and all(math.isnan(v) for v in m.values())
    assert m.undefined["macro_f1"] == "classes the model lacks (superb: 1 of 3 rows)"


def test_no_rows_leave_every_metric_undefined() -> None:
    m = evaluate("query_class", ["Desks", "Lamps", "Beds"], [], np.zeros((0, 3)))
    assert set(m.undefined) == {"top1", "top3"} and set(m.undefined.values()) == {"no rows"}


@pytest.mark.parametrize("task", list(TASKS))
def test_defined_metrics_have_no_reason_and_name_every_metric_of_the_family(task: str) -> None:
    spec = TASKS[task]
    labels = list(spec.labels or ["Desks", "Lamps", "Beds", "Sofas"])
    y = [labels[i % len(labels)] for i in range(8)]
    probs = np.random.default_rng(0).dirichlet(np.ones(len(labels)), size=8)
    m = evaluate(task, labels, y, probs)
    assert m.undefined == {} and all(math.isfinite(v) for v in m.values())
    # METRIC_NAMES (used when nothing can be computed) are the names the family computes
    yi = [labels.index(v) for v in y]
    p = probs[:, -1] if spec.metric_family is MetricFamily.BINARY else probs
    assert tuple(M.METRICS[spec.metric_family](yi, p)) == METRIC_NAMES[spec.metric_family] == tuple(m)


def test_the_comparison_record_lists_the_undefined_metrics_per_set_and_model() -> None:
    one_class = evaluate(CLICK, CLICK_LABELS, ["no_purchase"] * 2, np.array([[0.9, 0.1], [0.2, 0.8]]))
    fine = {"roc_auc": 0.8, "pr_auc": 0.6, "positive_rate": 0.5}
    record = undefined_metrics(one_class, one_class, fine, {"roc_auc": NAN})
    why = "one class only (no_purchase) in 2 rows"
    assert record == {
        "holdout": {"live": {"roc_auc": why, "pr_auc": why}, "candidate": {"roc_auc": why, "pr_auc": why}},
        "reference": {"candidate": {"roc_auc": "undefined"}},  # a plain mapping: no reason kept
    }
    assert undefined_metrics(fine, fine, fine, fine) == {}


# --- the gate refuses an undefined gate metric, saying why -------------------------------------

GATE_ARGS = {"margin": 0.0, "tolerance": 0.01, "holdout_rows": 10, "reference_rows": 300}


def test_the_gate_refuses_an_undefined_gate_metric_with_the_reason() -> None:
    holdout = evaluate(CLICK, CLICK_LABELS, ["no_purchase"] * 10, np.tile([[0.8, 0.2]], (10, 1)))
    ref = {"roc_auc": 0.8}
    v = gate(CLICK, holdout, holdout, ref, ref, **GATE_ARGS)
    assert not v.passed
    assert v.reason == "roc_auc undefined on the holdout (10 rows): one class only (no_purchase) in 10 rows"
    why = "one class only (no_purchase) in 10 rows"
    assert v.details["undefined"] == {"holdout": {"candidate": why, "live": why}}
    assert v.details["metric"] == "roc_auc"
    assert v.details["reference"]["live"] == ref  # what the trainer keeps for its next run


def test_the_gate_names_each_models_reason_and_the_reference_set() -> None:
    good = {"roc_auc": 0.9}
    cand = Metrics({"roc_auc": NAN}, {"roc_auc": "classes the model lacks (x: 1 of 5 rows)"})
    v = gate(CLICK, good, good, good, cand, **GATE_ARGS)
    assert not v.passed
    assert (
        v.reason
        == "roc_auc undefined on the reference set (300 rows): classes the model lacks (x: 1 of 5 rows)"
    )
    v = gate(CLICK, good, {"pr_auc": 0.5}, good, good, **GATE_ARGS)
    assert not v.passed and v.reason == "roc_auc undefined on the holdout (10 rows): not computed"
    v = gate(CLICK, {"roc_auc": NAN}, cand, good, good, **GATE_ARGS)
    assert v.reason == (
        "roc_auc undefined on the holdout (10 rows): candidate: classes the model lacks (x: 1 of 5 rows); "
        "live: undefined"
    )


# --- a run stopped at its budget leaves what it did not reach fresh ------------------------------


def test_the_watermark_advances_only_below_the_first_label_the_run_did_not_reach() -> None:
    fresh = [ex(s) for s in (5, 2, 7, 3, 9)]  # in training order (shuffled)
    assert trained_watermark(12, fresh, 5) == 12  # every one: the whole set (held-out 10..12 too)
    assert trained_watermark(12, fresh, 2) == 2  # 7, 3, 9 not reached: up to below 3 (5 again later)
    assert trained_watermark(12, fresh, 0) == 1  # none: below the lowest
    assert trained_watermark(12, [], 0) == 12


def test_the_fresh_labels_in_training_order_come_from_the_rows_the_fit_read() -> None:
    fresh = [ex(s) for s in (10, 11, 12, 13)]  # rows 0..3 of the training list; 4.. are replay
    order, reached = fresh_in_training_order(fresh, [5, 2, 0, 2, 7])
    assert [e.seq for e in order] == [12, 10, 11, 13] and reached == 2
    assert trained_watermark(13, order, reached) == 10
    assert fresh_in_training_order(fresh, range(6)) == (fresh, 4)


def test_the_read_log_records_the_rows_read_in_order() -> None:
    rows = _ReadLog(["a", "b", "c", "d"])
    assert [rows[2], rows[0], rows[-1]] == ["c", "a", "d"] and rows[1:3] == ["b", "c"]
    assert list(rows.read) == [2, 0, 3, 1] and len(rows) == 4
    with pytest.raises(IndexError):
        rows[4]


class _Tok:
    def __call__(self, texts: list[str], **_: Any) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[len(t) % 7] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return SimpleNamespace(last_hidden_state=self.emb(input_ids))


def _tiny_text_model() -> _TextModel:
    model = _TextModel.__new__(_TextModel)  # the real fit (fit_text) on a tiny stand-in encoder
    model.tok, model.model, model.head, model.max_len = _Tok(), _Encoder(), Head(4, 2), 8
    model.trained, model.inference_only = [], False
    return model


def test_a_text_fit_stopped_at_its_budget_reports_only_the_rows_its_steps_read() -> None:
    xs, yi = [f"text {i}" * (i % 5 + 1) for i in range(40)], [i % 2 for i in range(40)]
    cfg = OnlineConfig(epochs=2, batch_size=16, seed=3)
    model = _tiny_text_model()
    assert model.fit(xs, yi, 2, cfg, "review_sentiment", deadline=time.monotonic() - 1) == 1  # one step
    assert len(model.trained) == 16 and len(set(model.trained)) == 16 and model.trained != list(range(16))
    model.fit(xs, yi, 2, cfg, "review_sentiment", deadline=time.monotonic() + 600)
    assert model.trained == list(range(40))
    model.inference_only = True  # its LoRA merged into the base weights: nothing left to train
    with pytest.raises(StreamtuneError, match="inference only"):
        model.fit(xs, yi, 2, cfg, "review_sentiment", deadline=time.monotonic() + 600)


def test_a_training_set_reaches_what_its_run_reported() -> None:
    ts = TrainingSet([ex(1)], [], [ex(2)], watermark=2)
    assert ts.reached() == 2  # nothing reported (a job that does not say): the whole set
    ts.progress.watermark = 0
    assert ts.reached() == 0
    assert TrainingSet([], [], [], 5, progress=RunProgress(9)).reached() == 5  # never beyond the set


def click_labels(n: int, one_class_from: int | None = None) -> list[Example]:
    """``n`` joined purchase-intent labels (seq 0..n-1), alternating; from ``one_class_from`` on
    non-buyers only."""
    out = []
    for i in range(n):
        bought = i % 2 == 1 and (one_class_from is None or i < one_class_from)
        y = "purchase" if bought else "no_purchase"
        out.append(
            Example(f"{CLICK}:s{i}", session_x(i), y, 0, i, (T0 + timedelta(seconds=i)).timestamp(), i)
        )
    return out


def click_reference() -> Reference:
    return Reference([session_x(100 + i) for i in range(20)], [CLICK_LABELS[i % 2] for i in range(20)])


def test_a_one_class_holdout_candidate_is_published_readable_refused_and_recovered(tmp_path: Path) -> None:
    """The reported case end to end: a purchase-intent run whose 10 held-out labels are all
    non-buyers. Before, its manifest held nulls the registry refused to read, and the trainer
    exited at every restart."""
    shutil.copytree(ADAPTERS / CLICK / "1", tmp_path / CLICK / "1")  # v1 only: the candidate is v2
    registry = LocalRegistry(tmp_path)
    ts = select(click_labels(50, one_class_from=40), -1, holdout_fraction=0.2, replay_ratio=0.0, seed=1)
    assert len(ts.holdout) == 10 and {e.y for e in ts.holdout} == {"no_purchase"}

    cfg = OnlineConfig(epochs=1, budget_s=120)
    out = train_candidate(CLICK, 1, ts, click_reference(), registry, "unused", cfg)
    assert not out.verdict.passed and "one class only (no_purchase) in 10 rows" in out.verdict.reason
    assert ts.progress.watermark == ts.reached() == 49  # the MLP trains whole epochs: every label used

    m = registry.verify(CLICK, 2)  # read back from disk
    assert math.isnan(m.metrics["roc_auc"]) and math.isnan(m.baselines["live_v1"]["roc_auc"])
    assert (
        m.gate["undefined_metrics"]["holdout"]["candidate"]["roc_auc"]
        == "one class only (no_purchase) in 10 rows"
    )
    assert m.gate["passed"] is False and "one class only" in m.gate["reason"]
    assert m.training["joined_seq"] == 49 and m.training["fresh_labels_trained"] == 40
    last = last_trainer_manifest(registry, CLICK)
    assert last is not None and last.version == 2
    assert recovered_watermarks(registry) == {CLICK: 49}
    assert registry.default_version(CLICK) == 1


def test_a_run_stopped_at_its_budget_reports_how_far_it_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train_candidate reports the watermark its fit reached, to the trainer (the set's
    progress, read by run_job) and to the next start (the manifest's joined_seq)."""
    shutil.copytree(ADAPTERS / CLICK / "1", tmp_path / CLICK / "1")  # v1 only: the candidate is v2
    registry = LocalRegistry(tmp_path)
    real_fit = _ClickModel.fit

    def stopped_early(self: _ClickModel, xs: list[Any], *args: Any, **kwargs: Any) -> int:
        steps = real_fit(self, xs, *args, **kwargs)
        self.trained = [7, 0, 1, 2, 3, 4, 5, 6, 9]  # as a budget stop would leave it: row 8 not reached
        return steps

    monkeypatch.setattr(_ClickModel, "fit", stopped_early)
    ts = select(click_labels(50), -1, holdout_fraction=0.2, replay_ratio=0.0, seed=1)
    assert [e.seq for e in ts.fresh] == list(range(40)) and ts.watermark == 49
    train_candidate(CLICK, 1, ts, click_reference(), registry, "unused", OnlineConfig(epochs=1, budget_s=120))
    assert ts.reached() == 7  # below seq 8, the first label the run did not reach
    t = registry.manifest(CLICK, 2).training
    assert (t["joined_seq"], t["joined_seq_selected"], t["fresh_labels_trained"]) == (7, 49, 9)
    assert recovered_watermarks(registry) == {CLICK: 7}  # a restart leaves them fresh too


# --- pending bound: setting and metric ------------------------------------------------------------


def test_the_pending_bound_is_a_setting_and_drops_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().trainer.max_pending == 50_000
    monkeypatch.setenv("STREAMTUNE_TRAINER_MAX_PENDING", "7")
    assert Settings().trainer.max_pending == 7
    m = TrainerMetrics()
    m.labels_dropped.labels("query_class", "pending_full").inc(3)
    value = m.registry.get_sample_value(
        "streamtune_trainer_labels_dropped_total", {"task": "query_class", "reason": "pending_full"}
    )
    assert value == 3


def test_session_examples_of_another_width_are_dropped_not_stacked() -> None:
    """Click examples joined before the derived feature columns existed come back from the
    changelog shorter; a run mixing widths would fail at every retry, so they are dropped."""
    from streamtune.core.features import BASE_FEATURE_DIM, FEATURE_DIM
    from streamtune.trainer.main import current_width

    labels = click_labels(20)
    old = [dataclasses.replace(e, x=list(e.x)[:BASE_FEATURE_DIM]) for e in labels[:5]]
    ts = select(old + labels[5:], -1, holdout_fraction=0.2, replay_ratio=0.0, seed=1)
    kept = current_width(CLICK, ts)
    every = kept.fresh + kept.replay + kept.holdout
    assert len(every) == 15 and all(len(e.x) == FEATURE_DIM for e in every)
    review = select(labels, -1, holdout_fraction=0.2, replay_ratio=0.0, seed=1)
    assert current_width("review_sentiment", review) is review  # text tasks: untouched
