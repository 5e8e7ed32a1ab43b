"""Model runtime: one shared base encoder, one active adapter per task, swapped between batches.

The runtime is not thread-safe on purpose: the scorer calls it from a single model thread, so
``activate`` (the swap) can never interleave with a batch, and a batch never mixes versions.

torch, transformers and peft are imported only when a task runs in torch: a scorer whose tasks
all run in ONNX Runtime holds the exported graphs and a ``tokenizers`` tokenizer, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from streamtune.core.errors import AdapterError, StartupError
from streamtune.core.scored import Scored, Shadow
from streamtune.core.settings import resolve_backend
from streamtune.core.tasks import TASK_NAMES, TASKS, TEXT_TASKS
from streamtune.model.cascade import Answer, CascadeRule, Routed, ScorePath, answer, first_pass, served
from streamtune.model.linear import LINEAR_FILES, LinearStage
from streamtune.model.onnx_session import ONNX_BACKENDS, run_click, run_text, session
from streamtune.model.tokens import TextBatcher, base_model_sha256
from streamtune.model.trees import TREES_META, TreeStage, blend
from streamtune.rollout.registry import AdapterStore, Manifest
from streamtune.rollout.state import in_canary

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    """What scores a task: the live version, and optionally a canary on a share of entities."""

    live: LoadedAdapter
    canary: LoadedAdapter | None = None
    fraction: float = 0.0


@dataclass(frozen=True, slots=True)
class _Part:
    """The rows of a split batch one version serves (live, or canary for its entities)."""

    adapter: LoadedAdapter
    rows: list[int]  # in the batch
    inputs: list[str]
    routed: Routed | None  # None: a version without a linear stage (every row needs the transformer)


@dataclass(frozen=True, slots=True)
class Split:
    """A batch after the linear pass (:meth:`ModelRuntime.split`): the rows the linear stage
    answers alone are served already (``early``, over ``early_rows``); the rest (``later_rows``)
    wait for :meth:`ModelRuntime.score_later`. Both lists are batch positions, ascending."""

    task: str
    early: Scored | None  # None: no row answered by the linear stage alone
    early_rows: list[int]
    later_rows: list[int]
    parts: tuple[_Part, ...]
    keys: list[str] | None


@dataclass
class LoadedAdapter:
    manifest: Manifest
    head: Any = None  # text tasks (torch backends): a torch Head
    click: Any = None  # purchase_intent in torch: the peft-wrapped ClickNet
    session: Any = None  # ONNX backends: an onnxruntime.InferenceSession
    backend: str = "torch"
    linear: LinearStage | None = None  # text versions with a cascade: the first stage
    rule: CascadeRule | None = None  # ... and which events it answers alone
    trees: TreeStage | None = None  # click versions with boosted trees, blended with the MLP
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = adapter_name(self.manifest.task, self.manifest.version)


def adapter_name(task: str, version: int) -> str:
    """A version's name as a peft adapter in the shared encoder (torch text tasks)."""
    return f"{task}@v{version}"


class ModelRuntime:
    def __init__(
        self,
        base_path: str,
        registry: AdapterStore,
        max_len: int = 128,
        threads: int = 0,
        batch_size: int = 32,
        backend: str = "torch",
        task_backends: Mapping[str, str] | None = None,
        task_batch_sizes: Mapping[str, int] | None = None,
        onnx_spinning: bool = True,
    ) -> None:
        self.registry = registry
        self.onnx_spinning = onnx_spinning
        self.max_len = max_len
        self.threads = threads
        self.batch_size = batch_size
        self.backend = backend
        self.task_backends = dict(task_backends or {})
        self.task_batch_sizes = dict(task_batch_sizes or {})
        self.base_sha256 = base_model_sha256(base_path)
        self.batcher = TextBatcher(base_path, max_len)
        in_torch = {self.backend_for(t) for t in TASK_NAMES} - set(ONNX_BACKENDS)
        text_torch = {self.backend_for(t) for t in TEXT_TASKS} - set(ONNX_BACKENDS)
        if len(text_torch) > 1:
            raise StartupError(
                "torch and torch-bf16 share one base model: pick one of them for all text tasks"
            )
        self._base: Any = None  # the torch encoder, only when a text task runs in torch
        if in_torch:
            import torch

            if threads > 0:
                torch.set_num_threads(threads)
        if text_torch:
            from streamtune.model.encoder import load_base

            _, self._base = load_base(base_path)
        if text_torch == {"torch-bf16"}:
            import torch

            # bf16 base weights (AMX/AVX-512 matmuls); LoRA weights and heads stay fp32 and peft
            # casts at the boundary. Agreement with fp32 is measured by `streamtune bench`.
            self._base.to(dtype=torch.bfloat16)
        self._peft: Any = None  # peft.PeftModel over the torch encoder
        self.routes: dict[str, Route] = {}
        self._loaded: dict[tuple[str, int], LoadedAdapter] = {}
        self._verified: dict[tuple[str, int], Manifest] = {}
        self._artifact_files: dict[tuple[str, int], Path] = {}  # ONNX model files verify() checked
        self._artifact_digests: dict[tuple[str, int], dict[str, str]] = {}  # ... and their sha256s

    def backend_for(self, task: str) -> str:
        return resolve_backend(task, self.backend, self.task_backends)

    def batch_size_for(self, task: str) -> int:
        return self.task_batch_sizes.get(task, self.batch_size)

    @property
    def active(self) -> dict[str, LoadedAdapter]:
        """The live version of each task."""
        return {task: route.live for task, route in self.routes.items()}

    # -- loading and swapping -------------------------------------------------------------

    def verify(self, task: str, version: int) -> Manifest:
        """Manifest, every checksum and the base model, without touching the model: safe on any
        thread, so a hot-swap does this off the scoring path and the model thread only loads."""
        manifest = self.registry.verify(task, version, base_sha256=self.base_sha256)
        backend = self.backend_for(task)
        if backend in ONNX_BACKENDS:
            art, model_file = self.registry.verify_artifact(task, version, backend)
            self._artifact_files[(task, version)] = model_file
            self._artifact_digests[(task, version)] = dict(art.files)
        self._verified[(task, version)] = manifest
        return manifest

    def load(self, task: str, version: int) -> LoadedAdapter:
        """Verify and load a version next to the active one, smoke-tested; cached once loaded
        (versions are immutable). Call it on the model thread: it adds modules to the model."""
        cached = self._loaded.get((task, version))
        if cached is not None:
            return cached
        manifest = self._verified.get((task, version)) or self.verify(task, version)
        path = self.registry.fetch(task, version)
        try:
            same = self._same_transformer(manifest)
            if same is not None:  # a fast version: its parent's transformer, already loaded
                loaded = LoadedAdapter(
                    manifest=manifest, head=same.head, session=same.session, backend=same.backend
                )
                loaded.name = same.name  # the same LoRA adapter in the shared encoder
                log.info("transformer_shared", task=task, version=version, with_version=same.manifest.version)
            elif self.backend_for(task) in ONNX_BACKENDS:
                loaded = self._load_onnx(manifest)
            elif manifest.kind == "text-lora":
                loaded = self._load_text(manifest, path)
            else:
                loaded = self._load_click(manifest, path)
            if manifest.cascade:
                loaded.linear = LinearStage.load(path)
                loaded.rule = CascadeRule.from_dict(manifest.cascade["rule"])
                if loaded.linear.classes != tuple(manifest.labels):
                    raise AdapterError(f"{task} v{version}: its linear stage's classes are not its labels")
            if TREES_META in manifest.files:
                loaded.trees = TreeStage.load(path, self.threads, self.onnx_spinning)
        except Exception as e:  # safetensors/peft raise many types for corrupt files
            self._drop_adapter(adapter_name(task, version))  # what the failed load added, if anything
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(f"{task} v{version}: cannot load: {e}") from e
        try:
            self._smoke(loaded)
            live = self.routes.get(task)
            if live is not None and live.live.manifest.labels != manifest.labels:
                raise AdapterError(f"{task} v{version}: its labels differ from the live version's")
        except Exception:
            self._drop_adapter(loaded.name)
            raise
        self._loaded[(task, version)] = loaded
        return loaded

    def _same_transformer(self, manifest: Manifest) -> LoadedAdapter | None:
        """A loaded version of the task whose transformer is this one's, file for file, when this
        one is a version that shares files (``manifest.shared``: a fast version, whose parent's
        transformer it is), to serve both from one model: one ONNX session or one LoRA adapter,
        not a second copy loaded for every fast update. Versions that merely hold equal files
        (copies) are loaded as their own."""
        if manifest.kind != "text-lora" or not manifest.shared:  # only versions that say they share
            return None
        task, backend = manifest.task, self.backend_for(manifest.task)

        def files(m: Manifest) -> dict[str, str]:
            return {n: d for n, d in m.files.items() if n not in LINEAR_FILES}

        mine = files(manifest)
        art = self._artifact_digests.get((task, manifest.version))
        for (t, version), other in self._loaded.items():
            if t != task or other.backend != backend or files(other.manifest) != mine:
                continue
            if backend in ONNX_BACKENDS and (art is None or self._artifact_digests.get((t, version)) != art):
                continue
            return other
        return None

    def _load_onnx(self, manifest: Manifest) -> LoadedAdapter:
        backend = self.backend_for(manifest.task)
        model_file = self._artifact_files[(manifest.task, manifest.version)]  # checked by verify()
        return LoadedAdapter(
            manifest=manifest, session=session(model_file, self.threads, self.onnx_spinning), backend=backend
        )

    def _load_text(self, manifest: Manifest, path: Path) -> LoadedAdapter:
        from peft import PeftModel
        from safetensors.torch import load_file

        from streamtune.model.encoder import Head

        loaded = LoadedAdapter(manifest=manifest, backend=self.backend_for(manifest.task))
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
        from peft import PeftModel

        from streamtune.model.click import load_click_net

        model = PeftModel.from_pretrained(load_click_net(path), str(path))
        model.eval()
        return LoadedAdapter(manifest=manifest, click=model)

    def _smoke(self, loaded: LoadedAdapter) -> None:
        task = loaded.manifest.task
        probe: list[str] | list[list[float]]
        if loaded.manifest.kind != "text-lora":
            from streamtune.core.features import FEATURE_DIM

            probe = [[0.0] * FEATURE_DIM]
        else:
            probe = ["smoke test"]
        # the transformer itself (a cascade may answer the probe without it), then what is served
        probs = self._transformer(loaded, probe).probs
        if loaded.linear is not None or loaded.trees is not None:
            probs = np.concatenate([probs, self._forward(loaded, probe).probs])
        if not np.all(np.isfinite(probs)):
            raise AdapterError(
                f"{task} v{loaded.manifest.version}: smoke forward pass gave non-finite output"
            )

    def activate(self, loaded: LoadedAdapter) -> None:
        """Make ``loaded`` the version that scores all of its task from the next batch on."""
        self.set_route(loaded.manifest.task, Route(live=loaded))

    def set_route(self, task: str, route: Route) -> None:
        """Swap what scores ``task``. Called on the model thread, so it lands between batches."""
        self.routes[task] = route
        self._release_unused(task)
        log.info(
            "adapter_route",
            task=task,
            live=route.live.manifest.version,
            canary=route.canary.manifest.version if route.canary else None,
            fraction=route.fraction,
        )

    def _release_unused(self, task: str) -> None:
        """Drop the versions of ``task`` its route no longer uses, so memory does not grow with
        releases: an ONNX session holds a whole merged model (~90 MiB for fp32), a torch text
        version is a named LoRA adapter in the shared encoder (removed with peft's
        ``delete_adapter``) and a head, a torch click version its own small peft model. A
        version served again later (a rollback) is verified and loaded again. Only ``task``'s
        versions go: no other route changed, and a version of another task may be loaded for a
        swap about to be made."""
        route = self.routes.get(task)
        in_use = {a.manifest.version for a in (route.live, route.canary) if a is not None} if route else set()
        for key in [k for k in self._loaded if k[0] == task and k[1] not in in_use]:
            del self._loaded[key]
        for key in [k for k in self._verified if k[0] == task and k[1] not in in_use]:
            self._verified.pop(key, None)
            self._artifact_files.pop(key, None)
            self._artifact_digests.pop(key, None)
        if self._peft is not None:
            prefix = adapter_name(task, 0)[:-1]  # "<task>@v"
            for name in [n for n in self._peft.peft_config if n.startswith(prefix)]:
                self._drop_adapter(name)

    def _drop_adapter(self, name: str) -> None:
        """Remove a named LoRA adapter no loaded version uses from the shared encoder. Never its
        last one: peft's layers stay injected into the base, and the next load adds to them."""
        peft = self._peft
        if peft is None or name not in peft.peft_config or len(peft.peft_config) < 2:
            return
        if any(loaded.name == name for loaded in self._loaded.values()):
            return
        peft.delete_adapter(name)
        log.info("adapter_unloaded", adapter=name)

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

    def score(
        self,
        task: str,
        inputs: list[str] | list[list[float]],
        keys: list[str] | None = None,
        shadow: bool = False,
    ) -> Scored:
        """Score one batch: once per version in play (live, and canary for its entities).

        ``keys`` are the entity keys (product or session) that route rows to the canary; with
        ``shadow`` the canary also scores the live rows, for agreement metrics only.
        """
        route = self.routes.get(task)
        if route is None:
            raise AdapterError(f"no active adapter for {task}")
        if route.canary is None or keys is None:
            return self._forward(route.live, inputs)
        to_canary = [in_canary(k, route.fraction) for k in keys]
        canary_rows = [i for i, c in enumerate(to_canary) if c]
        live_rows = [i for i, c in enumerate(to_canary) if not c]
        probs: np.ndarray | None = None
        versions = np.zeros(len(keys), dtype=np.int64)
        paths: np.ndarray | None = None
        reasons: list[list[tuple[str, float]] | None] | None = None
        confidence: np.ndarray | None = None
        shadow_stats = None
        for rows, adapter in ((live_rows, route.live), (canary_rows, route.canary)):
            if not rows:
                continue
            part = self._forward(adapter, [inputs[i] for i in rows])  # type: ignore[arg-type]
            if probs is None:
                probs = np.zeros((len(keys), part.probs.shape[1]), dtype=part.probs.dtype)
            probs[rows] = part.probs
            versions[rows] = adapter.manifest.version
            if part.paths is not None:
                paths = np.full(len(keys), ScorePath.TRANSFORMER, dtype=np.int8) if paths is None else paths
                paths[rows] = part.paths
            if part.reasons is not None:
                reasons = [None] * len(keys) if reasons is None else reasons  # None: a version without
                for i, r in zip(rows, part.reasons, strict=True):
                    reasons[i] = r
            if part.linear_confidence is not None:
                confidence = (
                    np.full(len(keys), np.nan, dtype=np.float32) if confidence is None else confidence
                )
                confidence[rows] = part.linear_confidence
            if shadow and adapter is route.live:
                # what each version would serve (its whole cascade), compared row by row
                cand = self._forward(route.canary, [inputs[i] for i in rows])  # type: ignore[arg-type]
                shadow_stats = _shadow(part.probs, cand.probs, route.canary.manifest.version)
        assert probs is not None
        return Scored(
            task, route.live.manifest.labels, probs, versions, shadow_stats, paths, reasons, confidence
        )

    def split(
        self,
        task: str,
        inputs: list[str],
        keys: list[str] | None = None,
        shadow: bool = False,
    ) -> Split | None:
        """The linear pass of a text batch, so that its linear answers can be published before
        the transformer runs on the rest: what :meth:`score` serves, in two steps (same
        probabilities, paths, reasons and versions). None when nothing would be gained or
        shadowing needs the whole batch at once (no version in play has a linear stage, or a
        canary is shadowed): call :meth:`score`.

        Unlike the rest of the runtime, this may run off the model thread: it only reads the
        current route and the linear stages, which a version never changes once loaded."""
        route = self.routes.get(task)
        if route is None:
            raise AdapterError(f"no active adapter for {task}")
        if route.canary is None or keys is None:
            groups = [(list(range(len(inputs))), route.live)]
        elif shadow:
            return None
        else:
            to_canary = [in_canary(k, route.fraction) for k in keys]
            groups = [
                ([i for i, c in enumerate(to_canary) if not c], route.live),
                ([i for i, c in enumerate(to_canary) if c], route.canary),
            ]
        if all(a.linear is None or a.rule is None for rows, a in groups if rows):
            return None
        parts: list[_Part] = []
        for rows, adapter in groups:
            if not rows:
                continue
            texts = [inputs[i] for i in rows]
            routed = None
            if adapter.linear is not None and adapter.rule is not None:
                routed = first_pass(adapter.linear, adapter.rule, texts)
            parts.append(_Part(adapter, rows, texts, routed))
        early = sorted(p.rows[int(j)] for p in parts if p.routed is not None for j in p.routed.early)
        later = sorted(set(range(len(inputs))) - set(early))
        answers = [
            (p, p.routed.early, self._served(p, p.routed.early, None))
            for p in parts
            if p.routed is not None and len(p.routed.early)
        ]
        scored = self._assemble(task, early, answers) if early else None
        return Split(task, scored, early, later, tuple(parts), keys)

    def score_later(self, split: Split) -> Scored:
        """The rows of a :class:`Split` that need the transformer, in ``later_rows`` order (on the
        model thread, like :meth:`score`). A version that a swap unloaded since the linear pass
        (a torch adapter is removed from the shared encoder) scores nothing more: those rows are
        scored again by what serves now, and say so by their version."""
        if any(not self._usable(p.adapter) for p in split.parts):
            inputs = [x for p in split.parts for x in p.inputs]
            order = [r for p in split.parts for r in p.rows]
            at = {r: i for i, r in enumerate(order)}
            rows = [at[r] for r in split.later_rows]
            keys = None if split.keys is None else [split.keys[r] for r in split.later_rows]
            return self.score(split.task, [inputs[i] for i in rows], keys)
        answers: list[tuple[_Part, np.ndarray, Answer]] = []
        for p in split.parts:
            if p.routed is None:
                whole = self._forward(p.adapter, p.inputs)
                answers.append((p, np.arange(len(p.inputs)), Answer(whole.probs, whole.paths, None)))  # type: ignore[arg-type]
            elif len(p.routed.later):
                local = p.routed.later
                probs = self._transformer(p.adapter, [p.inputs[int(j)] for j in local]).probs
                answers.append((p, local, self._served(p, local, probs)))
        return self._assemble(split.task, split.later_rows, answers)

    def _usable(self, loaded: LoadedAdapter) -> bool:
        if loaded.session is not None or self._peft is None:
            return True
        return loaded.name in self._peft.peft_config

    def _served(self, part: _Part, local: np.ndarray, transformer_probs: np.ndarray | None) -> Answer:
        assert part.routed is not None and part.adapter.linear is not None and part.adapter.rule is not None
        return served(
            part.adapter.linear, part.adapter.rule, part.routed, part.inputs, local, transformer_probs,
            reasons=TASKS[part.adapter.manifest.task].reasons,
        )  # fmt: skip

    def _assemble(
        self, task: str, rows: list[int], answers: list[tuple[_Part, np.ndarray, Answer]]
    ) -> Scored:
        """One Scored over batch ``rows`` (ascending) from what each part served for some of them."""
        at = {r: i for i, r in enumerate(rows)}
        n = len(rows)
        labels = self.routes[task].live.manifest.labels
        probs: np.ndarray | None = None
        versions = np.zeros(n, dtype=np.int64)
        paths = np.full(n, ScorePath.TRANSFORMER, dtype=np.int8)
        confidence = np.full(n, np.nan, dtype=np.float32)
        reasons: list[list[tuple[str, float]] | None] = [None] * n
        any_reasons = False
        for part, local, ans in answers:
            where = [at[part.rows[int(j)]] for j in local]
            if probs is None:
                probs = np.zeros((n, ans.probs.shape[1]), dtype=np.float32)
            probs[where] = ans.probs
            versions[where] = part.adapter.manifest.version
            if ans.paths is not None:
                paths[where] = ans.paths
            if ans.confidence is not None:
                confidence[where] = ans.confidence
            if ans.reasons is not None:
                any_reasons = True
                for i, r in zip(where, ans.reasons, strict=True):
                    reasons[i] = r
        assert probs is not None
        return Scored(
            task, labels, probs, versions, None, paths, reasons if any_reasons else None, confidence
        )

    def _forward(self, loaded: LoadedAdapter, inputs: list[str] | list[list[float]]) -> Scored:
        """What one version serves for ``inputs``: with a linear stage, its cascade (the
        transformer runs on the rows that need it only); a text version without one answers
        every row from the transformer; a click version with trees, their blend with the MLP."""
        m = loaded.manifest
        if loaded.linear is not None and loaded.rule is not None:
            return self._cascade(loaded, inputs)  # type: ignore[arg-type]
        scored = self._transformer(loaded, inputs)
        if m.kind != "text-lora":
            if loaded.trees is None:
                return scored
            trees = loaded.trees.predict(inputs)[:, None]  # type: ignore[arg-type]
            return replace(scored, probs=blend(scored.probs, trees, loaded.trees.weight))
        return replace(scored, paths=np.full(len(inputs), ScorePath.TRANSFORMER, dtype=np.int8))

    def _cascade(self, loaded: LoadedAdapter, texts: list[str]) -> Scored:
        m = loaded.manifest
        assert loaded.linear is not None and loaded.rule is not None
        out = answer(
            loaded.linear, loaded.rule, texts, lambda rows: self._transformer(loaded, rows).probs,
            reasons=TASKS[m.task].reasons,
        )  # fmt: skip
        versions = np.full(len(texts), m.version)
        return Scored(m.task, m.labels, out.probs, versions, paths=out.paths, reasons=out.reasons,
                      linear_confidence=out.confidence)  # fmt: skip

    def _transformer(self, loaded: LoadedAdapter, inputs: list[str] | list[list[float]]) -> Scored:
        m = loaded.manifest
        versions = np.full(len(inputs), m.version)
        if loaded.session is not None:
            if m.kind == "text-lora":
                probs = run_text(loaded.session, self.batcher, inputs, self.batch_size_for(m.task))  # type: ignore[arg-type]
            else:
                probs = run_click(loaded.session, inputs)  # type: ignore[arg-type]
            return Scored(m.task, m.labels, probs, versions)
        import torch

        with torch.inference_mode():
            if loaded.click is not None:
                x = torch.tensor(inputs, dtype=torch.float32)
                p = torch.sigmoid(loaded.click(x)).unsqueeze(-1)
                return Scored(m.task, m.labels, p.numpy(), versions)
            return Scored(m.task, m.labels, self._torch_text(loaded, inputs), versions)  # type: ignore[arg-type]

    def _torch_text(self, loaded: LoadedAdapter, texts: list[str]) -> np.ndarray:
        import torch

        from streamtune.model.encoder import mean_pool

        assert self._peft is not None and loaded.head is not None
        self._peft.set_adapter(loaded.name)
        out = np.zeros((len(texts), len(loaded.manifest.labels)), dtype=np.float32)
        for rows, ids, mask in self.batcher.chunks(texts, self.batch_size_for(loaded.manifest.task)):
            attention = torch.from_numpy(mask)
            hidden = self._peft(input_ids=torch.from_numpy(ids), attention_mask=attention)
            pooled = mean_pool(hidden.last_hidden_state.float(), attention)
            out[rows] = torch.softmax(loaded.head(pooled), dim=-1).numpy()
        return out


def _decisions(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chosen label and its probability per row (binary tasks: p >= 0.5)."""
    if probs.shape[1] == 1:
        p = probs[:, 0]
        return (p >= 0.5).astype(np.int64), np.maximum(p, 1 - p)
    return probs.argmax(1), probs.max(1)


def _shadow(live: np.ndarray, candidate: np.ndarray, version: int) -> Shadow:
    live_label, _ = _decisions(live)
    cand_label, cand_conf = _decisions(candidate)
    return Shadow(version, len(live), float((live_label == cand_label).mean()), float(cand_conf.mean()))
