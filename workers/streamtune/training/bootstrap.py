"""``streamtune train``: fine-tune a task's version on the shipped data, evaluate, publish.

Same command + same seed (+ same machine and thread count) gives the same weights.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from streamtune.core.features import vectorize
from streamtune.core.tasks import CLICK, TASKS
from streamtune.datasets import loaders as data
from streamtune.model.click import CLICK_BASE_NAME, CLICK_BASE_WEIGHTS, CLICK_LORA_TARGETS, ClickNet
from streamtune.model.encoder import (
    LORA_TARGETS,
    Head,
    base_model_name,
    base_model_sha256,
    load_base,
    mean_pool,
    tokenize,
)
from streamtune.model.linear import LinearConfig, LinearStage
from streamtune.rollout.registry import AdapterStore, BaseModelRef, Manifest, sha256_file
from streamtune.training import cascade
from streamtune.training import metrics as M

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 13
    epochs: int = 1
    train_rows: int = 3000  # per text task; 0 = all
    eval_rows: int = 0  # 0 = the whole held-out split
    max_len: int = 128
    batch_size: int = 16
    lr: float = 1e-3
    lora_r: int = 8
    validation_percent: int = 10  # of the training split, by a salted row-id hash
    linear_rows: int = 0  # training rows of the linear stage and the TF-IDF baselines (0: all)
    validation_rows: int = 0  # validation rows the cascade rule is chosen on (0: all)
    cascade: bool = True  # text tasks whose TaskSpec has one: fit a linear stage, choose its rule
    linear: LinearConfig = field(default_factory=LinearConfig)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _embed(tok: Any, model: nn.Module, texts: Sequence[str], max_len: int, bs: int = 64) -> torch.Tensor:
    """Mean-pooled embeddings of ``texts``, in their order. Batched by length (texts sorted by
    characters, restored after): a batch pads to its longest text, so mixed lengths cost about
    1.6x the CPU (measured on 600 reviews and other-site sentences; same outputs to 1e-6)."""
    if not len(texts):
        return torch.zeros((0, 0))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outs = []
    with torch.inference_mode():
        for i in range(0, len(order), bs):
            b = tokenize(tok, [texts[j] for j in order[i : i + bs]], max_len)
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            outs.append(mean_pool(h, b["attention_mask"]))
        pooled = torch.cat(outs)
        restored = torch.empty_like(pooled)
        restored[torch.tensor(order)] = pooled
    return restored


def fit_text(
    model: nn.Module,
    head: nn.Module,
    tok: Any,
    xtr: list[str],
    ytr: list[int],
    n_classes: int,
    cfg: TrainConfig,
    task: str,
    deadline: float | None = None,
) -> int:
    """Train LoRA weights and head with class-balanced cross-entropy; returns the steps taken.

    ``deadline`` (monotonic seconds) bounds the run: training stops after the step that passes it.
    """
    counts = np.bincount(ytr, minlength=n_classes).astype(float)
    weights = torch.tensor(
        np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** 0.5, 1.0), dtype=torch.float32
    )
    loss_fn = nn.CrossEntropyLoss(weight=weights / weights.mean())
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = 0
    total_steps = cfg.epochs * ((len(xtr) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(total_steps, 1)))
    for epoch in range(cfg.epochs):
        model.train()
        head.train()
        order = torch.randperm(len(xtr), generator=gen).tolist()
        running = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            b = tokenize(tok, [xtr[j] for j in idx], cfg.max_len)
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            logits = head(mean_pool(h, b["attention_mask"]))
            loss = loss_fn(logits, torch.tensor([ytr[j] for j in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            running += loss.item()
            if steps % 100 == 0:
                log.info("training", task=task, step=steps, of=total_steps,
                         mean_loss=round(running / (i // cfg.batch_size + 1), 4))  # fmt: skip
            if deadline is not None and time.monotonic() > deadline:
                log.warning("training_time_budget_reached", task=task, step=steps, of=total_steps)
                model.eval()
                head.eval()
                return steps
        log.info("epoch_done", task=task, epoch=epoch + 1,
                 mean_loss=round(running / max(1, len(order) / cfg.batch_size), 4))  # fmt: skip
    model.eval()
    head.eval()
    return steps


def predict_text(model: nn.Module, head: nn.Module, tok: Any, texts: list[str], max_len: int) -> np.ndarray:
    with torch.inference_mode():
        pooled = _embed(tok, model, texts, max_len)
        probs: np.ndarray = torch.softmax(head(pooled), dim=-1).numpy()
    return probs


@dataclass(frozen=True)
class TextSplit:
    """A text task's rows for ``streamtune train``, as texts and class indices.

    The training split minus the validation split carved from it is what trains: the
    transformer on ``transformer`` (``cfg.train_rows`` of it, or all), the linear stage and the
    TF-IDF baselines on ``train`` (``cfg.linear_rows`` of it, or all). ``validation`` chooses
    the cascade rule; ``held_out`` is only ever scored."""

    names: list[str]
    train: tuple[list[str], list[int]]
    transformer: tuple[list[str], list[int]]
    validation: tuple[list[str], list[int]]
    held_out: tuple[list[str], list[int]]


def text_split(task: str, data_dir: Path, cfg: TrainConfig) -> TextSplit:
    spec = TASKS[task]
    # unlabelled queries dropped; a task whose rule is chosen out of fold has no validation split
    rows = data.splits(task, data_dir, 0 if spec.rule_folds else cfg.validation_percent)
    # fixed class names, else the taxonomy as the data knows it (known up front)
    every = (*rows.train, *rows.validation, *rows.held_out)
    names = list(spec.labels) if spec.labels is not None else sorted({y for _, _, y in every})
    index = {n: i for i, n in enumerate(names)}

    def texts_and_labels(part: Sequence[tuple[str, Any, str]]) -> tuple[list[str], list[int]]:
        return [str(x) for _, x, _ in part], [index[y] for _, _, y in part]

    rng = random.Random(cfg.seed)

    def sample(part: tuple[list[str], list[int]], n: int) -> tuple[list[str], list[int]]:
        if not n or len(part[0]) <= n:
            return part
        idx = sorted(rng.sample(range(len(part[0])), n))
        return [part[0][i] for i in idx], [part[1][i] for i in idx]

    train = texts_and_labels(rows.train)
    transformer = sample(train, cfg.train_rows)
    held_out = sample(texts_and_labels(rows.held_out), cfg.eval_rows)
    linear = sample(train, cfg.linear_rows)
    validation = sample(texts_and_labels(rows.validation), cfg.validation_rows)
    return TextSplit(names, linear, transformer, validation, held_out)


def text_baselines(split: TextSplit, score: cascade.Scores, seed: int) -> dict[str, dict[str, float]]:
    """The simple models every text version is reported beside, on its held-out rows: the
    majority class, and TF-IDF + logistic regression with and without class balancing, trained
    on the linear stage's rows."""
    (x, y), (xte, yte), n = split.train, split.held_out, len(split.names)
    balanced, unbalanced = M.tfidf_logreg_variants(x, y, xte, n, seed, (True, False))
    return {
        "majority": score(yte, M.majority_probs(y, len(yte), n)),
        "tfidf_logreg": score(yte, balanced),
        "tfidf_logreg_unbalanced": score(yte, unbalanced),
    }


def v1_training_texts(task: str, data_dir: Path, rows: int = 3000, seed: int = 13) -> frozenset[str]:
    """The texts the committed v1 of a text task was trained on. Its recipe sampled ``rows`` of
    the whole training split (0: all of it) with ``random.Random(seed)``, before a validation
    split was carved from it, so some validation rows are among them
    (:mod:`streamtune.training.attach` leaves those out when it chooses a cascade rule with v1's
    transformer)."""
    pct = TASKS[task].held_out_percent
    train = [
        str(x) for row_id, x, _ in data.LABELLED_ROWS[task](data_dir) if not data.is_held_out(row_id, pct)
    ]
    if not rows or rows >= len(train):
        return frozenset(train)
    idx = sorted(random.Random(seed).sample(range(len(train)), rows))
    return frozenset(train[i] for i in idx)


def fit_transformer(
    task: str, base_path: str, names: list[str], xtr: list[str], ytr: list[int], cfg: TrainConfig
) -> tuple[Any, Head, Any]:
    """A fresh base model with a LoRA adapter and a head, trained on ``xtr`` by the task's
    recipe: (peft model, head, tokenizer)."""
    tok, base = load_base(base_path)
    head = Head(int(base.config.hidden_size), len(names))
    if TASKS[task].prototype_head:
        # Prototype init: each class starts at the embedding of its own name, so classes
        # with few (or no) training queries are still reachable.
        protos = torch.nn.functional.normalize(_embed(tok, base, names, cfg.max_len), dim=-1)
        with torch.no_grad():
            head.linear.weight.copy_(protos * 20.0)
            head.linear.bias.zero_()
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05, target_modules=LORA_TARGETS)
    model = get_peft_model(base, lora)
    fit_text(model, head, tok, xtr, ytr, len(names), cfg, task)
    return model, head, tok


def train_text_task(
    task: str, base_path: str, data_dir: Path, registry: AdapterStore, cfg: TrainConfig
) -> Manifest:
    seed_everything(cfg.seed)
    started = time.monotonic()
    spec = TASKS[task]
    split = text_split(task, data_dir, cfg)
    names = split.names
    (xtr, ytr), (xva, yva), (xte, yte) = split.transformer, split.validation, split.held_out
    model, head, tok = fit_transformer(task, base_path, names, xtr, ytr, cfg)
    probs = predict_text(model, head, tok, xte, cfg.max_len)
    score = M.METRICS[spec.metric_family]
    metrics = score(yte, probs)
    (all_x, all_y) = split.train
    baselines = text_baselines(split, score, cfg.seed)
    fitted = None
    if spec.cascade and cfg.cascade:
        stage = LinearStage.fit(all_x, [names[y] for y in all_y], names, cfg.linear, cfg.seed)
        if spec.rule_folds:
            from streamtune.training import out_of_fold  # it trains fold transformers with this module

            rule, report = out_of_fold.choose(task, base_path, names, all_x, all_y, cfg, cfg.linear, score)
            chosen = cascade.FittedCascade(stage, rule, report)
        else:
            val_probs = predict_text(model, head, tok, xva, cfg.max_len)
            chosen = cascade.choose(stage, xva, yva, val_probs, score, spec.gate_metric)
        metrics, fitted = cascade.evaluate(chosen, xte, yte, probs, score)
        log.info("cascade_chosen", task=task, rule=fitted.rule.as_dict(), held_out=fitted.report["held_out"])
    seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        model.save_pretrained(str(build), safe_serialization=True, save_embedding_layers=False)
        (build / "README.md").unlink(missing_ok=True)
        _portable_adapter_config(build / "adapter_config.json", base_model_name(base_path))
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(build / "head.safetensors"))
        if fitted is not None:
            fitted.stage.save(build)
        training = _training_record(cfg, len(xtr), len(xte), seconds, data_file(task))
        training |= {"linear_train_rows": len(all_x), "validation_rows": len(xva)}
        manifest = Manifest(
            task=task,
            version=registry.next_version(task),
            parent_version=None,
            kind="text-lora",
            base_model=BaseModelRef(name=base_model_name(base_path), sha256=base_model_sha256(base_path)),
            labels=names,
            created_at=datetime.now(UTC),
            training=training,
            metrics=metrics,
            baselines=baselines,
            cascade=fitted.report if fitted is not None else {},
        )
        return registry.publish(build, manifest)


def data_file(task: str) -> str:
    return TASKS[task].data_file


def _training_record(
    cfg: TrainConfig, n_train: int, n_test: int, seconds: float, source: str
) -> dict[str, Any]:
    return {
        "data": source,
        "train_rows": n_train,
        "held_out_rows": n_test,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "max_len": cfg.max_len,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "lora_r": cfg.lora_r,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
    }


def _portable_adapter_config(path: Path, base_name: str) -> None:
    """peft records the absolute base path; keep the published file machine-independent."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _session_arrays(rows: list[dict[str, str]]) -> tuple[np.ndarray, list[int]]:
    x = np.array([vectorize(r) for r in rows], dtype=np.float32)
    y = [int(r["Revenue"]) for r in rows]
    return x, y


def fit_click(
    module: nn.Module,
    params: list[nn.Parameter],
    xt: torch.Tensor,
    yt: torch.Tensor,
    epochs: int,
    lr: float,
    gen: torch.Generator,
    loss_fn: nn.Module,
    deadline: float | None = None,
) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            loss = loss_fn(module(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if deadline is not None and time.monotonic() > deadline:
            break
    module.eval()


# The click recipe, chosen on validation rows by ``streamtune.devtools.click_experiment``
# (docs/training.md): the base MLP reads every feature column (derived ones included), trains 15
# epochs at lr 1e-3 without class weighting; the LoRA adapter on top trains 3 more.
CLICK_BASE_EPOCHS = 15
CLICK_BASE_LR = 1e-3
CLICK_LORA_EPOCHS = 3
CLICK_LORA_LR = 1e-3


def train_click_task(data_dir: Path, registry: AdapterStore, cfg: TrainConfig) -> Manifest:
    """Train the click MLP (its "base") and a LoRA adapter on top of it through peft, and
    boosted trees beside it (``model/trees.py``), on the training split minus its validation
    split; the blend weight is chosen on validation rows, the held-out rows only score."""
    from streamtune.model import trees

    seed_everything(cfg.seed)
    started = time.monotonic()
    spec = CLICK
    pct = spec.held_out_percent
    rows = data.load_sessions(data_dir)
    train_all = [r for r in rows if not data.is_held_out(r["session_id"], pct)]
    fit_rows = [r for r in train_all if not data.is_validation(r["session_id"], cfg.validation_percent)]
    val_rows = [r for r in train_all if data.is_validation(r["session_id"], cfg.validation_percent)]
    test = [r for r in rows if data.is_held_out(r["session_id"], pct)]
    xall, yall = _session_arrays(train_all)
    xtr, ytr = _session_arrays(fit_rows)
    xva, yva = _session_arrays(val_rows)
    xte, yte = _session_arrays(test)
    net = ClickNet(dim=xtr.shape[1])
    with torch.no_grad():
        net.mean.copy_(torch.from_numpy(xtr.mean(0)))
        net.std.copy_(torch.from_numpy(xtr.std(0) + 1e-6))
    xt, yt = torch.from_numpy(xtr), torch.tensor(ytr, dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(cfg.seed)

    def fit(module: nn.Module, params: list[nn.Parameter], epochs: int, lr: float) -> None:
        fit_click(module, params, xt, yt, epochs, lr, gen, loss_fn)

    fit(net, list(net.parameters()), epochs=CLICK_BASE_EPOCHS * cfg.epochs, lr=CLICK_BASE_LR)
    base_state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=CLICK_LORA_TARGETS))
    lora_params = [p for p in model.parameters() if p.requires_grad]
    fit(model, lora_params, epochs=CLICK_LORA_EPOCHS * cfg.epochs, lr=CLICK_LORA_LR)

    def mlp(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = torch.sigmoid(model(torch.from_numpy(x))).numpy()
        return out

    forest = trees.fit(xtr, ytr, cfg.seed)
    tree_p = lambda x: forest.predict_proba(x)[:, 1]  # noqa: E731
    roc = lambda y, p: M.binary_metrics(y, p)["roc_auc"]  # noqa: E731
    weight, by_weight = trees.choose_weight(mlp(xva), tree_p(xva), yva, roc)
    served = trees.blend(mlp(xte), tree_p(xte), weight)
    metrics = M.binary_metrics(yte, served)
    baselines = {  # trained on the whole training split, validation rows included
        "majority": M.binary_metrics(yte, np.full(len(yte), float(np.mean(yall)))),
        "logreg": M.binary_metrics(yte, M.logreg_binary(xall, yall, xte, cfg.seed)),
        "hist_gradient_boosting": M.binary_metrics(
            yte, trees.fit(xall, yall, cfg.seed).predict_proba(xte)[:, 1]
        ),
    }
    blend_record = {
        "metric": "roc_auc",
        "weight": weight,
        "validation_rows": len(yva),
        "validation_by_weight": by_weight,
        "held_out": {"mlp": M.binary_metrics(yte, mlp(xte)), "trees": M.binary_metrics(yte, tree_p(xte))},
    }
    seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        save_file(base_state, str(build / CLICK_BASE_WEIGHTS))
        model.save_pretrained(str(build), safe_serialization=True, save_embedding_layers=False)
        (build / "README.md").unlink(missing_ok=True)
        _portable_adapter_config(build / "adapter_config.json", CLICK_BASE_NAME)
        trees.export(forest, xva, weight, build, {"train_rows": len(ytr), "seed": cfg.seed})
        training = _training_record(cfg, len(ytr), len(yte), seconds, data.SESSIONS)
        manifest = Manifest(
            task=spec.name,
            version=registry.next_version(spec.name),
            kind="click-mlp-lora",
            base_model=BaseModelRef(name=CLICK_BASE_NAME, sha256=sha256_file(build / CLICK_BASE_WEIGHTS)),
            labels=list(spec.labels or ()),
            created_at=datetime.now(UTC),
            training={**training, "validation_rows": len(yva), "trees": blend_record},
            metrics=metrics,
            baselines=baselines,
        )
        return registry.publish(build, manifest)


def train_task(
    task: str, base_path: str, data_dir: Path, registry: AdapterStore, cfg: TrainConfig
) -> Manifest:
    if not TASKS[task].is_text:
        return train_click_task(data_dir, registry, cfg)
    return train_text_task(task, base_path, data_dir, registry, cfg)
