"""The linear stage of a text task: hashed word and character n-grams, TF-IDF, logistic regression.

A bag-of-words classifier that answers a text in microseconds, beside the transformer (issue 12).
Torch-free: it needs numpy, scipy and scikit-learn only, and is saved without pickle.

* **Features.** Two scikit-learn ``HashingVectorizer`` blocks, word n-grams and ``char_wb``
  n-grams, each hashed into ``n_features`` columns (stateless: no vocabulary is stored). Column
  ``j`` of the word block is feature ``j``, column ``j`` of the char block is ``n_features + j``.
* **Known features.** A feature is *known* when at least ``min_df`` training texts contain it.
  Only known features carry an IDF and coefficients; an unknown one is dropped before weighting,
  as a fitted ``TfidfVectorizer`` drops words outside its vocabulary. The share of a text's
  distinct hashed features that are known is its :meth:`LinearStage.coverage`, the
  out-of-domain signal the cascade defers on (``streamtune.model.cascade``).
* **Weights.** Sublinear tf (``1 + ln(count)``) times smooth IDF (``ln((1 + n) / (1 + df)) + 1``,
  as ``TfidfTransformer``), L2-normalised per block (as two ``TfidfVectorizer`` blocks stacked),
  then a logistic regression (multinomial; ``class_weight="balanced"`` optional).
* **Files.** :data:`LINEAR_WEIGHTS` (safetensors: the known features' indices, their IDF, the
  coefficients and intercepts) and :data:`LINEAR_META` (JSON: format version, classes, the
  config, the vectorizers' parameters). Placed in a version directory, both are checksummed by
  the registry's manifest like every other file of the version.

Only known features are stored (their indices, sorted), not a dense mask over the hashed space:
coefficients of a feature no training text has are zero anyway, and the dense form would cost
``classes x 2 x n_features`` floats (hundreds of MiB for the 188 query classes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from streamtune.core.errors import AdapterError, StreamtuneError

LINEAR_WEIGHTS = "linear.safetensors"
LINEAR_META = "linear.json"
LINEAR_FILES = (LINEAR_WEIGHTS, LINEAR_META)
FORMAT = "streamtune-linear"
FORMAT_VERSION = 1
WORD_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of two or more characters
_TENSORS = {"features": np.int64, "idf": np.float32, "coef": np.float32, "intercept": np.float32}


@dataclass(frozen=True, slots=True)
class LinearConfig:
    """How a linear stage is built and trained (recorded in :data:`LINEAR_META`)."""

    n_features: int = 2**20  # hashed columns of each block (word, char): a power of two
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 4)  # char_wb n-grams (inside word boundaries)
    min_df: int = 1  # a feature in fewer training texts is unknown: no weight, lowers coverage
    C: float = 4.0  # inverse L2 regularisation strength of the logistic regression
    balanced: bool = True  # class_weight="balanced"
    max_iter: int = 2000

    def __post_init__(self) -> None:
        n = self.n_features
        if n < 2 or n & (n - 1) or n > 2**24:
            raise ValueError(f"n_features must be a power of two in [2, 2**24], not {n}")
        for name, (lo, hi) in (("word_ngrams", self.word_ngrams), ("char_ngrams", self.char_ngrams)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, not {(lo, hi)}")
        if self.min_df < 1:
            raise ValueError(f"min_df must be >= 1, not {self.min_df}")
        if not (math.isfinite(self.C) and self.C > 0):
            raise ValueError(f"C must be positive, not {self.C}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, not {self.max_iter}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["word_ngrams"] = list(self.word_ngrams)
        d["char_ngrams"] = list(self.char_ngrams)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LinearConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LinearConfig fields {sorted(unknown)}")
        args = dict(d)
        for key in ("word_ngrams", "char_ngrams"):
            if key in args:
                lo, hi = args[key]
                args[key] = (int(lo), int(hi))
        return cls(**args)


def _vectorizers(cfg: LinearConfig) -> tuple[Any, Any]:
    """The word and char_wb hashing vectorizers (raw counts, all non-negative)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    common: dict[str, Any] = {"n_features": cfg.n_features, "lowercase": True, "alternate_sign": False,
                              "norm": None, "dtype": np.float64}  # fmt: skip
    word = HashingVectorizer(
        analyzer="word", ngram_range=cfg.word_ngrams, token_pattern=WORD_TOKEN_PATTERN, **common
    )
    char = HashingVectorizer(analyzer="char_wb", ngram_range=cfg.char_ngrams, **common)
    return word, char


def _vectorizer_params(vectorizer: Any) -> dict[str, Any]:
    """The JSON-safe parameters that decide a vectorizer's columns (compared on load)."""
    keep = ("analyzer", "ngram_range", "n_features", "lowercase", "token_pattern", "strip_accents",
            "alternate_sign", "norm", "binary", "stop_words", "preprocessor", "tokenizer")  # fmt: skip
    params = vectorizer.get_params()
    out: dict[str, Any] = {}
    for key in keep:
        value = params.get(key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


class LinearStage:
    """A fitted linear stage. Build one with :meth:`fit` or :meth:`load`.

    ``features`` (sorted global column indices of the known features), ``idf`` (per known
    feature), ``coef`` (classes x known features) and ``intercept`` (per class; ``-inf`` for a
    class no training text had, which then gets probability 0) are all it holds."""

    def __init__(
        self,
        classes: Sequence[str],
        config: LinearConfig,
        features: np.ndarray,
        idf: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        training: dict[str, Any] | None = None,
    ) -> None:
        self.classes = tuple(classes)
        self.config = config
        self.training: dict[str, Any] = dict(training or {})
        self.features = np.ascontiguousarray(features, dtype=np.int64)
        self.idf = np.ascontiguousarray(idf, dtype=np.float32)
        self.coef = np.ascontiguousarray(coef, dtype=np.float32)
        self.intercept = np.ascontiguousarray(intercept, dtype=np.float32)
        _check_arrays(self.classes, config, self.features, self.idf, self.coef, self.intercept)
        self._word, self._char = _vectorizers(config)
        total = 2 * config.n_features
        self._column = np.full(total, -1, dtype=np.int32)  # global column -> known-feature position
        self._column[self.features] = np.arange(len(self.features), dtype=np.int32)
        self._n_word = int(np.searchsorted(self.features, config.n_features))  # word features first
        self._coef_t = self.coef.T.astype(np.float64)  # (known features, classes) for sparse @ dense
        self._word_analyzer = self._word.build_analyzer()

    # -- training -----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[str],
        classes: Sequence[str],
        config: LinearConfig | None = None,
        seed: int = 13,
    ) -> LinearStage:
        """Train on ``texts`` with their class names ``labels`` (each one of ``classes``)."""
        from sklearn import __version__ as sklearn_version
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        cfg = config or LinearConfig()
        classes = tuple(classes)
        index = {c: i for i, c in enumerate(classes)}
        if len(index) != len(classes):
            raise ValueError("classes must be distinct")
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"{len(texts)} texts and {len(labels)} labels: need as many, at least one")
        unknown = sorted({y for y in labels if y not in index})
        if unknown:
            raise ValueError(f"labels not among the classes: {unknown[:5]}")
        y = np.array([index[label] for label in labels], dtype=np.int64)
        present = np.unique(y)
        if len(present) < 2:
            raise ValueError("training needs at least two classes present")
        word, char = _vectorizers(cfg)
        raw = sparse.hstack([word.transform(texts), char.transform(texts)], format="csr")
        df = np.bincount(raw.indices, minlength=2 * cfg.n_features)
        features = np.flatnonzero(df >= cfg.min_df).astype(np.int64)
        n = raw.shape[0]
        idf = (np.log((1.0 + n) / (1.0 + df[features])) + 1.0).astype(np.float32)
        # a stage without coefficients yet weights the training texts exactly as it will at serving
        blank = cls(classes, cfg, features, idf, np.zeros((len(classes), len(features)), np.float32),
                    np.zeros(len(classes), np.float32))  # fmt: skip
        x, _ = blank._weighted(raw)
        clf = LogisticRegression(
            C=cfg.C,
            class_weight="balanced" if cfg.balanced else None,
            max_iter=cfg.max_iter,
            random_state=seed,
        )
        # one BLAS thread: scipy's L-BFGS-B runs many small BLAS calls on vectors this long, and a
        # multithreaded OpenBLAS makes each several times slower (scipy#26137; measured here:
        # 2.8 s -> 0.7 s for 400 reviews); the sparse products that dominate are single-threaded
        with threadpool_limits(limits=1, user_api="blas"):
            clf.fit(x, y)
        coef = np.zeros((len(classes), len(features)), dtype=np.float64)
        intercept = np.full(len(classes), -np.inf, dtype=np.float64)
        fitted = np.asarray(clf.classes_)
        if len(fitted) == 2:  # one logit z for the second class: softmax([-z/2, z/2]) == sigmoid(z)
            coef[fitted[0]], coef[fitted[1]] = -clf.coef_[0] / 2, clf.coef_[0] / 2
            intercept[fitted[0]], intercept[fitted[1]] = -clf.intercept_[0] / 2, clf.intercept_[0] / 2
        else:
            coef[fitted] = clf.coef_
            intercept[fitted] = clf.intercept_
        training = {
            "rows": n,
            "seed": seed,
            "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "known_features": len(features),
            "iterations": int(np.max(clf.n_iter_)),
            "sklearn": sklearn_version,
        }
        return cls(classes, cfg, features, idf, coef, intercept, training)

    # -- incremental update (the trainer's fast path) ---------------------------------------

    def updated(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        prior_strength: float = 1.0,
        max_iter: int = 200,
    ) -> LinearStage:
        """A new stage: this one updated with ``texts`` and their class names ``labels``, without
        the texts it was trained on. What it approximates is :meth:`fit` on both sets at once.

        * **Features and IDF: exact.** The parent's document frequencies follow from its IDF and
          row count (``df = (1 + n) / exp(idf - 1) - 1``); the new texts' are added, so every
          feature they contain becomes known (coverage rises on the new data) and the IDF is the
          one a refit would compute. (With ``min_df > 1``, the parent's unknown features'
          counts are not stored: a new feature needs ``min_df`` new texts.)
        * **Coefficients: a MAP update.** The parent's fit is summarised as a diagonal Gaussian
          around its coefficients (a Laplace approximation, as elastic weight consolidation
          does): the precision of class ``c``'s weight on feature ``j`` is ``1 + C * q_c * s_j``,
          where ``1`` is the L2 penalty every fit has, ``s_j`` estimates ``sum x_ij^2`` over the
          parent's training rows (from the feature's document frequency and IDF: a row's block
          has unit norm) and ``q_c`` is the mean of ``p(1 - p)`` of the class under the parent
          on the new texts. The new texts' weighted log loss (``C`` and class balancing as in
          :meth:`fit`, over the combined class counts) plus that prior is minimised with
          scipy's L-BFGS-B over the coefficients of the features the new texts contain and the
          intercepts; every other coefficient keeps its value, which is that objective's
          optimum for them. ``prior_strength`` scales the parent's part of the precision.
        * **Classes the labels do not name** (when they name at least two) are left out of the
          loss (a softmax over the named classes): their coefficients stay the parent's. Labels
          from a source that never says "neutral" are no evidence against neutral, and a full
          softmax would learn that it never occurs.

        Why not ``SGDClassifier.partial_fit``: it trains one-vs-rest binary models, which are
        not this multinomial model, from a learning rate rather than from how much evidence
        the parent holds; river's ``SoftmaxRegression`` keeps weights in per-feature dicts
        (hundreds of thousands of features per class here). The bound to a refit is tested
        (``tests/unit/test_linear_update.py``)."""
        from scipy.optimize import minimize
        from threadpoolctl import threadpool_limits

        cfg = self.config
        index = {c: i for i, c in enumerate(self.classes)}
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"{len(texts)} texts and {len(labels)} labels: need as many, at least one")
        unknown = sorted({y for y in labels if y not in index})
        if unknown:
            raise ValueError(f"labels not among the classes: {unknown[:5]}")
        if not (math.isfinite(prior_strength) and prior_strength >= 0):
            raise ValueError(f"prior_strength must be finite and >= 0, not {prior_strength}")
        n0 = int(self.training.get("rows", 0))
        if n0 < 1:
            raise ValueError("this stage records no training rows: its document frequencies are unknown")
        y = np.array([index[label] for label in labels], dtype=np.int64)
        k, m, total = len(self.classes), len(y), 2 * cfg.n_features
        raw = self._raw(texts)
        idf0 = self.idf.astype(np.float64)
        df0 = np.maximum(np.rint((1.0 + n0) / np.exp(idf0 - 1.0) - 1.0), 1.0)
        df = np.zeros(total)
        df[self.features] = df0
        df += np.bincount(raw.indices, minlength=total)
        known = np.zeros(total, dtype=bool)
        known[self.features] = True
        known |= df >= cfg.min_df
        features = np.flatnonzero(known).astype(np.int64)
        n = n0 + m
        idf = (np.log((1.0 + n) / (1.0 + df[features])) + 1.0).astype(np.float32)
        at = np.searchsorted(features, self.features)  # the parent's features among the new ones
        coef = np.zeros((k, len(features)))
        coef[:, at] = self.coef
        intercept = self.intercept.astype(np.float64)

        # the parent's evidence per feature: s_j ~ sum over its rows of x_ij^2 (see above)
        evidence = np.zeros(len(features))
        block = self.features >= cfg.n_features
        sq = df0 * idf0 * idf0
        for b in (False, True):
            mass = sq[block == b].sum()
            if mass > 0:
                evidence[at[block == b]] = n0 * sq[block == b] / mass
        parent_p = self.score(texts)[0]
        curvature = (parent_p * (1.0 - parent_p)).mean(axis=0)  # q_c

        counts = np.bincount(y, minlength=k).astype(np.float64)
        before = self.training.get("class_counts") or {}
        combined = counts + np.array([float(before.get(c, 0)) for c in self.classes])
        # The classes the update learns: those its labels name, when at least two do. A batch
        # without some class says nothing about it (a source that never labels "neutral" is not
        # evidence against it), so its logit stays out of the loss and its weights as they are;
        # a batch of one class has to be learnt against all of them.
        present = np.flatnonzero(counts > 0)
        active = present if len(present) >= 2 else np.flatnonzero(np.isfinite(intercept) | (counts > 0))
        newly = ~np.isfinite(intercept[active])  # classes the parent never saw
        start_b = intercept[active].copy()
        if newly.any():
            start_b[newly] = np.min(intercept[np.isfinite(intercept)])
        if cfg.balanced:
            seen = active[combined[active] > 0]
            class_w = np.zeros(k)
            class_w[seen] = combined[seen].sum() / (len(seen) * combined[seen])
            w = class_w[y]
        else:
            w = np.ones(m)

        blank = LinearStage(self.classes, cfg, features, idf, np.zeros((k, len(features)), np.float32),
                            np.zeros(k, np.float32))  # fmt: skip
        x, _ = blank._weighted(raw)
        touched = np.unique(x.indices)
        xt = x[:, touched].tocsr()
        xtt = xt.T.tocsr()
        ka, nt = len(active), len(touched)
        w0 = coef[np.ix_(active, touched)]
        lam = 1.0 + prior_strength * cfg.C * curvature[active, None] * evidence[None, touched]
        mu = np.where(newly, 0.0, prior_strength * cfg.C * curvature[active] * n0)
        y_active = np.searchsorted(active, y)
        onehot = np.zeros((m, ka))
        onehot[np.arange(m), y_active] = 1.0

        # Optimised in the prior's own scale (u = sqrt(precision) * (w - w_parent)): the
        # precisions span orders of magnitude, and L-BFGS on the raw weights barely moves.
        scale_w, scale_b = np.sqrt(lam), np.sqrt(np.maximum(mu, 1.0))

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            u, v = theta[: ka * nt].reshape(ka, nt), theta[ka * nt :]
            wt, bt = w0 + u / scale_w, start_b + v / scale_b
            z = np.asarray(xt @ wt.T) + bt
            z -= z.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=1))
            loss = cfg.C * float(np.sum(w * (lse - z[np.arange(m), y_active])))
            r = (np.exp(z - lse[:, None]) - onehot) * w[:, None]
            prior_b = mu / scale_b**2
            loss += 0.5 * float(np.sum(u * u)) + 0.5 * float(np.sum(prior_b * v * v))
            grad_u = cfg.C * np.asarray(xtt @ r).T / scale_w + u
            grad_v = cfg.C * r.sum(axis=0) / scale_b + prior_b * v
            return loss, np.concatenate([grad_u.ravel(), grad_v])

        try:
            with threadpool_limits(limits=1, user_api="blas"):  # as in fit: many small BLAS calls
                res = minimize(objective, np.zeros(ka * nt + ka), jac=True, method="L-BFGS-B",
                               options={"maxiter": max_iter})  # fmt: skip
        except (ValueError, ArithmeticError, MemoryError) as e:
            raise StreamtuneError(f"linear stage update on {m} texts failed: {e}") from e
        coef[np.ix_(active, touched)] = w0 + res.x[: ka * nt].reshape(ka, nt) / scale_w
        intercept[active] = start_b + res.x[ka * nt :] / scale_b
        training = {
            **self.training,
            "rows": n,
            "class_counts": {c: int(combined[i]) for i, c in enumerate(self.classes)},
            "known_features": len(features),
            "iterations": int(res.nit),
            "update": {
                "method": "MAP with a diagonal Laplace prior from the parent (LinearStage.updated)",
                "parent_rows": n0,
                "rows": m,
                "features_touched": nt,
                "features_added": len(features) - len(self.features),
                "prior_strength": prior_strength,
                "converged": bool(res.success),
            },
        }
        return LinearStage(self.classes, cfg, features, idf, coef, intercept, training)

    # -- scoring ------------------------------------------------------------------------------

    def _raw(self, texts: Sequence[str]) -> sparse.csr_matrix:
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not one string")
        raw: sparse.csr_matrix = sparse.hstack(
            [self._word.transform(texts), self._char.transform(texts)], format="csr"
        )
        return raw

    def _weighted(self, raw: sparse.csr_matrix) -> tuple[sparse.csr_matrix, np.ndarray]:
        """(TF-IDF rows over the known features, L2-normalised per block; coverage per row)."""
        n = raw.shape[0]
        nnz = np.diff(raw.indptr)
        rows = np.repeat(np.arange(n), nnz)
        pos = self._column[raw.indices]
        known = pos >= 0
        known_per_row = np.bincount(rows[known], minlength=n)
        coverage = np.divide(known_per_row, nnz, out=np.zeros(n), where=nnz > 0)
        rows, pos = rows[known], pos[known]
        values = (1.0 + np.log(raw.data[known])) * self.idf[pos]
        block = (pos >= self._n_word).astype(np.int64)
        norms = np.sqrt(np.bincount(2 * rows + block, weights=values * values, minlength=2 * n))
        values = values / norms[2 * rows + block]
        x = sparse.csr_matrix((values, (rows, pos)), shape=(n, len(self.features)))
        return x, coverage

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, one column per class in ``classes`` order; coverage), one pass."""
        probs, coverage, _ = self.analyse(texts)
        return probs, coverage

    def analyse(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
        """:meth:`score` plus the weighted features, which :meth:`reasons_of` reads: the
        scorer explains a batch without hashing its texts twice."""
        x, coverage = self._weighted(self._raw(texts))
        return self._probs(x), coverage, x

    def _probs(self, x: sparse.csr_matrix) -> np.ndarray:
        logits = np.asarray(x @ self._coef_t) + self.intercept.astype(np.float64)
        return _softmax(logits)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.score(texts)[0]

    def coverage(self, texts: Sequence[str]) -> np.ndarray:
        """Per text, the share of its distinct hashed n-gram features (word and char) that are
        known from training (0 for a text without any feature)."""
        return self._weighted(self._raw(texts))[1]

    def reasons(self, text: str, k: int = 5, label: str | None = None) -> list[tuple[str, float]]:
        """The at most ``k`` word n-grams of ``text`` that pushed hardest towards ``label`` (the
        predicted one by default): coefficient x feature value, largest first, positive only.

        Terms are recovered by analysing the text with the word analyzer and hashing each term
        exactly as the vectorizer does; of two terms that share a hashed column, the first in
        the text names it (its weight counts once)."""
        probs, _, x = self.analyse([text])
        c = int(probs[0].argmax()) if label is None else self.classes.index(label)
        return self.reasons_of(text, x, c, k)

    def reasons_of(self, text: str, x: sparse.csr_matrix, c: int, k: int = 5) -> list[tuple[str, float]]:
        """:meth:`reasons` towards class index ``c``, from ``x``: the row of ``text`` in the
        weighted features :meth:`analyse` returned (a one-row matrix)."""
        from sklearn.feature_extraction import FeatureHasher

        terms = list(dict.fromkeys(self._word_analyzer(text)))  # distinct, in order of appearance
        if not terms or k <= 0:
            return []
        hasher = FeatureHasher(n_features=self.config.n_features, input_type="string", alternate_sign=False)
        columns = hasher.transform([[t] for t in terms]).indices  # one column per term (word block)
        value = dict(zip(x.indices.tolist(), x.data.tolist(), strict=True))
        out: list[tuple[str, float]] = []
        taken: set[int] = set()
        for term, column in zip(terms, columns.tolist(), strict=True):
            p = int(self._column[column])
            if p < 0 or p in taken or p not in value:
                continue
            taken.add(p)
            weight = float(self.coef[c, p]) * value[p]
            if weight > 0:
                out.append((term, weight))
        out.sort(key=lambda tw: -tw[1])
        return out[:k]

    # -- files --------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write :data:`LINEAR_WEIGHTS` and :data:`LINEAR_META` into ``directory``."""
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {
            "features": self.features,
            "idf": self.idf,
            "coef": self.coef,
            "intercept": self.intercept,
        }
        save_file(tensors, str(directory / LINEAR_WEIGHTS))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "config": self.config.to_json(),
            "vectorizers": {"word": _vectorizer_params(self._word), "char": _vectorizer_params(self._char)},
            "tensors": {name: list(t.shape) for name, t in tensors.items()},
            "training": self.training,
        }
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
        (directory / LINEAR_META).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> LinearStage:
        """Read a stage :meth:`save` wrote; :class:`AdapterError` says what is wrong with it."""
        from safetensors import SafetensorError
        from safetensors.numpy import load as load_tensors

        where = f"linear stage in {directory}"
        try:
            meta = json.loads((directory / LINEAR_META).read_text(encoding="utf-8"))
            blob = (directory / LINEAR_WEIGHTS).read_bytes()
        except (OSError, ValueError) as e:
            raise AdapterError(f"{where}: cannot read: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise AdapterError(f"{where}: {LINEAR_META} is not a {FORMAT} file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise AdapterError(
                f"{where}: format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
            )
        try:
            config = LinearConfig.from_json(meta["config"])
            classes = [str(c) for c in meta["classes"]]
            tensors = load_tensors(blob)
        except (KeyError, TypeError, ValueError, SafetensorError) as e:
            raise AdapterError(f"{where}: invalid: {e}") from e
        word, char = _vectorizers(config)
        expected = {"word": _vectorizer_params(word), "char": _vectorizer_params(char)}
        if meta.get("vectorizers") != expected:
            raise AdapterError(f"{where}: its vectorizers differ from those this code builds from its config")
        if set(tensors) != set(_TENSORS):
            raise AdapterError(f"{where}: tensors {sorted(tensors)}, expected {sorted(_TENSORS)}")
        for name, dtype in _TENSORS.items():
            if tensors[name].dtype != dtype:
                raise AdapterError(f"{where}: tensor {name} is {tensors[name].dtype}, expected {dtype}")
        try:
            return cls(classes, config, **{n: np.array(t) for n, t in tensors.items()},
                       training=dict(meta.get("training") or {}))  # fmt: skip
        except ValueError as e:
            raise AdapterError(f"{where}: {e}") from e


def _check_arrays(
    classes: tuple[str, ...],
    config: LinearConfig,
    features: np.ndarray,
    idf: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
) -> None:
    k, v = len(classes), len(features)
    if k < 2 or len(set(classes)) != k:
        raise ValueError(f"need at least two distinct classes, got {k}")
    if features.ndim != 1 or idf.shape != (v,) or coef.shape != (k, v) or intercept.shape != (k,):
        raise ValueError(
            f"shapes do not fit {k} classes: features {features.shape}, idf {idf.shape}, "
            f"coef {coef.shape}, intercept {intercept.shape}"
        )
    if v and (features[0] < 0 or features[-1] >= 2 * config.n_features or np.any(np.diff(features) <= 0)):
        raise ValueError("features must be distinct, sorted column indices within the hashed space")
    if not (np.all(np.isfinite(idf)) and np.all(idf > 0) and np.all(np.isfinite(coef))):
        raise ValueError("idf must be finite and positive, coef finite")
    if np.any(np.isnan(intercept)) or np.any(intercept == np.inf) or not np.any(np.isfinite(intercept)):
        raise ValueError("intercept must be finite (or -inf for a class never trained on)")
