"""Torch-free pieces of the text path: base model identity, tokenization, length-sorted chunks.

A scorer whose tasks all run in ONNX Runtime imports neither torch nor transformers (each costs
hundreds of MiB of resident memory); it tokenizes with the ``tokenizers`` library, reading the
same ``tokenizer.json`` the transformers fast tokenizer wraps, so ids and masks are identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from streamtune.core.errors import StartupError

BASE_WEIGHTS = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


@lru_cache(maxsize=8)
def base_model_sha256(base_path: str) -> str:
    """Identity of a base model: sha256 of its weights file (what adapters were trained against)."""
    path = Path(base_path) / BASE_WEIGHTS
    if not path.is_file():
        raise StartupError(f"no {BASE_WEIGHTS} in STREAMTUNE_BASE_MODEL={base_path}")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def length_chunks(lengths: Sequence[int], chunk: int) -> list[list[int]]:
    """Row indices in chunks of at most ``chunk`` rows of similar length (sorted, ties by position).

    Padding a chunk to its own longest row wastes little when its rows are alike; on the review
    mix this is what makes larger batches pay (see issue "Performance and cost").
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + chunk] for i in range(0, len(order), max(1, chunk))]


class TextBatcher:
    """Tokenize once, then hand out length-sorted chunks as padded int64 arrays."""

    def __init__(self, base_path: str, max_len: int) -> None:
        from tokenizers import Tokenizer

        path = Path(base_path) / TOKENIZER_FILE
        if not path.is_file():
            raise StartupError(f"no {TOKENIZER_FILE} in STREAMTUNE_BASE_MODEL={base_path}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type for bad files
            raise StartupError(f"cannot load {path}: {e}") from e
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_len)
        self.max_len = max_len

    def chunks(self, texts: Sequence[str], chunk: int) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """``(rows, input_ids, attention_mask)`` per chunk; each chunk padded to its longest row."""
        encoded = self._tok.encode_batch(list(texts))
        for rows in length_chunks([len(e.ids) for e in encoded], chunk):
            width = max(len(encoded[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)  # [PAD] is id 0 in BERT vocabularies
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(encoded[i].ids)
                ids[r, :n] = encoded[i].ids
                mask[r, :n] = 1
            yield rows, ids, mask
