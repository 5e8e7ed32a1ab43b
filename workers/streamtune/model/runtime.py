"""Model runtime: one shared base encoder, one active adapter per task, swapped between batches.

The runtime is not thread-safe on purpose: the scorer calls it from a single model thread, so
``activate`` (the swap) can never interleave with a batch, and a batch never mixes versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from streamtune.errors import AdapterError, StartupError
from streamtune.model.click import CLICK_BASE_WEIGHTS, ClickNet
from streamtune.model.encoder import Head, base_model_sha256, load_base, mean_pool, tokenize
from streamtune.registry import LocalRegistry, Manifest

log = structlog.get_logger(__name__)

TEXT_TASKS = ("review_sentiment", "query_class")


@dataclass(frozen=True, slots=True)
class Scored:
    """Class probabilities of one batch and the adapter version that produced them."""

    task: str
    version: int
    labels: list[str]
    probs: np.ndarray  # [batch, classes]; purchase_intent: [batch, 1] probability of buying


@dataclass
class LoadedAdapter:
    manifest: Manifest
    head: nn.Module | None = None  # text tasks
    click: nn.Module | None = None  # purchase_intent
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"{self.manifest.task}@v{self.manifest.version}"


class ModelRuntime:
    def __init__(self, base_path: str, registry: LocalRegistry, max_len: int = 128, threads: int = 0) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.registry = registry
        self.max_len = max_len
        self.base_sha256 = base_model_sha256(base_path)
        self.tokenizer: PreTrainedTokenizerBase
        self.tokenizer, self._base = load_base(base_path)
        self._peft: PeftModel | None = None
        self.active: dict[str, LoadedAdapter] = {}

    # -- loading and swapping -------------------------------------------------------------

    def load(self, task: str, version: int) -> LoadedAdapter:
        """Verify and load a version next to the active one (off the scoring path), smoke-tested."""
        manifest = self.registry.verify(task, version, base_sha256=self.base_sha256)
        path = self.registry.fetch(task, version)
        try:
            if manifest.kind == "text-lora":
                loaded = self._load_text(manifest, path)
            else:
                loaded = self._load_click(manifest, path)
        except AdapterError:
            raise
        except Exception as e:  # safetensors/peft raise many types for corrupt files
            raise AdapterError(f"{task} v{version}: cannot load: {e}") from e
        self._smoke(loaded)
        return loaded

    def _load_text(self, manifest: Manifest, path: Path) -> LoadedAdapter:
        loaded = LoadedAdapter(manifest=manifest)
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=loaded.name)
        elif loaded.name not in self._peft.peft_config:
            self._peft.load_adapter(str(path), adapter_name=loaded.name)
        self._peft.eval()
        weights = load_file(str(path / "head.safetensors"))
        head = Head(weights["linear.weight"].shape[1], len(manifest.labels))
        head.load_state_dict(weights)
        head.eval()
        loaded.head = head
        return loaded

    def _load_click(self, manifest: Manifest, path: Path) -> LoadedAdapter:
        net = ClickNet()
        net.load_state_dict(load_file(str(path / CLICK_BASE_WEIGHTS)))
        model = PeftModel.from_pretrained(net, str(path))
        model.eval()
        return LoadedAdapter(manifest=manifest, click=model)

    def _smoke(self, loaded: LoadedAdapter) -> None:
        task = loaded.manifest.task
        probe: list[str] | list[list[float]]
        if loaded.click is not None:
            from streamtune.features import FEATURE_DIM

            probe = [[0.0] * FEATURE_DIM]
        else:
            probe = ["smoke test"]
        probs = self._forward(loaded, probe).probs
        if not np.all(np.isfinite(probs)):
            raise AdapterError(
                f"{task} v{loaded.manifest.version}: smoke forward pass gave non-finite output"
            )

    def activate(self, loaded: LoadedAdapter) -> None:
        """Make ``loaded`` the version that scores its task from the next batch on."""
        self.active[loaded.manifest.task] = loaded
        log.info("adapter_active", task=loaded.manifest.task, version=loaded.manifest.version)

    def load_latest(self, tasks: tuple[str, ...]) -> None:
        for task in tasks:
            version = self.registry.latest(task)
            if version is None:
                raise StartupError(
                    f"no adapter for task {task} in STREAMTUNE_ADAPTER_DIR={self.registry.root}; "
                    f"run `streamtune train --task {task}`"
                )
            try:
                self.activate(self.load(task, version))
            except AdapterError as e:
                raise StartupError(f"{e} (STREAMTUNE_ADAPTER_DIR={self.registry.root})") from e

    # -- scoring --------------------------------------------------------------------------

    def score(self, task: str, inputs: list[str] | list[list[float]]) -> Scored:
        """Score one batch with the task's active version (model runs once per batch)."""
        loaded = self.active.get(task)
        if loaded is None:
            raise AdapterError(f"no active adapter for {task}")
        return self._forward(loaded, inputs)

    @torch.inference_mode()
    def _forward(self, loaded: LoadedAdapter, inputs: list[str] | list[list[float]]) -> Scored:
        m = loaded.manifest
        if loaded.click is not None:
            x = torch.tensor(inputs, dtype=torch.float32)
            p = torch.sigmoid(loaded.click(x)).unsqueeze(-1)
            return Scored(m.task, m.version, m.labels, p.numpy())
        assert self._peft is not None and loaded.head is not None
        self._peft.set_adapter(loaded.name)
        batch = tokenize(self.tokenizer, inputs, self.max_len)  # type: ignore[arg-type]
        hidden = self._peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pooled = mean_pool(hidden.last_hidden_state, batch["attention_mask"])
        probs = torch.softmax(loaded.head(pooled), dim=-1)
        return Scored(m.task, m.version, m.labels, probs.numpy())
