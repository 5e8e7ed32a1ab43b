"""Serving through the cascade (``model.cascade.answer``) with a real linear stage fitted on a
few hundred real training-split reviews and a stand-in transformer; the path and reasons in the
result events; the manifest field that carries the rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import jsonschema
import numpy as np
import pytest

from streamtune.core import encode
from streamtune.core.events import ReviewEvent, ReviewScore, SearchEvent, SearchScore
from streamtune.core.scored import ANSWER_PATHS, Scored
from streamtune.core.settings import Settings
from streamtune.datasets import loaders
from streamtune.model.cascade import TRANSFORMER_ONLY, CascadeRule, ScorePath, answer, combine, route
from streamtune.model.linear import LinearConfig, LinearStage
from streamtune.rollout.registry import BaseModelRef, Manifest

CLASSES = loaders.SENTIMENTS
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str], list[str]]:
    rows = loaders.splits("review_sentiment", Settings().model.data_dir)
    train = rows.train[:400]
    return [x for _, x, _ in train], [y for _, _, y in train], [x for _, x, _ in rows.validation[:120]]


@pytest.fixture(scope="module")
def stage(texts: tuple[list[str], list[str], list[str]]) -> LinearStage:
    xtr, ytr, _ = texts
    return LinearStage.fit(xtr, ytr, CLASSES, LinearConfig(n_features=2**18), seed=13)


class Transformer:
    """A stand-in transformer: a fixed distribution per text, recording what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.tile(np.array([[0.2, 0.5, 0.3]], dtype=np.float32), (len(texts), 1))


def _middle_rule(stage: LinearStage, texts: list[str], weight: float = 0.5) -> CascadeRule:
    """A rule whose threshold splits ``texts`` between the linear path and the others."""
    probs, coverage = stage.score(texts)
    return CascadeRule(float(np.median(probs.max(axis=1))), weight, float(np.quantile(coverage, 0.1)))


def test_only_the_rows_that_need_it_reach_the_transformer(
    stage: LinearStage, texts: tuple[list[str], list[str], list[str]]
) -> None:
    val = texts[2]
    rule = _middle_rule(stage, val)
    tr = Transformer()
    out = answer(stage, rule, val, tr)
    linear_probs, coverage = stage.score(val)
    paths = route(linear_probs, coverage, rule)
    assert out.paths.tolist() == paths.tolist()
    assert {int(p) for p in paths} == {p.value for p in ScorePath}, "the rule exercises every path"
    [sent] = tr.calls
    assert sent == [t for t, p in zip(val, paths, strict=True) if p != ScorePath.LINEAR]
    expected = combine(paths, linear_probs, tr(list(val)), rule)
    np.testing.assert_allclose(out.probs, expected, rtol=1e-6, atol=1e-7)
    assert out.probs.dtype == np.float32 and out.reasons is None


def test_a_batch_the_linear_stage_answers_alone_never_calls_the_transformer(
    stage: LinearStage, texts: tuple[list[str], list[str], list[str]]
) -> None:
    tr = Transformer()
    out = answer(stage, CascadeRule(threshold=0.0, weight=1.0), texts[2], tr)
    assert tr.calls == [] and (out.paths == ScorePath.LINEAR).all()
    out = answer(stage, TRANSFORMER_ONLY, texts[2], tr)
    assert len(tr.calls) == 1 and (out.paths == ScorePath.TRANSFORMER).all()
    np.testing.assert_allclose(out.probs, tr(texts[2][:1]).repeat(len(texts[2]), axis=0))


def test_an_events_path_and_score_do_not_depend_on_its_batch(
    stage: LinearStage, texts: tuple[list[str], list[str], list[str]]
) -> None:
    val = texts[2]
    rule = _middle_rule(stage, val)
    whole = answer(stage, rule, val, Transformer())
    for i in (0, 7, 33):
        alone = answer(stage, rule, [val[i]], Transformer())
        assert alone.paths[0] == whole.paths[i]
        np.testing.assert_allclose(alone.probs[0], whole.probs[i], rtol=1e-6, atol=1e-7)


def test_reasons_are_the_top_coefficient_terms_towards_the_served_label(
    stage: LinearStage, texts: tuple[list[str], list[str], list[str]]
) -> None:
    val = texts[2][:20]
    out = answer(stage, CascadeRule(threshold=0.0, weight=1.0), val, Transformer(), reasons=3)
    assert out.reasons is not None and len(out.reasons) == len(val)
    for text, probs, why in zip(val, out.probs, out.reasons, strict=True):
        label = CLASSES[int(probs.argmax())]
        assert why == stage.reasons(text, k=3, label=label)
        assert [w for _, w in why] == sorted((w for _, w in why), reverse=True)
    assert any(out.reasons), "some review has a reason"


def _review(i: int) -> ReviewEvent:
    return ReviewEvent.model_validate(
        {"event_id": f"r{i}", "ts": "2026-01-01T00:00:00Z", "product_id": "p1", "text": "soft and lovely"}
    )


def test_review_results_carry_their_path_and_reasons_and_validate_against_the_schema() -> None:
    scored = Scored(
        "review_sentiment", list(CLASSES), np.array([[0.1, 0.1, 0.8], [0.6, 0.3, 0.1]], dtype=np.float32),
        np.array([2, 2]), paths=np.array([ScorePath.LINEAR, ScorePath.BLEND], dtype=np.int8),
        reasons=[[("lovely", 0.4), ("soft", 0.1)], []],
    )  # fmt: skip
    results = encode.review_results([_review(0), _review(1)], scored, NOW)
    first, second = (json.loads(r.payload()) for r in results)
    assert first["path"] == "linear" and first["reasons"] == [
        {"term": "lovely", "weight": 0.4},
        {"term": "soft", "weight": 0.1},
    ]
    assert second["path"] == "blend" and second["reasons"] == []
    validator = jsonschema.Draft202012Validator(ReviewScore.model_json_schema())
    for payload in (first, second):
        validator.validate(payload)
    # what a subscriber of the first schema version reads: no path, no reasons
    old = {k: v for k, v in first.items() if k not in ("path", "reasons")}
    validator.validate(old)
    assert ReviewScore.model_validate(old).path is None


def test_rows_of_a_version_without_a_linear_stage_get_no_reasons_in_a_mixed_batch() -> None:
    """A canary split a batch between a version with a linear stage and one without."""
    scored = Scored(
        "review_sentiment", list(CLASSES), np.array([[0.1, 0.1, 0.8], [0.6, 0.3, 0.1]], dtype=np.float32),
        np.array([1, 2]), paths=np.array([ScorePath.TRANSFORMER, ScorePath.LINEAR], dtype=np.int8),
        reasons=[None, [("faded", 0.3)]],
    )  # fmt: skip
    first, second = (
        json.loads(r.payload()) for r in encode.review_results([_review(0), _review(1)], scored, NOW)
    )
    assert first["reasons"] is None and first["path"] == "transformer"
    assert second["reasons"] == [{"term": "faded", "weight": 0.3}]


def test_a_version_without_a_linear_stage_says_transformer_and_gives_no_reasons() -> None:
    scored = Scored(
        "query_class", ["a", "b"], np.array([[0.3, 0.7]], dtype=np.float32), np.array([1]),
        paths=np.array([ScorePath.TRANSFORMER], dtype=np.int8),
    )  # fmt: skip
    query = SearchEvent.model_validate(
        {"event_id": "q1", "ts": "2026-01-01T00:00:00Z", "session_id": "s1", "query": "oak desk"}
    )
    search = encode.search_results([query], scored, NOW)
    assert json.loads(search[0].payload())["path"] == "transformer"
    assert SearchScore.model_validate_json(search[0].payload()).path == "transformer"


def test_path_names_are_one_list() -> None:
    assert [p.label for p in ScorePath] == list(ANSWER_PATHS)


def test_a_manifest_without_a_cascade_signs_as_before_the_field_existed() -> None:
    base = BaseModelRef(name="b", sha256="c" * 64)
    m = Manifest(
        task="review_sentiment",
        version=1,
        kind="text-lora",
        base_model=base,
        labels=list(CLASSES),
        created_at=NOW,
    )
    assert b'"cascade"' not in m.signing_bytes()
    with_rule = m.model_copy(update={"cascade": {"rule": TRANSFORMER_ONLY.as_dict()}})
    assert b'"cascade"' in with_rule.signing_bytes()
