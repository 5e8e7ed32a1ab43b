"""The model runtime with the real base model and the committed version-1 adapters."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamtune.core.errors import AdapterError
from streamtune.core.settings import Settings
from streamtune.core.tasks import TASK_NAMES
from streamtune.model.runtime import ModelRuntime
from streamtune.rollout.registry import LocalRegistry
from support.registry import pinned_registry

REVIEWS = [
    "Absolutely love this dress, fits perfectly and the fabric is beautiful. Buying another color!",
    "Terrible quality. The seams ripped after one wear and it looks nothing like the picture. Returned it.",
]


@pytest.fixture(scope="module")
def registry_copy(tmp_path_factory: pytest.TempPathFactory) -> LocalRegistry:
    root = tmp_path_factory.mktemp("registry") / "adapters"
    pinned_registry(root)
    return LocalRegistry(root)


@pytest.fixture(scope="module")
def runtime(registry_copy: LocalRegistry) -> Iterator[ModelRuntime]:
    s = Settings()
    rt = ModelRuntime(s.model.base_model, registry_copy, max_len=128, threads=1)
    rt.load_latest(TASK_NAMES)
    yield rt


def _copy_version(reg: LocalRegistry, task: str, src: int, dst: int, mutate: str | None = None) -> Path:
    """A new version made from an existing one, optionally broken on purpose."""
    s, d = reg.fetch(task, src), reg.root / task / str(dst)
    shutil.copytree(s, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["version"] = dst
    manifest["parent_version"] = src
    if mutate == "wrong_base":
        manifest["base_model"]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(manifest))
    if mutate == "truncated":
        data = (d / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    if mutate == "corrupt_matching_checksum":
        from streamtune.rollout.registry import sha256_file

        (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
        manifest["files"]["adapter_model.safetensors"] = sha256_file(d / "adapter_model.safetensors")
        (d / "manifest.json").write_text(json.dumps(manifest))
    if mutate == "no_manifest":
        (d / "manifest.json").unlink()
    return d


def test_reviews_are_scored_sensibly(runtime: ModelRuntime) -> None:
    scored = runtime.score("review_sentiment", REVIEWS)
    assert scored.version == 1 and scored.labels == ["negative", "neutral", "positive"]
    assert scored.probs.shape == (2, 3)
    assert [scored.labels[i] for i in scored.probs.argmax(1)] == ["positive", "negative"]


def test_queries_get_a_ranked_class(runtime: ModelRuntime) -> None:
    scored = runtime.score("query_class", ["leather office chair", "round area rug 8x10"])
    top = [scored.labels[i] for i in scored.probs.argmax(1)]
    assert top[0] in {"Office Chairs", "Desk Chairs", "Gaming Chairs"}
    assert "Rug" in top[1]


def test_padding_only_to_the_longest_in_batch(runtime: ModelRuntime) -> None:
    [(rows, ids, mask)] = runtime.batcher.chunks(["a slightly longer text here", "short"], 8)
    assert rows == [1, 0] and ids.shape == mask.shape and ids.shape[1] < 16
    assert mask[0].sum() < mask[1].sum() == ids.shape[1]  # the short row is padded, the long one not


def test_tokens_match_the_transformers_tokenizer() -> None:
    """The torch-free tokenizer gives the ids the transformers fast tokenizer gives, truncation
    included (both read the model's tokenizer.json)."""
    from transformers import AutoTokenizer

    from streamtune.datasets import loaders as data
    from streamtune.model.tokens import TextBatcher

    s = Settings()
    texts = [r.model_text() for r in data.load_reviews(s.model.data_dir)[:60]] + ["", "ÉLÉGANT dress!!! 😀"]
    expected = AutoTokenizer.from_pretrained(s.model.base_model)(texts, truncation=True, max_length=64)[
        "input_ids"
    ]
    for rows, ids, mask in TextBatcher(s.model.base_model, 64).chunks(texts, 16):
        for r, i in enumerate(rows):
            assert ids[r, : int(mask[r].sum())].tolist() == expected[i]


def test_swap_between_batches_uses_the_new_version(
    runtime: ModelRuntime, registry_copy: LocalRegistry
) -> None:
    base_params = sum(1 for n, _ in runtime._base.named_parameters() if "lora_" not in n)
    _copy_version(registry_copy, "review_sentiment", 1, 2)
    before = runtime.score("review_sentiment", REVIEWS)
    loaded = runtime.load("review_sentiment", 2)
    assert runtime.score("review_sentiment", REVIEWS).version == 1  # loading does not swap
    runtime.activate(loaded)
    after = runtime.score("review_sentiment", REVIEWS)
    assert after.version == 2
    assert after.probs == pytest.approx(before.probs, abs=1e-5)  # same weights, other version
    # The base weights are held once: another adapter adds LoRA tensors only.
    assert sum(1 for n, _ in runtime._base.named_parameters() if "lora_" not in n) == base_params


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("wrong_base", "trained for base model"),
        ("truncated", "checksum mismatch"),
        ("corrupt_matching_checksum", "cannot load"),
        ("no_manifest", "manifest missing"),
    ],
)
def test_bad_adapter_is_refused_and_live_keeps_serving(
    runtime: ModelRuntime, registry_copy: LocalRegistry, mutate: str, message: str
) -> None:
    version = 10 + ["wrong_base", "truncated", "corrupt_matching_checksum", "no_manifest"].index(mutate)
    _copy_version(registry_copy, "query_class", 1, version, mutate)
    live = runtime.active["query_class"].manifest.version
    with pytest.raises(AdapterError, match=message):
        runtime.load("query_class", version)
    scored = runtime.score("query_class", ["oak dining table"])
    assert scored.version == live


def test_click_model_scores_session_features(runtime: ModelRuntime) -> None:
    from streamtune.core.features import vectorize
    from streamtune.datasets.loaders import load_sessions

    rows = load_sessions(Settings().model.data_dir)[:200]
    scored = runtime.score("purchase_intent", [vectorize(r) for r in rows])
    p = scored.probs[:, 0]
    assert scored.version == 1 and p.shape == (200,)
    assert ((p >= 0) & (p <= 1)).all()
    bought = [pi for pi, r in zip(p, rows, strict=True) if r["Revenue"] == "1"]
    not_bought = [pi for pi, r in zip(p, rows, strict=True) if r["Revenue"] == "0"]
    assert sum(bought) / len(bought) > sum(not_bought) / len(not_bought)


def test_length_sorted_chunks_return_results_in_input_order(runtime: ModelRuntime) -> None:
    from streamtune.datasets import loaders as data

    texts = [r.model_text() for r in data.load_reviews(Settings().model.data_dir)[:40]]
    runtime.batch_size = 8
    try:
        together = runtime.score("review_sentiment", texts).probs
    finally:
        runtime.batch_size = 32
    one_by_one = np.concatenate([runtime.score("review_sentiment", [t]).probs for t in texts])
    assert together.shape == (40, 3)
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)


def test_length_chunks_sort_by_length_and_keep_every_row() -> None:
    from streamtune.model.tokens import length_chunks

    chunks = length_chunks([5, 1, 3, 1, 9, 2], 4)
    assert chunks == [[1, 3, 5, 2], [0, 4]]
    assert sorted(i for c in chunks for i in c) == list(range(6))


def test_swapped_out_torch_adapters_are_unloaded_and_a_rollback_reloads_them(
    runtime: ModelRuntime, registry_copy: LocalRegistry
) -> None:
    """Each release used to add a LoRA adapter (and a head) to the shared encoder for good:
    memory grew with every release. Only the versions a route uses stay loaded now."""
    from streamtune.model.runtime import Route

    task = "review_sentiment"
    for v in (30, 31, 32):
        _copy_version(registry_copy, task, 1, v)
    _copy_version(registry_copy, task, 1, 33, "corrupt_matching_checksum")
    _copy_version(registry_copy, "purchase_intent", 1, 30)
    start = runtime.active[task].manifest.version

    def in_use() -> set[str]:
        return {
            a.name
            for r in runtime.routes.values()
            for a in (r.live, r.canary)
            if a is not None and a.head is not None  # torch text versions: adapters in the encoder
        }

    def held() -> set[str]:
        return set(runtime._peft.peft_config)

    def lora_tensors() -> int:
        return sum(1 for n, _ in runtime._base.named_parameters() if "lora_" in n)

    try:
        runtime.activate(runtime.load(task, 30))
        assert held() == in_use() and f"{task}@v30" in held()
        per_adapter = lora_tensors() // len(held())
        runtime.set_route(
            task, Route(live=runtime.load(task, 30), canary=runtime.load(task, 31), fraction=0.5)
        )
        assert held() == in_use() >= {f"{task}@v30", f"{task}@v31"}
        runtime.activate(runtime.load(task, 32))
        assert held() == in_use() and not held() & {f"{task}@v30", f"{task}@v31"}
        assert (task, 30) not in runtime._loaded and (task, 31) not in runtime._loaded
        assert lora_tensors() == per_adapter * len(held())
        with pytest.raises(AdapterError, match="cannot load"):
            runtime.load(task, 33)  # a failed load leaves nothing behind either
        assert held() == in_use()
        runtime.activate(runtime.load(task, 30))  # a rollback loads it again
        assert runtime.score(task, REVIEWS).version == 30
        assert held() == in_use() and lora_tensors() == per_adapter * len(held())
        # The click model: each version is a peft model of its own, dropped with its version.
        runtime.activate(runtime.load("purchase_intent", 30))
        assert ("purchase_intent", 1) not in runtime._loaded
        runtime.activate(runtime.load("purchase_intent", 1))
        assert ("purchase_intent", 30) not in runtime._loaded
    finally:
        runtime.activate(runtime.load(task, start))
    assert held() == in_use()
