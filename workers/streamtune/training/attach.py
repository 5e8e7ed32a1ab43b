"""A cascade version from an existing version's transformer: ``streamtune train --task T
--transformer-from N``.

The new version keeps version N's adapter and head files unchanged, adds a linear stage fitted
on the training rows, and a cascade rule chosen on validation rows with N's own transformer
probabilities there (a task with ``rule_folds``: on out-of-fold rows of the training split,
``training/out_of_fold.py``). Validation rows the transformer was trained on are left out of the choice
when they are known (:func:`seen_by`; for the committed v1, its recipe's seeded sample): a
transformer scores its own training rows too well, which would bias the
rule towards it. Held-out rows are only scored, beside the same baselines ``streamtune train``
reports.

This is the cheap way to put the cascade in front of a transformer that already serves: the
linear stage costs about a CPU minute to fit, the transformer's validation and held-out
predictions a few CPU minutes, against half an hour or more per epoch to retrain it on 2 cores.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from streamtune.core.errors import StreamtuneError
from streamtune.core.tasks import TASKS
from streamtune.model.encoder import base_model_sha256
from streamtune.model.linear import LINEAR_FILES, LinearStage
from streamtune.rollout.registry import AdapterStore, Manifest
from streamtune.training import cascade, out_of_fold
from streamtune.training import metrics as M
from streamtune.training.bootstrap import (
    TrainConfig,
    seed_everything,
    text_baselines,
    text_split,
    v1_training_texts,
)
from streamtune.training.candidate import _TextModel

log = structlog.get_logger(__name__)


def seen_by(registry: AdapterStore, source: Manifest, data_dir: Path) -> frozenset[str]:
    """The shipped training texts ``source``'s transformer was trained on, as far as known.

    A version trained by ``streamtune train`` before the validation split existed (its record
    has no ``validation_rows``) sampled ``train_rows`` of the whole training split with its seed
    (0: all of it). A version trained since never saw validation rows. A version whose
    transformer came from another (``transformer_from``: attached here; an online candidate:
    fine-tuned from its parent on labels from the stream) saw what that one saw."""
    record = source.training
    parent = record.get("transformer_from") or (
        source.parent_version if record.get("source") == "trainer" else None
    )
    if parent:
        return seen_by(registry, registry.manifest(source.task, int(parent)), data_dir)
    if "validation_rows" in record or "seed" not in record:
        return frozenset()
    rows = int(record.get("train_rows") or 0)
    return v1_training_texts(source.task, data_dir, rows=rows, seed=int(record["seed"]))


def cascade_from(
    task: str,
    version: int,
    base_path: str,
    data_dir: Path,
    registry: AdapterStore,
    cfg: TrainConfig,
) -> Manifest:
    """Publish a new version of ``task``: ``version``'s transformer with a linear stage and rule."""
    spec = TASKS[task]
    if not spec.is_text:
        raise StreamtuneError(f"{task}: the cascade is for text tasks")
    seed_everything(cfg.seed)
    started = time.monotonic()
    source = registry.verify(task, version, base_sha256=base_model_sha256(base_path))
    if source.kind != "text-lora":
        raise StreamtuneError(f"{task} v{version}: a {source.kind} version has no transformer to reuse")
    split = text_split(task, data_dir, cfg)
    if split.names != source.labels:
        raise StreamtuneError(f"{task} v{version}: its labels are not the data's classes")
    names = split.names
    (all_x, all_y), (xte, yte) = split.train, split.held_out
    model = _TextModel(base_path, registry.fetch(task, version), names, cfg.max_len)
    score = M.METRICS[spec.metric_family]
    stage = LinearStage.fit(all_x, [names[y] for y in all_y], names, cfg.linear, cfg.seed)
    xva: list[str] = []
    if spec.rule_folds:  # no validation split: the rule is chosen out of fold (fold transformers)
        rule, report = out_of_fold.choose(task, base_path, names, all_x, all_y, cfg, cfg.linear, score)
        chosen = cascade.FittedCascade(stage, rule, report)
    else:
        seen = seen_by(registry, source, data_dir)
        xva, yva = split.validation
        kept = [i for i, x in enumerate(xva) if x not in seen]
        if not kept:
            raise StreamtuneError(f"{task} v{version}: its transformer trained on every validation row")
        xva, yva = [xva[i] for i in kept], [yva[i] for i in kept]
        chosen = cascade.choose(stage, xva, yva, model.predict_transformer(xva), score, spec.gate_metric)
    metrics, fitted = cascade.evaluate(chosen, xte, yte, model.predict_transformer(xte), score)
    baselines = text_baselines(split, score, cfg.seed)
    seconds = time.monotonic() - started
    log.info("cascade_chosen", task=task, transformer_from=version, rule=fitted.rule.as_dict(),
             held_out=fitted.report["held_out"], seconds=round(seconds, 1))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="streamtune-cascade-") as tmp:
        build = Path(tmp)
        src = registry.fetch(task, version)
        for name in source.files:
            if name not in LINEAR_FILES:
                shutil.copy2(src / name, build / name)
        fitted.stage.save(build)
        training = {
            **source.training,
            "transformer_from": version,
            "linear_train_rows": len(all_x),
            "validation_rows": len(xva),
            "validation_rows_left_out_as_seen": len(split.validation[0]) - len(xva),
            "held_out_rows": len(xte),
            "cascade_seconds": round(seconds, 1),
        }
        manifest = Manifest(
            task=task,
            version=registry.next_version(task),
            parent_version=version,
            kind=source.kind,
            base_model=source.base_model,
            labels=names,
            created_at=datetime.now(UTC),
            training=training,
            metrics=metrics,
            baselines=baselines,
            cascade=fitted.report,
        )
        return registry.publish(build, manifest)
