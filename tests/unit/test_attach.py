"""Which shipped training texts a version's transformer saw (``training/attach.seen_by``): the
validation rows among them are left out when a cascade rule is chosen with that transformer."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamtune.core.settings import Settings
from streamtune.rollout.registry import BaseModelRef, LocalRegistry, Manifest
from streamtune.training.attach import seen_by
from streamtune.training.bootstrap import v1_training_texts

TASK = "review_sentiment"


def _publish(
    reg: LocalRegistry, version: int, training: dict[str, Any], parent: int | None = None
) -> Manifest:
    build = reg.root.parent / f"build-{version}"
    build.mkdir(parents=True)
    (build / "head.safetensors").write_bytes(b"head")
    m = Manifest(
        task=TASK, version=version, parent_version=parent, kind="text-lora", training=training,
        base_model=BaseModelRef(name="base", sha256="c" * 64), labels=["negative", "neutral", "positive"],
        created_at=datetime.now(UTC),
    )  # fmt: skip
    return reg.publish(build, m)


def test_what_each_kind_of_version_saw(tmp_path: Path) -> None:
    data = Settings().model.data_dir
    reg = LocalRegistry(tmp_path / "reg")
    v1 = _publish(reg, 1, {"train_rows": 3000, "seed": 13})  # the committed recipe
    attached = _publish(
        reg, 2, {"train_rows": 3000, "seed": 13, "transformer_from": 1, "validation_rows": 9}, 1
    )
    online = _publish(reg, 3, {"source": "trainer", "seed": 13}, parent=2)
    retrained = _publish(reg, 4, {"train_rows": 0, "seed": 13, "validation_rows": 1730})
    every_row = _publish(reg, 5, {"train_rows": 0, "seed": 13})

    committed = v1_training_texts(TASK, data)
    assert len(committed) == 3000
    assert seen_by(reg, v1, data) == committed
    assert seen_by(reg, attached, data) == committed  # v1's transformer, attached as it is
    assert seen_by(reg, online, data) == committed  # fine-tuned from it: saw what it saw
    assert seen_by(reg, retrained, data) == frozenset()  # trained without the validation rows
    assert len(seen_by(reg, every_row, data)) > 15_000  # the whole training split
