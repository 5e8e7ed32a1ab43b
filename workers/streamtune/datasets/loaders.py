"""Loaders for the shipped sample data sets and their fixed train / held-out splits.

Splits are decided by a hash of each row's id, so they never depend on row order or sampling:
a row in the held-out split is never trained on, by any command, with any seed.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.core.errors import StreamtuneError
from streamtune.core.tasks import CLICK, QUERY, REVIEW, TASKS, sentiment_of_rating

REVIEWS = REVIEW.data_file
QUERIES = QUERY.data_file
SESSIONS = CLICK.data_file

SENTIMENTS = list(REVIEW.labels or ())


def is_held_out(row_id: str, percent: int) -> bool:
    digest = hashlib.sha256(row_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


@dataclass(frozen=True, slots=True)
class Review:
    review_id: str
    product_id: str
    title: str
    text: str
    rating: int
    department: str

    @property
    def label(self) -> str:
        return sentiment_of_rating(self.rating)

    def model_text(self) -> str:
        return f"{self.title}. {self.text}" if self.title else self.text


@dataclass(frozen=True, slots=True)
class Query:
    query_id: str
    query: str
    label: str


def _open(path: Path) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise StreamtuneError(f"sample data missing: {path} (STREAMTUNE_DATA_DIR)")
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")


def load_reviews(data_dir: Path) -> list[Review]:
    """Reviews with a non-empty text (title optional)."""
    out = []
    for r in _open(data_dir / REVIEWS):
        text = (r["review_text"] or "").strip()
        if not text:
            continue
        out.append(
            Review(
                review_id=r["review_id"],
                product_id=r["clothing_id"],
                title=(r["title"] or "").strip(),
                text=text,
                rating=int(r["rating"]),
                department=r["department"],
            )
        )
    return out


def load_queries(data_dir: Path) -> list[Query]:
    return [
        Query(r["query_id"], r["query"].strip(), r["query_class"].strip()) for r in _open(data_dir / QUERIES)
    ]


def load_sessions(data_dir: Path) -> list[dict[str, str]]:
    return list(_open(data_dir / SESSIONS))


HELD_OUT_PERCENT = {name: spec.held_out_percent for name, spec in TASKS.items()}

__all__ = ["sentiment_of_rating"]  # re-exported for the loaders' callers


def _review_rows(data_dir: Path) -> list[tuple[str, Any, str]]:
    return [(r.review_id, r.model_text(), r.label) for r in load_reviews(data_dir)]


def _query_rows(data_dir: Path) -> list[tuple[str, Any, str]]:
    return [(q.query_id, q.query, q.label) for q in load_queries(data_dir) if q.label]


def _session_rows(data_dir: Path) -> list[tuple[str, Any, str]]:
    from streamtune.core.features import vectorize

    labels = CLICK.labels or ()
    return [
        (r["session_id"], vectorize(r), labels[int(r["Revenue"] == "1")]) for r in load_sessions(data_dir)
    ]


# Every task's labelled rows as (row id, model input, class name), by task.
LABELLED_ROWS: dict[str, Callable[[Path], list[tuple[str, Any, str]]]] = {
    REVIEW.name: _review_rows,
    QUERY.name: _query_rows,
    CLICK.name: _session_rows,
}


def held_out_rows(task: str, data_dir: Path) -> list[tuple[Any, str]]:
    """(model input, class name) of every row in the task's held-out split."""
    pct = HELD_OUT_PERCENT[task]
    return [(x, y) for row_id, x, y in LABELLED_ROWS[task](data_dir) if is_held_out(row_id, pct)]


def is_validation(row_id: str, percent: int) -> bool:
    """Whether a training-split row is in the validation split carved from training (models and
    cascade rules are selected on it). The hash is salted, so it does not follow the held-out
    hash; callers drop held-out rows first (:func:`splits` does)."""
    digest = hashlib.sha256(b"validation:" + row_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


@dataclass(frozen=True, slots=True)
class Splits:
    """A task's labelled rows (row id, model input, class name) in three disjoint splits."""

    train: list[tuple[str, Any, str]]
    validation: list[tuple[str, Any, str]]  # carved from the training split by a salted row-id hash
    held_out: list[tuple[str, Any, str]]  # the fixed held-out split: never selected or trained on


def splits(task: str, data_dir: Path, validation_percent: int = 10) -> Splits:
    """Train / validation / held-out rows of ``task``; ``validation_percent`` of the training split
    (by :func:`is_validation`) goes to validation. Stable: decided by row ids alone."""
    pct = HELD_OUT_PERCENT[task]
    out: tuple[list[tuple[str, Any, str]], ...] = ([], [], [])
    for row in LABELLED_ROWS[task](data_dir):
        row_id = row[0]
        which = 2 if is_held_out(row_id, pct) else 1 if is_validation(row_id, validation_percent) else 0
        out[which].append(row)
    return Splits(*out)
