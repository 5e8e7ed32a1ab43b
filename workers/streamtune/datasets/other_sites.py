"""Reviews from other sites: a drift version 1 never saw (issue 13, item 4).

The UCI *Sentiment Labelled Sentences* (Kotzias, Denil, de Freitas and Smyth, "From group to
individual labels using deep features", KDD 2015): 1,000 review sentences each from Amazon
(cell phones and accessories), IMDB (movies) and Yelp (restaurants), half negative and half
positive. They ship in the npm package ``sentiment`` 5.0.2 (``test/fixtures/{amazon,imdb,yelp}.json``,
``{"text", "class": 0 | 1}``), MIT-licensed (its ``package.json`` and ``LICENSE.md``); the package
states no separate licence for the sentences, which UCI publishes for research use with the
citation above. The tarball comes from the npm registry, pinned by its sha256, and is cached in
``~/.cache/streamtune/data`` (``scripts/bootstrap.sh`` fetches it; :func:`fetch` does on first
use).

Labels map to the review task's classes as 0 -> ``negative``, 1 -> ``positive`` (no neutral:
accuracy is the metric that means the same here). :func:`split` cuts the rows, by a hash of
their site and text, into a stream side (labels arrive late, updates train on them) and a held-out side
(never trained on), each with all three sites.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from streamtune.core.errors import StreamtuneError
from streamtune.core.settings import cache_root

PACKAGE = "sentiment@5.0.2"
URL = "https://registry.npmjs.org/sentiment/-/sentiment-5.0.2.tgz"
SHA256 = "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"
SITES = ("amazon", "imdb", "yelp")
LABELS = {0: "negative", 1: "positive"}
HELD_OUT_PERCENT = 25  # of the rows, by the hash of their text: about 750 of 2,983


@dataclass(frozen=True, slots=True)
class SiteReview:
    site: str
    text: str
    label: str  # "negative" | "positive"


def cache_dir() -> Path:
    """``<cache root>/data`` (:func:`~streamtune.core.settings.cache_root`)."""
    return cache_root() / "data"


def fetch(directory: Path | None = None, timeout_s: float = 60.0) -> Path:
    """The package tarball, downloaded once and checked against :data:`SHA256`."""
    d = directory or cache_dir()
    path = d / "sentiment-5.0.2.tgz"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == SHA256:
        return path
    try:
        with urllib.request.urlopen(URL, timeout=timeout_s) as response:
            blob = response.read()
    except OSError as e:
        raise StreamtuneError(f"cannot download {PACKAGE} from the npm registry ({URL}): {e}") from e
    if hashlib.sha256(blob).hexdigest() != SHA256:
        raise StreamtuneError(f"{URL}: sha256 differs from the pinned {SHA256[:12]}…")
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return path


def load(directory: Path | None = None) -> list[SiteReview]:
    """Every labelled sentence of the three sites, stripped, without exact duplicates (a text
    seen twice on a site is kept once)."""
    blob = fetch(directory).read_bytes()
    out: list[SiteReview] = []
    seen: set[tuple[str, str]] = set()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for site in SITES:
            member = tar.extractfile(f"package/test/fixtures/{site}.json")
            if member is None:
                raise StreamtuneError(f"{PACKAGE}: no {site}.json in the package")
            for row in json.load(member):
                text, cls = str(row.get("text") or "").strip(), row.get("class")
                if not text or cls not in LABELS or (site, text) in seen:
                    continue
                seen.add((site, text))
                out.append(SiteReview(site, text, LABELS[cls]))
    return out


def is_held_out(review: SiteReview) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{review.site}:{review.text}".encode()).digest()[:4], "big")
    return h % 100 < HELD_OUT_PERCENT


def split(rows: list[SiteReview]) -> tuple[list[SiteReview], list[SiteReview]]:
    """(stream side, held-out side), interleaved by site so any prefix of the stream has all three."""
    stream = [r for r in rows if not is_held_out(r)]
    held = [r for r in rows if is_held_out(r)]
    return _interleave(stream), _interleave(held)


def _interleave(rows: list[SiteReview]) -> list[SiteReview]:
    by_site = [[r for r in rows if r.site == s] for s in SITES]
    out: list[SiteReview] = []
    for i in range(max((len(b) for b in by_site), default=0)):
        out.extend(b[i] for b in by_site if i < len(b))
    return out
