"""``streamtune bench update``: what one online update costs and gains, measured in one run.

1. **Fine-tune**: one trainer run (the trainer's own code path) on N labels of the drifted
   "critical wave" (:mod:`streamtune.devtools.demo.drift`) that version 1 never saw, warm-started from v1.
2. **Accuracy before / after** on held-out drifted rows (never trained on), and on the natural
   mix (the trainer's reference set).
3. **Swap**: a real scorer on the embedded broker and Redis scores a steady review stream; the
   new version is promoted mid-stream. Reported: time from the release record to the first
   result of the new version, the longest gap between batches around the swap beside the
   longest gap in steady state, results of the old version after the swap, events lost.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import statistics
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from kafka import KafkaConsumer

from streamtune.core.errors import AdapterError, StartupError
from streamtune.core.settings import Settings
from streamtune.core.tasks import CLICK, QUERY, REVIEW
from streamtune.devtools.bench import curve
from streamtune.devtools.bench.curve import CurveConfig
from streamtune.devtools.demo.drift import critical_wave
from streamtune.devtools.demo.replay import replay
from streamtune.devtools.stack import EmbeddedKafka, ensure_redis, find_free_port
from streamtune.devtools.workers import Worker
from streamtune.kafka.topics import ensure_topics
from streamtune.rollout.registry import LocalRegistry
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import promote
from streamtune.training.bootstrap import v1_training_texts
from streamtune.training.candidate import OnlineConfig, _TextModel, evaluate, reference_set, train_candidate
from streamtune.training.online import Example, select

log = structlog.get_logger(__name__)
TASK = REVIEW.name


@dataclass(frozen=True)
class UpdateBenchConfig:
    labels: int = 2000  # trained on (the holdout the gate uses comes on top)
    holdout_fraction: float = 0.2
    epochs: int = 1
    budget_s: float = 3600.0
    eval_rows: int = 0  # held-out drifted rows (0: all)
    # Review events/s during the swap: below the fp32 scorer's capacity on 2 cores (about 20/s at
    # 128 tokens), so gaps show the swap itself rather than a backlog.
    swap_rate: float = 12.0
    swap_results: int = 300  # results of each version to wait for
    seed: int = 13
    curve: CurveConfig = field(default_factory=CurveConfig)  # the two speeds (devtools/bench/curve.py)
    parts: tuple[str, ...] = ("finetune", "swap", "curve")

    @classmethod
    def quick(cls) -> UpdateBenchConfig:
        return cls(labels=96, eval_rows=90, budget_s=120.0, swap_results=60,
                   curve=CurveConfig(sizes=(60, 120), eval_rows=60, budget_s=120.0))  # fmt: skip


def _examples(settings: Settings, cfg: UpdateBenchConfig) -> list[Example]:
    """Drifted training-split reviews that version 1 did not train on."""
    v1_texts = v1_training_texts(TASK, settings.model.data_dir)
    wave = critical_wave(settings.model.data_dir, "train", exclude_texts=v1_texts)
    total = math.ceil(cfg.labels / (1 - cfg.holdout_fraction))
    if total > len(wave):
        raise StartupError(f"--labels {cfg.labels}: the drifted training pool has {len(wave)} rows")
    return [
        Example(f"{TASK}:review-{r.review_id}", r.model_text(), r.label, 0, i, float(i), seq=i)
        for i, r in enumerate(wave[:total])
    ]


def finetune(settings: Settings, cfg: UpdateBenchConfig, registry: LocalRegistry) -> dict[str, Any]:
    ts = select(_examples(settings, cfg), -1, cfg.holdout_fraction, 0.0, cfg.seed)
    reference = reference_set(TASK, settings.model.data_dir, settings.trainer.reference_rows)
    online = OnlineConfig(
        epochs=cfg.epochs, lr=settings.trainer.lr, budget_s=cfg.budget_s, margin=settings.trainer.margin,
        tolerance=settings.trainer.reference_tolerance, max_len=settings.model.max_seq_len, seed=cfg.seed,
    )  # fmt: skip
    out = train_candidate(TASK, 1, ts, reference, registry, settings.model.base_model, online)
    m = out.manifest
    held = critical_wave(settings.model.data_dir, "held_out")
    if cfg.eval_rows:
        held = held[: cfg.eval_rows]
    xs, ys = [r.model_text() for r in held], [r.label for r in held]
    labels = m.labels

    def accuracy_of(version: int) -> dict[str, float]:
        model = _TextModel(
            settings.model.base_model, registry.fetch(TASK, version), labels, settings.model.max_seq_len,
            registry.manifest(TASK, version).cascade, inference_only=True,
        )  # fmt: skip
        return evaluate(TASK, labels, ys, model.predict(xs))

    before, after = accuracy_of(1), accuracy_of(m.version)
    fit_s = float(m.training["fit_seconds"])
    return {
        "labels": len(ts.fresh),
        "holdout_labels": len(ts.holdout),
        "fit_seconds": fit_s,
        "labels_per_second": len(ts.fresh) * cfg.epochs / fit_s if fit_s else None,
        "run_seconds": m.training["seconds"],
        "budget_reached": m.training["budget_reached"],
        "candidate_version": m.version,
        "gate": {k: m.gate[k] for k in ("passed", "reason", "metric")},
        "drifted_held_out_rows": len(ys),
        "drifted_before": before,
        "drifted_after": after,
        "natural_before": m.gate["reference"]["live"],
        "natural_after": m.gate["reference"]["candidate"],
    }


def _collect(settings: Settings, out: list[tuple[float, int, str]], stop: threading.Event) -> None:
    consumer = KafkaConsumer(
        settings.topic("scores.review"),
        bootstrap_servers=settings.kafka.bootstrap_servers.split(","),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=300,
    )
    try:
        while not stop.is_set():
            for msg in consumer:
                v = json.loads(msg.value)
                at = datetime.fromisoformat(v["scored_at"]).timestamp()
                out.append((at, int(v["adapter"]["version"]), v["event_id"]))
    finally:
        consumer.close()


def swap(
    base: Settings, cfg: UpdateBenchConfig, registry_dir: Path, new_version: int, work: Path
) -> dict[str, Any]:
    kafka = EmbeddedKafka(work_dir=work / "kafka")
    redis_srv = None
    stop = threading.Event()
    scorer = None
    try:
        kafka.start()
        redis_url, redis_srv = ensure_redis(None, work / "redis")
        tag = uuid.uuid4().hex[:6]
        s = base.replace(
                bootstrap_servers=kafka.bootstrap_servers, redis_url=redis_url,
                adapter_dir=registry_dir, topic_prefix=f"bench{tag}.", group_id=f"bench-{tag}",
                metrics_port=find_free_port(), state_dir=work / "state", log_json=True,
        )  # fmt: skip
        ensure_topics(s)
        releases = ReleaseLog(s)
        reg = LocalRegistry(registry_dir)
        for task, version in ((REVIEW.name, 1), (QUERY.name, 1), (CLICK.name, 1)):
            releases.publish(promote(task, version, reg.manifest_sha256(task, version), by="bench"))
        scorer = Worker("scorer", s, work / "scorer.log").wait_ready()
        results: list[tuple[float, int, str]] = []
        threading.Thread(target=_collect, args=(s, results, stop), daemon=True).start()
        report: dict[str, Any] = {}

        def produce() -> None:
            r = replay(s, [TASK], 1_000_000, cfg.swap_rate, reviews="critical", should_stop=stop.is_set)
            report["sent"] = r.sent[TASK]

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        scorer.wait_for(lambda: len(results) >= cfg.swap_results, 600, "steady-state results")
        # As the trainer does: an ONNX deployment gets the new version's artifact before the release.
        from streamtune.model.onnx_export import ensure_artifact

        art = ensure_artifact(s, reg, TASK, new_version)
        if art is not None and not art.passed:
            raise AdapterError(
                f"{TASK} v{new_version}: {art.backend} artifact refused by its gate ({art.agreement:.4f})"
            )
        released_at = time.time()
        # The swap is measured whatever the gate said: a rejected candidate is released forced,
        # as an operator would (`adapters promote --force`); scorers refuse it otherwise.
        forced = not reg.manifest(TASK, new_version).releasable
        sha = reg.manifest_sha256(TASK, new_version)
        releases.publish(promote(TASK, new_version, sha, by="bench", forced=forced))
        scorer.wait_for(
            lambda: sum(1 for r in list(results) if r[1] == new_version) >= cfg.swap_results,
            600,
            "results of the new version",
        )
        stop.set()
        producer.join(timeout=60)
        sent = report.get("sent", 0)
        stop_collect = threading.Event()
        late: list[tuple[float, int, str]] = []
        t = threading.Thread(target=_collect, args=(s, late, stop_collect), daemon=True)
        t.start()
        scorer.wait_for(lambda: len({e for _, _, e in late}) >= sent, 120, "every event's result")
        stop_collect.set()
        t.join(timeout=10)
        scorer_metrics = _batch_stats(scorer.metrics())
    finally:
        stop.set()
        if scorer is not None:
            scorer.stop()
        if redis_srv is not None:
            redis_srv.stop()
        kafka.stop()
    first_new = min(at for at, v, _ in late if v == new_version)
    batches = sorted({at for at, _, _ in late})
    gaps = [(b - a, b) for a, b in itertools.pairwise(batches)]
    steady = [g for g, end in gaps if end < released_at]
    around = [g for g, end in gaps if released_at <= end <= first_new + 2.0]
    return {
        "rate_events_per_s": cfg.swap_rate,
        "events_sent": sent,
        "results": len(late),
        "distinct_results": len({e for _, _, e in late}),
        "release_to_first_new_result_s": first_new - released_at,
        "longest_gap_during_swap_s": max(around, default=0.0),
        "longest_gap_steady_s": max(steady, default=0.0),
        "median_gap_steady_s": statistics.median(steady) if steady else 0.0,
        "old_version_results_after_swap": sum(1 for at, v, _ in late if v != new_version and at > first_new),
        **scorer_metrics,
    }


def _batch_stats(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("task") != TASK:
                continue
            if s.name == "streamtune_batch_size_count":
                out["batches"] = s.value
            elif s.name == "streamtune_batch_size_sum":
                out["batched_events"] = s.value
            elif s.name == "streamtune_model_seconds_sum":
                out["model_seconds"] = s.value
    if out.get("batches"):
        out["mean_batch_size"] = out["batched_events"] / out["batches"]
        out["mean_model_seconds_per_batch"] = out.get("model_seconds", 0.0) / out["batches"]
    return out


def run(settings: Settings, cfg: UpdateBenchConfig, work: Path, out_dir: Path | None) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    registry_dir = work / "adapters"
    shutil.copytree(settings.model.adapter_dir, registry_dir, ignore=shutil.ignore_patterns(".*"))
    for task in (REVIEW.name, QUERY.name, CLICK.name):  # keep only v1: a clean start
        for version in LocalRegistry(registry_dir).versions(task)[1:]:
            shutil.rmtree(registry_dir / task / str(version))
    registry = LocalRegistry(registry_dir)
    started = time.monotonic()
    result: dict[str, Any] = {"config": asdict(cfg)}
    if "finetune" in cfg.parts:
        result["finetune"] = finetune(settings, cfg, registry)
        if "swap" in cfg.parts:
            result["swap"] = swap(settings, cfg, registry_dir, result["finetune"]["candidate_version"], work)
    if "curve" in cfg.parts:  # from the shipped versions (the newest review version is live)
        curve_dir = work / "adapters-curve"
        shutil.copytree(
            settings.model.adapter_dir, curve_dir, ignore=shutil.ignore_patterns(".*", "artifacts")
        )
        result["curve"] = curve.run(settings, cfg.curve, LocalRegistry(curve_dir))
    result["seconds"] = round(time.monotonic() - started, 1)
    result["machine"] = _machine()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "bench-update-quick" if cfg == UpdateBenchConfig.quick() else "bench-update"
        if cfg.parts != UpdateBenchConfig().parts and cfg != UpdateBenchConfig.quick():
            name += "-" + "-".join(cfg.parts)
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / f"{name}.md").write_text(markdown(result) + "\n")
    return result


def _machine() -> dict[str, Any]:
    import os
    import platform

    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def markdown(r: dict[str, Any]) -> str:
    head = [
        "# One online update, measured (`streamtune bench update`)",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, torch {r['machine']['torch']} "
        f"({r['machine']['torch_threads']} threads). Whole run: {r['seconds']} s.",
    ]
    lines = _update_lines(r) if "swap" in r else head
    if "curve" in r:
        lines += curve.markdown(r["curve"])
    return "\n".join(lines)


def _update_lines(r: dict[str, Any]) -> list[str]:
    f, s = r["finetune"], r["swap"]
    nb, na = f["natural_before"].get("accuracy", math.nan), f["natural_after"].get("accuracy", math.nan)
    db, da = f["drifted_before"], f["drifted_after"]
    lines = [
        "# One online update, measured (`streamtune bench update`)",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, torch {r['machine']['torch']} "
        f"({r['machine']['torch_threads']} threads). Whole run: {r['seconds']} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| fine-tune on {f['labels']} drifted labels ({r['config']['epochs']} epoch, warm start from v1) "
        f"| {f['fit_seconds']:.1f} s ({f['labels_per_second']:.1f} labels/s) |",
        f"| whole trainer run (evaluation, gate, publish) | {f['run_seconds']:.1f} s |",
        f"| gate ({f['gate']['metric']} on {f['holdout_labels']} newest labels) | "
        f"{'passed' if f['gate']['passed'] else 'rejected'}: {f['gate']['reason']} |",
        f"| accuracy on {f['drifted_held_out_rows']} held-out drifted reviews, v1 → "
        f"v{f['candidate_version']} | {db['accuracy']:.3f} → {da['accuracy']:.3f} |",
        f"| macro-F1 on the same | {db['macro_f1']:.3f} → {da['macro_f1']:.3f} |",
        f"| accuracy on the natural mix (reference set) | {nb:.3f} → {na:.3f} |",
        f"| release → first result of the new version | {s['release_to_first_new_result_s'] * 1000:.0f} ms |",
        f"| longest gap between batches during the swap | {s['longest_gap_during_swap_s'] * 1000:.0f} ms |",
        f"| longest / median gap in steady state | {s['longest_gap_steady_s'] * 1000:.0f} ms / "
        f"{s['median_gap_steady_s'] * 1000:.0f} ms |",
        f"| old-version results after the swap | {s['old_version_results_after_swap']} |",
        f"| events sent / distinct results ({s['rate_events_per_s']:.0f} events/s) | "
        f"{s['events_sent']} / {s['distinct_results']} |",
    ]
    return lines
