"""The purchase-intent model: a small MLP on session features, LoRA-adaptable through peft."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from streamtune.core.features import FEATURE_DIM

CLICK_LORA_TARGETS = ["fc1", "fc2", "out"]
CLICK_BASE_WEIGHTS = "base_model.safetensors"
CLICK_BASE_NAME = "streamtune/click-mlp"


class ClickNet(nn.Module):
    """Standardise, two hidden layers, one logit. The scaler is a buffer so it ships with the
    weights; its length is the number of feature columns the model reads (``dim``)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int = FEATURE_DIM, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.out = nn.Linear(hidden // 2, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the first ``dim`` columns: columns appended to the features later are not this model's
        x = (x[..., : self.mean.shape[0]] - self.mean) / self.std
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        logits: torch.Tensor = self.out(x).squeeze(-1)
        return logits


def load_click_net(path: Path) -> ClickNet:
    """The base MLP of the click version in ``path``, sized by its weights: how many feature
    columns it reads (versions trained before columns were appended read fewer) and its width."""
    from safetensors.torch import load_file

    state = load_file(str(path / CLICK_BASE_WEIGHTS))
    net = ClickNet(dim=int(state["mean"].shape[0]), hidden=int(state["fc1.weight"].shape[0]))
    net.load_state_dict(state)
    return net
