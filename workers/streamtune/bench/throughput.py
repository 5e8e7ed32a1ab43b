"""``streamtune bench throughput``: ours vs a naive consumer vs the raw model ceiling, one run.

1. **Ceiling** per backend: tokenize + forward only (the runtime's own forward), length-sorted
   windows like the scorer's, best model batch size, on real review texts and real queries.
2. **streamtune end to end**: a real scorer on the embedded broker and Redis; N events replayed
   as fast as possible; throughput = N / (first produce → last result). Latency (event time →
   result published, after its Redis write) p50/p95/p99 at 50 % and 90 % of that rate.
3. **Naive baseline**: what people write by hand: a kafka-python consumer, a transformers
   ``pipeline`` called on one message at a time, one Redis command per result.
4. Ratios, label agreement of each backend with fp32, scorer peak RSS and CPU per 1,000 events,
   and the cost per million events at ``price_per_hour``.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from kafka import KafkaConsumer, KafkaProducer

from streamtune.registry import LocalRegistry
from streamtune.replay import plan, replay
from streamtune.settings import Settings
from streamtune.stack import EmbeddedKafka, ensure_redis, find_free_port
from streamtune.topics import ensure_topics
from streamtune.training import data
from streamtune.workers import Worker

log = structlog.get_logger(__name__)
TEXT_TASKS = ("review_sentiment", "query_class")
INPUT = {"review_sentiment": "events.review", "query_class": "events.search"}
OUTPUT = {"review_sentiment": "scores.review", "query_class": "scores.search"}


@dataclass(frozen=True)
class ThroughputConfig:
    backends: tuple[str, ...] = ("torch", "torch-bf16")
    texts: int = 512  # per task, for the ceiling
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    window: int = 128  # events per scorer batch (STREAMTUNE_BATCH_MAX_EVENTS)
    rounds: int = 3
    events: int = 1500  # per task, end to end
    latency_events: int = 400  # per task and load level
    naive_events: int = 300
    price_per_hour: float = 0.0856  # USD, 2 vCPU on-demand (see README: cost)
    round_cap_s: float = 20.0  # a ceiling round stops after this long (slow backends)
    e2e_min_share: float = 0.8  # end-to-end only for backends at least this fast as fp32 at the ceiling
    quick: bool = False

    @classmethod
    def quick_mode(cls) -> ThroughputConfig:
        return cls(
            texts=64, batch_sizes=(16,), rounds=1, events=120, latency_events=40, naive_events=30, quick=True
        )


def _texts(task: str, data_dir: Path, n: int) -> list[str]:
    if task == "review_sentiment":
        rows = [r.model_text() for r in data.load_reviews(data_dir)]
    else:
        rows = [q.query for q in data.load_queries(data_dir)]
    return (rows * (n // len(rows) + 1))[:n]


def ceiling(settings: Settings, cfg: ThroughputConfig) -> dict[str, Any]:
    """Sequences/s of tokenize + forward for each backend, task and model batch size."""
    from streamtune.model.runtime import ModelRuntime

    registry = LocalRegistry(settings.adapter_dir)
    out: dict[str, Any] = {}
    labels_fp32: dict[str, np.ndarray] = {}
    for backend in cfg.backends:
        rt = ModelRuntime(
            settings.base_model, registry, settings.max_seq_len, settings.torch_threads, backend=backend
        )
        for task in TEXT_TASKS:
            version = registry.default_version(task)
            assert version is not None
            rt.activate(rt.load(task, version))
            texts = _texts(task, settings.data_dir, cfg.texts)
            per_bs: dict[int, float] = {}
            for bs in cfg.batch_sizes:
                rt.batch_size = bs
                rt.score(task, texts[: min(len(texts), 16)])  # warm-up
                rates = []
                spent = 0.0
                for _ in range(cfg.rounds):
                    # A slow backend gets fewer windows and rounds (time-capped), never zero.
                    started, done = time.perf_counter(), 0
                    for i in range(0, len(texts), cfg.window):
                        rt.score(task, texts[i : i + cfg.window])
                        done += len(texts[i : i + cfg.window])
                        if time.perf_counter() - started > cfg.round_cap_s:
                            break
                    elapsed = time.perf_counter() - started
                    rates.append(done / elapsed)
                    spent += elapsed
                    if spent > 2 * cfg.round_cap_s:
                        break
                per_bs[bs] = statistics.median(rates)
            best = max(per_bs, key=lambda b: per_bs[b])
            rt.batch_size = best
            labels = np.concatenate(
                [
                    rt.score(task, texts[i : i + cfg.window]).probs.argmax(1)
                    for i in range(0, len(texts), cfg.window)
                ]
            )
            if backend == "torch":
                labels_fp32[task] = labels
            agreement = float((labels == labels_fp32[task]).mean()) if task in labels_fp32 else None
            out.setdefault(backend, {})[task] = {
                "per_batch_size": per_bs,
                "best_batch_size": best,
                "sequences_per_s": per_bs[best],
                "label_agreement_with_fp32": agreement,
            }
        del rt
    return out


def _proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and peak RSS in bytes of a process (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


def _scored(worker: Worker, task: str) -> float:
    for line in worker.metrics().splitlines():
        if line.startswith(f'streamtune_events_scored_total{{task="{task}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _latencies(s: Settings, task: str, n: int, since_ms: int) -> list[float]:
    """Seconds from event time to the result's publish time (after its Redis write)."""
    consumer = KafkaConsumer(
        s.topic(OUTPUT[task]),
        bootstrap_servers=s.bootstrap_servers.split(","),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=1000,
    )
    out: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while len(out) < n and time.monotonic() < deadline:
            for msg in consumer:
                if msg.timestamp < since_ms:
                    continue
                v = json.loads(msg.value)
                from datetime import datetime

                out.append(msg.timestamp / 1000 - datetime.fromisoformat(v["event_ts"]).timestamp())
                if len(out) >= n:
                    break
    finally:
        consumer.close()
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def end_to_end(
    settings: Settings, cfg: ThroughputConfig, backend: str, batch: int, work: Path
) -> dict[str, Any]:
    kafka = EmbeddedKafka(work_dir=work / f"kafka-{backend}")
    redis_srv = None
    scorer = None
    out: dict[str, Any] = {}
    try:
        kafka.start()
        redis_url, redis_srv = ensure_redis(None, work / f"redis-{backend}")
        tag = uuid.uuid4().hex[:6]
        s = settings.model_copy(
            update={
                "bootstrap_servers": kafka.bootstrap_servers,
                "redis_url": redis_url,
                "backend": backend,
                "topic_prefix": f"tp{tag}.",
                "group_id": f"tp-{tag}",
                "metrics_port": find_free_port(),
                "state_dir": work / f"state-{backend}",
                "batch_max_events": cfg.window,
                "model_batch_size": batch,
                "shadow": False,
            }
        )
        ensure_topics(s)
        scorer = Worker("scorer", s, work / f"scorer-{backend}.log").wait_ready()
        cpu0, _ = _proc_stats(scorer.proc.pid)
        for task in TEXT_TASKS:
            before = _scored(scorer, task)
            t_cpu0, _ = _proc_stats(scorer.proc.pid)
            started = time.monotonic()
            sent = replay(s, [task], cfg.events, 0.0, seed=11).sent[task]  # fewer when the data is short
            scorer.wait_for(
                lambda t=task, b=before, n=sent: _scored(scorer, t) - b >= n, 900, f"{task} results"
            )
            seconds = time.monotonic() - started
            t_cpu1, _ = _proc_stats(scorer.proc.pid)
            rate = sent / seconds
            res: dict[str, Any] = {
                "events": sent,
                "seconds": seconds,
                "events_per_s": rate,
                "scorer_cpu_s_per_1000": (t_cpu1 - t_cpu0) / sent * 1000,
            }
            # Fresh events when the data set has them; otherwise the same ones again (rescored and
            # republished; latency is read from the results published after `since`).
            skip = sent if sent >= cfg.events else 0
            for share in (0.5, 0.9):
                since = int(time.time() * 1000)
                n0 = _scored(scorer, task)
                paced = replay(s, [task], cfg.latency_events, rate * share, seed=12, skip=skip).sent[task]
                scorer.wait_for(
                    lambda t=task, n=n0, k=paced: _scored(scorer, t) - n >= k, 600, "paced results"
                )
                lat = _latencies(s, task, paced, since)
                res[f"latency_at_{int(share * 100)}pct"] = {
                    "rate": rate * share,
                    "p50_ms": _pct(lat, 50) * 1000,
                    "p95_ms": _pct(lat, 95) * 1000,
                    "p99_ms": _pct(lat, 99) * 1000,
                    "n": len(lat),
                }
            out[task] = res
        cpu1, peak = _proc_stats(scorer.proc.pid)
        out["scorer_peak_rss_mib"] = peak / 2**20
        out["scorer_cpu_s"] = cpu1 - cpu0
    finally:
        if scorer is not None:
            scorer.stop()
        if redis_srv is not None:
            redis_srv.stop()
        kafka.stop()
    return out


def naive(settings: Settings, cfg: ThroughputConfig, work: Path) -> dict[str, Any]:
    """One message at a time through a transformers pipeline, one Redis SET per result."""
    import redis as redis_lib
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import pipeline

    from streamtune.model.encoder import Head, load_base

    kafka = EmbeddedKafka(work_dir=work / "kafka-naive")
    redis_srv = None
    out: dict[str, Any] = {}
    registry = LocalRegistry(settings.adapter_dir)
    try:
        kafka.start()
        redis_url, redis_srv = ensure_redis(None, work / "redis-naive")
        s = settings.model_copy(
            update={"bootstrap_servers": kafka.bootstrap_servers, "topic_prefix": "naive."}
        )
        ensure_topics(s)
        client = redis_lib.Redis.from_url(redis_url)
        for task in TEXT_TASKS:
            version = registry.default_version(task)
            assert version is not None
            path = registry.fetch(task, version)
            tok, base = load_base(settings.base_model)
            merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
            weights = load_file(str(path / "head.safetensors"))
            head = Head(weights["linear.weight"].shape[1], weights["linear.weight"].shape[0])
            head.load_state_dict(weights)
            head.eval()
            pipe = pipeline(  # type: ignore[call-overload]
                "feature-extraction",
                model=merged,
                tokenizer=tok,
                framework="pt",
                tokenize_kwargs={"truncation": True, "max_length": settings.max_seq_len},
            )
            producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers.split(","), acks="all")
            for o in plan(s.data_dir, [task], cfg.naive_events, seed=13):
                producer.send(s.topic(INPUT[task]), key=o.key.encode(), value=o.value)
            producer.flush(60)
            producer.close()
            consumer = KafkaConsumer(
                s.topic(INPUT[task]),
                bootstrap_servers=s.bootstrap_servers.split(","),
                auto_offset_reset="earliest",
                group_id=f"naive-{task}",
                consumer_timeout_ms=5000,
            )
            done = 0
            started = time.monotonic()
            for msg in consumer:
                ev = json.loads(msg.value)
                text = ev.get("text") or ev.get("query")
                with torch.inference_mode():
                    hidden = torch.tensor(pipe(text)[0])  # (tokens, hidden)
                    probs = torch.softmax(head(hidden.mean(0, keepdim=True)), dim=-1)[0]
                client.set(f"naive:{task}:{ev['event_id']}", json.dumps({"label": int(probs.argmax())}))
                done += 1
                if done >= cfg.naive_events:
                    break
            seconds = time.monotonic() - started
            consumer.close()
            out[task] = {"events": done, "seconds": seconds, "events_per_s": done / seconds}
        client.close()
    finally:
        if redis_srv is not None:
            redis_srv.stop()
        kafka.stop()
    return out


def _agreement(ceiling_row: dict[str, Any]) -> float:
    a = ceiling_row["label_agreement_with_fp32"]
    return 1.0 if a is None else float(a)  # None: fp32 itself


@dataclass
class ThroughputReport:
    config: dict[str, Any]
    ceiling: dict[str, Any] = field(default_factory=dict)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    naive: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    default_backend: str = "torch"


def run(settings: Settings, cfg: ThroughputConfig, work: Path, out_dir: Path | None) -> dict[str, Any]:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rep = ThroughputReport(config=asdict(cfg))
    rep.ceiling = ceiling(settings, cfg)
    fp32 = rep.ceiling["torch"]["review_sentiment"]["sequences_per_s"]
    for backend in cfg.backends:
        share = rep.ceiling[backend]["review_sentiment"]["sequences_per_s"] / fp32
        if backend != "torch" and share < cfg.e2e_min_share:
            rep.skipped[backend] = f"ceiling {share:.2f}× torch fp32 on reviews here: end to end not run"
            continue
        best = rep.ceiling[backend]["review_sentiment"]["best_batch_size"]
        rep.end_to_end[backend] = end_to_end(settings, cfg, backend, best, work)
    rep.naive = naive(settings, cfg, work)
    eligible = [
        b for b in rep.end_to_end
        if all(_agreement(rep.ceiling[b][t]) >= 0.99 for t in TEXT_TASKS)
    ]  # fmt: skip
    rep.default_backend = max(eligible, key=lambda b: rep.end_to_end[b]["review_sentiment"]["events_per_s"])
    for backend in rep.end_to_end:
        for task in TEXT_TASKS:
            e2e = rep.end_to_end[backend][task]["events_per_s"]
            rep.ratios[f"{backend}/{task}"] = {
                "end_to_end_over_ceiling": e2e / rep.ceiling[backend][task]["sequences_per_s"],
                "end_to_end_over_naive": e2e / rep.naive[task]["events_per_s"],
                "ceiling_over_torch_fp32": rep.ceiling[backend][task]["sequences_per_s"]
                / rep.ceiling["torch"][task]["sequences_per_s"],
            }
            per_hour = e2e * 3600
            rep.cost[f"{backend}/{task}"] = {
                "usd_per_million_events": cfg.price_per_hour / per_hour * 1e6,
                "price_per_hour_usd": cfg.price_per_hour,
            }
    result = asdict(rep)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "bench-throughput-quick" if cfg.quick else "benchmarks"
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / f"{name}.md").write_text(markdown(result) + "\n")
    return result


def markdown(r: dict[str, Any]) -> str:
    cfg = r["config"]
    lines = [
        "# Throughput and cost (`streamtune bench throughput`)",
        "",
        f"Same machine, same events, one run. Ceiling: tokenize + forward only, windows of "
        f"{cfg['window']} events sorted by length, best model batch size. End to end: a real scorer "
        "on the embedded broker and Redis, events replayed as fast as possible. Naive: kafka-python + "
        "transformers pipeline, one message at a time, one Redis SET per result.",
        "",
        "| backend | task | ceiling seq/s (batch) | end-to-end ev/s | naive ev/s | e2e ÷ ceiling "
        "| e2e ÷ naive | agreement with fp32 | p50 / p95 / p99 ms at 50 % | p99 ms at 90 % "
        "| CPU s / 1000 ev | USD / 1M ev |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, tasks in r["ceiling"].items():
        for task, c in tasks.items():
            if backend not in r["end_to_end"]:
                agree = c["label_agreement_with_fp32"]
                lines.append(
                    f"| {backend} | {task} | {c['sequences_per_s']:.0f} ({c['best_batch_size']}) | – "
                    f"| {r['naive'][task]['events_per_s']:.1f} | – | – | {agree:.3f} | – | – | – | – |"
                )
                continue
            e = r["end_to_end"][backend][task]
            ratio = r["ratios"][f"{backend}/{task}"]
            l50, l90 = e["latency_at_50pct"], e["latency_at_90pct"]
            agree = c["label_agreement_with_fp32"]
            usd = r["cost"][f"{backend}/{task}"]["usd_per_million_events"]
            lines.append(
                f"| {backend} | {task} | {c['sequences_per_s']:.0f} ({c['best_batch_size']}) "
                f"| {e['events_per_s']:.0f} "
                f"| {r['naive'][task]['events_per_s']:.1f} | {ratio['end_to_end_over_ceiling']:.2f} "
                f"| {ratio['end_to_end_over_naive']:.1f}× | {'–' if agree is None else f'{agree:.3f}'} "
                f"| {l50['p50_ms']:.0f} / {l50['p95_ms']:.0f} / {l50['p99_ms']:.0f} | {l90['p99_ms']:.0f} "
                f"| {e['scorer_cpu_s_per_1000']:.1f} | {usd:.2f} |"
            )
    lines.append("")
    for backend, e in r["end_to_end"].items():
        lines.append(
            f"Scorer peak RSS ({backend}, three tasks loaded): {e['scorer_peak_rss_mib']:.0f} MiB.  "
        )
    for backend, why in r["skipped"].items():
        lines.append(f"{backend}: {why}.  ")
    lines.append(
        f"Default backend decided by this run (fastest end to end with ≥ 99 % label agreement): "
        f"**{r['default_backend']}**. Cost at {r['config']['price_per_hour']} USD per hour for 2 vCPU."
    )
    return "\n".join(lines)
