"""The linear stage (``streamtune.model.linear``) on a few hundred real training-split reviews:
probabilities, coverage, reasons, files (round trip, format checks, registry checksums)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.utils import murmurhash3_32
from threadpoolctl import threadpool_limits

from streamtune.core.errors import AdapterError
from streamtune.core.settings import Settings
from streamtune.datasets import loaders
from streamtune.model.linear import (
    FORMAT_VERSION,
    LINEAR_FILES,
    LINEAR_META,
    LINEAR_WEIGHTS,
    LinearConfig,
    LinearStage,
)
from streamtune.rollout.registry import BaseModelRef, LocalRegistry, Manifest

CLASSES = loaders.SENTIMENTS
CONFIG = LinearConfig(n_features=2**18)
OTHER_LANGUAGES = [
    "Das Kleid ist wunderschön, passt perfekt und die Qualität ist hervorragend.",
    "La robe est trop petite et le tissu est de mauvaise qualité.",
    "El vestido llegó roto, muy decepcionada con la compra.",
    "Этот товар ужасен, не покупайте его",
]
GIBBERISH = ["xqzj vbnmkk wpfl zzrt qqq", "kjhgf dsaqw ertyu zxcvb"]


@pytest.fixture(scope="module")
def splits() -> loaders.Splits:
    return loaders.splits("review_sentiment", Settings().model.data_dir)


@pytest.fixture(scope="module")
def train(splits: loaders.Splits) -> tuple[list[str], list[str]]:
    rows = splits.train[:400]
    return [x for _, x, _ in rows], [y for _, _, y in rows]


@pytest.fixture(scope="module")
def validation(splits: loaders.Splits) -> list[str]:
    return [x for _, x, _ in splits.validation[:200]]


@pytest.fixture(scope="module")
def stage(train: tuple[list[str], list[str]]) -> LinearStage:
    return LinearStage.fit(train[0], train[1], CLASSES, CONFIG, seed=13)


def test_probabilities_follow_the_classes_and_learn_something(
    stage: LinearStage, splits: loaders.Splits, validation: list[str]
) -> None:
    probs = stage.predict_proba(validation)
    assert probs.shape == (len(validation), 3) and stage.classes == tuple(CLASSES)
    assert np.allclose(probs.sum(axis=1), 1.0) and (probs >= 0).all()
    truth = np.array([CLASSES.index(y) for _, _, y in splits.validation[:200]])
    majority = np.mean(truth == CLASSES.index("positive"))
    assert np.mean(probs.argmax(axis=1) == truth) > majority  # 400 reviews beat the majority class
    assert np.array_equal(stage.score(validation)[0], probs)


def test_probabilities_are_those_of_the_logistic_regression_on_the_tfidf_rows(
    stage: LinearStage, train: tuple[list[str], list[str]], validation: list[str]
) -> None:
    """Binary (one logit, stored as two) and multinomial both give sklearn's probabilities."""
    x_train, _ = stage._weighted(stage._raw(train[0]))
    x_val, _ = stage._weighted(stage._raw(validation))
    y = np.array([CLASSES.index(label) for label in train[1]])
    ref = LogisticRegression(C=CONFIG.C, class_weight="balanced", max_iter=CONFIG.max_iter, random_state=13)
    with threadpool_limits(limits=1, user_api="blas"):  # as fit does: same result, faster
        ref.fit(x_train, y)
    assert np.allclose(stage.predict_proba(validation), ref.predict_proba(x_val), atol=1e-4)

    keep = [i for i, label in enumerate(train[1]) if label != "neutral"]
    texts, labels = [train[0][i] for i in keep], [train[1][i] for i in keep]
    binary = LinearStage.fit(texts, labels, ["negative", "positive"], CONFIG, seed=13)
    xb, _ = binary._weighted(binary._raw(texts))
    ref_b = LogisticRegression(C=CONFIG.C, class_weight="balanced", max_iter=CONFIG.max_iter, random_state=13)
    with threadpool_limits(limits=1, user_api="blas"):
        ref_b.fit(xb, [int(label == "positive") for label in labels])
    xb_val, _ = binary._weighted(binary._raw(validation))
    assert np.allclose(binary.predict_proba(validation), ref_b.predict_proba(xb_val), atol=1e-4)


def test_a_class_without_training_texts_gets_probability_zero(train: tuple[list[str], list[str]]) -> None:
    texts, labels = train[0][:120], train[1][:120]
    stage = LinearStage.fit(texts, labels, [*CLASSES, "unused"], CONFIG)
    probs = stage.predict_proba(texts[:10])
    assert (probs[:, 3] == 0.0).all() and np.allclose(probs.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="not among the classes"):
        LinearStage.fit(texts, ["?"] * len(texts), CLASSES, CONFIG)


def test_save_and_load_give_identical_probabilities_coverage_and_reasons(
    stage: LinearStage, validation: list[str], tmp_path: Path
) -> None:
    stage.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(LINEAR_FILES)
    loaded = LinearStage.load(tmp_path)
    texts = [*validation, *OTHER_LANGUAGES, *GIBBERISH]
    assert np.array_equal(loaded.predict_proba(texts), stage.predict_proba(texts))
    assert np.array_equal(loaded.coverage(texts), stage.coverage(texts))
    assert [loaded.reasons(t) for t in validation[:20]] == [stage.reasons(t) for t in validation[:20]]
    assert loaded.classes == stage.classes and loaded.config == stage.config
    assert loaded.training == stage.training


def test_the_files_are_safetensors_and_json(stage: LinearStage, tmp_path: Path) -> None:
    stage.save(tmp_path)
    tensors = load_file(tmp_path / LINEAR_WEIGHTS)  # a plain safetensors file: arrays, no code
    assert set(tensors) == {"features", "idf", "coef", "intercept"}
    assert tensors["coef"].shape == (3, len(stage.features))
    meta = json.loads((tmp_path / LINEAR_META).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["classes"] == list(CLASSES)
    assert LinearConfig.from_json(meta["config"]) == CONFIG
    assert meta["vectorizers"]["word"]["n_features"] == CONFIG.n_features
    assert meta["vectorizers"]["char"]["analyzer"] == "char_wb"


def _version(tmp_path: Path, stage: LinearStage) -> tuple[LocalRegistry, Path]:
    build = tmp_path / "build"
    build.mkdir()
    (build / "adapter_model.safetensors").write_bytes(b"weights")
    (build / "adapter_config.json").write_text("{}")
    stage.save(build)
    reg = LocalRegistry(tmp_path / "reg")
    manifest = Manifest(
        task="review_sentiment",
        version=1,
        kind="text-lora",
        base_model=BaseModelRef(name="base", sha256="b" * 64),
        labels=list(CLASSES),
        created_at=datetime.now(UTC),
    )
    published = reg.publish(build, manifest)
    assert set(LINEAR_FILES) <= set(published.files)  # the manifest checksums the stage's files
    return reg, tmp_path / "reg" / "review_sentiment" / "1"


@pytest.mark.parametrize("name", LINEAR_FILES)
def test_a_tampered_linear_file_is_refused_like_any_adapter_file(
    stage: LinearStage, tmp_path: Path, name: str
) -> None:
    reg, version_dir = _version(tmp_path, stage)
    reg.verify("review_sentiment", 1)
    assert np.array_equal(LinearStage.load(version_dir).coef, stage.coef)
    path = version_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the file
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=f"checksum mismatch for {re.escape(name)}"):
        reg.verify("review_sentiment", 1)


def test_load_refuses_malformed_files(stage: LinearStage, tmp_path: Path) -> None:
    stage.save(tmp_path)
    meta_path, weights_path = tmp_path / LINEAR_META, tmp_path / LINEAR_WEIGHTS
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(AdapterError, match="format version"):
        LinearStage.load(tmp_path)
    changed = {**meta, "vectorizers": {**meta["vectorizers"], "word": {"analyzer": "char"}}}
    meta_path.write_text(json.dumps(changed))
    with pytest.raises(AdapterError, match="vectorizers differ"):
        LinearStage.load(tmp_path)
    meta_path.write_text(json.dumps(meta))

    good = weights_path.read_bytes()
    weights_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterError, match="invalid"):
        LinearStage.load(tmp_path)
    tensors = {k: np.array(v) for k, v in load_file_bytes(good).items()}
    save_file({**tensors, "coef": tensors["coef"][:, :-1].copy()}, str(weights_path))
    with pytest.raises(AdapterError, match="shapes do not fit"):
        LinearStage.load(tmp_path)
    save_file({**tensors, "features": tensors["features"][::-1].copy()}, str(weights_path))
    with pytest.raises(AdapterError, match="sorted"):
        LinearStage.load(tmp_path)
    save_file({**tensors, "idf": tensors["idf"].astype(np.float64)}, str(weights_path))
    with pytest.raises(AdapterError, match="expected"):
        LinearStage.load(tmp_path)
    (tmp_path / LINEAR_META).unlink()
    with pytest.raises(AdapterError, match="cannot read"):
        LinearStage.load(tmp_path)


def load_file_bytes(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


def test_coverage_is_one_on_training_texts_and_lower_out_of_domain(
    stage: LinearStage, train: tuple[list[str], list[str]], validation: list[str]
) -> None:
    assert (stage.coverage(train[0]) == 1.0).all()  # every feature of a training text is known
    in_domain = stage.coverage(validation)
    assert np.median(in_domain) > 0.9
    floor = np.quantile(in_domain, 0.05)
    assert (stage.coverage(OTHER_LANGUAGES) < floor).all()
    assert (stage.coverage(GIBBERISH) < 0.5).all()
    queries = [q.query for q in loaders.load_queries(Settings().model.data_dir)]  # furniture searches
    assert np.median(stage.coverage(queries)) < floor
    assert stage.coverage(["", "   "]).tolist() == [0.0, 0.0]  # nothing to know: out of domain


def _brute_force_reasons(stage: LinearStage, text: str, k: int, label: int) -> dict[int, float]:
    """Top-k (word-block column -> coefficient x value), recomputed from the definition."""
    cfg = stage.config
    known = dict(zip(stage.features.tolist(), range(len(stage.features)), strict=True))
    blocks = []
    for analyzer, ngrams in (("word", cfg.word_ngrams), ("char_wb", cfg.char_ngrams)):
        hv = HashingVectorizer(n_features=cfg.n_features, analyzer=analyzer, ngram_range=ngrams,
                               alternate_sign=False, norm=None)  # fmt: skip
        counts = hv.transform([text]).toarray()[0]
        offset = 0 if analyzer == "word" else cfg.n_features
        weights = {
            offset + j: (1 + np.log(counts[j])) * float(stage.idf[known[offset + j]])
            for j in np.flatnonzero(counts)
            if offset + j in known
        }
        norm = np.sqrt(sum(w * w for w in weights.values()))
        blocks.append({j: w / norm for j, w in weights.items()})
    contrib = {j: float(stage.coef[label, known[j]]) * v for j, v in blocks[0].items()}
    top = sorted((kv for kv in contrib.items() if kv[1] > 0), key=lambda kv: -kv[1])[:k]
    return dict(top)


def test_reasons_are_the_top_coefficient_times_value_terms(stage: LinearStage, validation: list[str]) -> None:
    n = stage.config.n_features
    checked = 0
    for text in validation[:40]:
        predicted = int(stage.predict_proba([text])[0].argmax())
        for label in (None, "negative"):
            c = predicted if label is None else CLASSES.index(label)
            reasons = stage.reasons(text, k=5, label=label)
            expected = _brute_force_reasons(stage, text, 5, c)
            got = {abs(murmurhash3_32(term, seed=0)) % n: w for term, w in reasons}
            assert set(got) == set(expected), text
            for column, w in got.items():
                assert w == pytest.approx(expected[column], rel=1e-5)
            weights = [w for _, w in reasons]
            assert weights == sorted(weights, reverse=True) and all(w > 0 for w in weights)
            checked += len(reasons)
    assert checked > 100
    assert stage.reasons("", k=5) == [] and stage.reasons(validation[0], k=0) == []


def test_reasons_name_the_terms_of_the_text() -> None:
    texts = ["terrible cheap fabric", "lovely soft fabric", "terrible seams", "lovely colour"] * 5
    labels = ["negative", "positive", "negative", "positive"] * 5
    stage = LinearStage.fit(texts, labels, ["negative", "positive"], LinearConfig(n_features=2**12))
    reasons = dict(stage.reasons("the fabric is terrible", k=3))
    assert next(iter(reasons)) == "terrible"  # "the", "is" and the bigrams were never seen
    assert reasons.get("fabric", 0.0) < 0.2 * reasons["terrible"]  # fabric is in both classes' texts


def test_fit_is_deterministic_and_config_is_validated(train: tuple[list[str], list[str]]) -> None:
    a = LinearStage.fit(train[0][:150], train[1][:150], CLASSES, CONFIG, seed=5)
    b = LinearStage.fit(train[0][:150], train[1][:150], CLASSES, CONFIG, seed=5)
    assert np.array_equal(a.coef, b.coef) and np.array_equal(a.features, b.features)
    assert LinearConfig.from_json(CONFIG.to_json()) == CONFIG
    for bad in ({"n_features": 1000}, {"word_ngrams": (2, 1)}, {"C": 0.0}, {"min_df": 0}):
        with pytest.raises(ValueError):
            LinearConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown"):
        LinearConfig.from_json({"n_gram": 3})
    with pytest.raises(TypeError):
        a.predict_proba("one string")  # type: ignore[arg-type]


def test_min_df_makes_rare_features_unknown(train: tuple[list[str], list[str]]) -> None:
    texts, labels = train[0][:200], train[1][:200]
    every = LinearStage.fit(texts, labels, CLASSES, CONFIG)
    common = LinearStage.fit(texts, labels, CLASSES, LinearConfig(n_features=2**18, min_df=2))
    assert len(common.features) < len(every.features) / 2
    assert set(common.features.tolist()) <= set(every.features.tolist())
    assert common.coverage(texts).mean() < 1.0 == every.coverage(texts).min()
