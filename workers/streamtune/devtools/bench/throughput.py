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
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from kafka import KafkaConsumer, KafkaProducer

from streamtune.core.settings import Settings
from streamtune.core.tasks import CLICK, QUERY, REVIEW, TASKS, TEXT_TASKS
from streamtune.datasets import loaders as data
from streamtune.devtools.demo.replay import plan, replay
from streamtune.devtools.stack import EmbeddedKafka, ensure_redis, find_free_port
from streamtune.devtools.workers import Worker
from streamtune.kafka.topics import ensure_topics
from streamtune.rollout.registry import LocalRegistry

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ThroughputConfig:
    backends: tuple[str, ...] = ("torch", "torch-bf16", "onnx-fp32", "onnx-int8")
    texts: int = 512  # per task, for the ceiling
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    window: int = 128  # events per scorer batch (STREAMTUNE_BATCH_MAX_EVENTS)
    rounds: int = 3
    events: int = 1500  # per task, end to end
    latency_events: int = 400  # per task and load level
    naive_events: int = 300
    price_per_hour: float = 0.0856  # USD, 2 vCPU on-demand (see docs/performance.md: cost)
    round_cap_s: float = 20.0  # a ceiling round stops after this long (slow backends)
    export_eval_rows: int = 1000  # held-out rows an exported artifact is gated on
    scale_out: bool = True  # also run the tuned configuration as one scorer per core
    profile_s: float = 20.0  # py-spy the tuned scorer this long under full load (0: off)
    quick: bool = False

    @classmethod
    def quick_mode(cls) -> ThroughputConfig:
        return cls(
            backends=("torch", "onnx-fp32", "onnx-int8"),
            texts=64,
            batch_sizes=(16,),
            rounds=1,
            events=120,
            latency_events=40,
            naive_events=30,
            export_eval_rows=60,
            scale_out=False,
            profile_s=3.0,
            quick=True,
        )


# what each text task's model reads, from the shipped rows
_TEXTS: dict[str, Callable[[Path], list[str]]] = {
    REVIEW.name: lambda d: [r.model_text() for r in data.load_reviews(d)],
    QUERY.name: lambda d: [q.query for q in data.load_queries(d)],
}


def _texts(task: str, data_dir: Path, n: int) -> list[str]:
    rows = _TEXTS[task](data_dir)
    return (rows * (n // len(rows) + 1))[:n]


def export_artifacts(settings: Settings, cfg: ThroughputConfig) -> dict[str, Any]:
    """Export every ONNX backend's artifact of each text task's default version (and the click
    MLP's fp32 one), through the gate a release goes through; returns what each export recorded."""
    from streamtune.model.onnx_export import ONNX_BACKENDS, export_for

    registry = LocalRegistry(settings.model.adapter_dir)
    out: dict[str, Any] = {}
    jobs = [(b, t) for b in cfg.backends if b in ONNX_BACKENDS for t in TEXT_TASKS]
    if jobs:  # an all-ONNX scorer runs the click MLP in ONNX Runtime too (fp32)
        jobs.append(("onnx-fp32", CLICK.name))
    for backend, task in jobs:
        version = registry.default_version(task)
        assert version is not None
        art = registry.artifact(task, version, backend) or export_for(
            settings, registry, task, version, backend
        )
        size = sum(f.stat().st_size for f in registry.artifact_dir(task, version, backend).iterdir())
        out.setdefault(backend, {})[task] = {
            "version": version,
            "passed": art.passed,
            "agreement": art.agreement,
            "eval_rows": art.eval_rows,
            "plan": art.details.get("plan"),
            "fp32_matmuls": len(art.fp32_nodes),
            "export_seconds": art.details.get("seconds"),
            "size_mib": size / 2**20,
        }
    return out


def ceiling(settings: Settings, cfg: ThroughputConfig, artifacts: dict[str, Any]) -> dict[str, Any]:
    """Sequences/s of tokenize + forward for each backend, task and model batch size."""
    from streamtune.model.runtime import ModelRuntime

    registry = LocalRegistry(settings.model.adapter_dir)
    out: dict[str, Any] = {}
    labels_fp32: dict[str, np.ndarray] = {}
    for backend in cfg.backends:
        usable = [t for t in TEXT_TASKS if artifacts.get(backend, {}).get(t, {}).get("passed", True)]
        for task in set(TEXT_TASKS) - set(usable):
            art = artifacts[backend][task]
            out.setdefault(backend, {})[task] = {
                "refused": f"artifact agreement {art['agreement']:.3f} < gate",
                "label_agreement_with_fp32": art["agreement"],
            }
        if not usable:
            continue
        rt = ModelRuntime(
            settings.model.base_model,
            registry,
            settings.model.max_seq_len,
            settings.model.torch_threads,
            backend=backend,
        )
        for task in usable:
            version = registry.default_version(task)
            assert version is not None
            rt.activate(rt.load(task, version))
            texts = _texts(task, settings.model.data_dir, cfg.texts)
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


def tuned(ceil: dict[str, Any], artifacts: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Per task: the fastest backend at the ceiling whose labels agree with fp32 on >= 99 % (of
    the bench texts and, for exported artifacts, of the held-out slice), with its best batch."""
    out: dict[str, tuple[str, int]] = {}
    for task in TEXT_TASKS:
        ok = [
            b
            for b, rows in ceil.items()
            if "sequences_per_s" in rows.get(task, {})
            and _agreement(rows[task]) >= 0.99
            and artifacts.get(b, {}).get(task, {}).get("passed", True)
        ]
        best = max(ok, key=lambda b: ceil[b][task]["sequences_per_s"])
        out[task] = (best, ceil[best][task]["best_batch_size"])
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


def _paths(worker: Worker, task: str) -> Counter[str]:
    """Results per answer path so far (``streamtune_results_by_path_total``)."""
    out: Counter[str] = Counter()
    for line in worker.metrics().splitlines():
        if line.startswith("streamtune_results_by_path_total{") and f'task="{task}"' in line:
            path = line.split('path="', 1)[1].split('"', 1)[0]
            out[path] += int(float(line.rsplit(" ", 1)[1]))
    return out


def _latencies(s: Settings, task: str, n: int, since_ms: int) -> list[float]:
    """Seconds from event time to the result's publish time (after its Redis write)."""
    consumer = KafkaConsumer(
        s.topic(TASKS[task].output_topic),
        bootstrap_servers=s.kafka.bootstrap_servers.split(","),
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


@dataclass(frozen=True)
class E2EConfig:
    """One scorer deployment measured end to end."""

    name: str
    backends: dict[str, str]  # text task -> backend
    batches: dict[str, int]  # text task -> model batch size
    scorers: int = 1
    threads: int = 0  # per scorer (0: one per core)
    profile_s: float = 0.0  # py-spy in a separate pass after the measured ones (0: off)
    depth: int = 2  # STREAMTUNE_PIPELINE_DEPTH: batches in progress per task (1: no overlap)
    tasks: tuple[str, ...] = TEXT_TASKS  # the tasks measured
    adapter_dir: str = ""  # another registry than the bench's copy ("": that copy)
    early_answers: bool = False  # STREAMTUNE_EARLY_ANSWERS: linear answers published first


def _ready(worker: Worker) -> bool:
    url = f"http://127.0.0.1:{worker.settings.ops.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _profile(pid: int, seconds: float, out: Path) -> dict[str, Any]:
    """py-spy samples of a running scorer: the share of samples per leaf function (self time)
    and per stage (a frame anywhere on the stack), over every thread that was not idle."""
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid),
           "--duration", str(max(1, round(seconds))), "--format", "raw", "--rate", "50",
           "--nonblocking", "--output", str(out)]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=seconds + 60)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"py-spy failed: {e}"}
    leaves: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaves[frames[-1].split(" (")[0]] += n
        for stage, needles in PROFILE_STAGES.items():
            if any(needle in stack for needle in needles):
                stages[stage] += n
                break
        else:
            stages["other"] += n
    if not total:
        return {"error": "py-spy recorded no samples"}
    return {
        "samples": total,
        "top_self": [(name, n / total) for name, n in leaves.most_common(12)],
        "stages": {k: v / total for k, v in stages.most_common()},
    }


# First match wins: a sample counts for the first stage whose needle is on its stack.
PROFILE_STAGES: dict[str, tuple[str, ...]] = {
    "tokenize + pad": ("tokens.py",),
    "model forward (onnxruntime / torch)": ("run_text", "run_click", "_torch_text", "_forward ("),
    "decode + validate": ("decode.py", "split ("),
    "encode results": ("encode.py",),
    "redis write": ("sink.py", "redis/"),
    "kafka (faust/aiokafka)": ("aiokafka/", "faust/transport", "kafka/"),
    "faust streams + event loop": ("faust/", "asyncio/", "mode/"),
}


def end_to_end(settings: Settings, cfg: ThroughputConfig, dep: E2EConfig, work: Path) -> dict[str, Any]:
    kafka = EmbeddedKafka(work_dir=work / f"kafka-{dep.name}")
    redis_srv = None
    scorers: list[Worker] = []
    out: dict[str, Any] = {"deployment": asdict(dep)}
    try:
        kafka.start()
        redis_url, redis_srv = ensure_redis(None, work / f"redis-{dep.name}")
        tag = uuid.uuid4().hex[:6]
        s = settings.replace(
            bootstrap_servers=kafka.bootstrap_servers,
            redis_url=redis_url,
            backend="torch",
            task_backends=dep.backends,
            task_model_batch_size=dep.batches,
            topic_prefix=f"tp{tag}.",
            group_id=f"tp-{tag}",
            state_dir=work / f"state-{dep.name}",
            batch_max_events=cfg.window,
            torch_threads=dep.threads,
            pipeline_depth=dep.depth,
            early_answers=dep.early_answers,
            shadow=False,
            export_on_start=False,  # exported beforehand: start-up is not measured
        )
        if dep.adapter_dir:
            s = s.replace(adapter_dir=Path(dep.adapter_dir))
        ensure_topics(s)
        for i in range(dep.scorers):
            si = s.replace(metrics_port=find_free_port())
            scorers.append(Worker("scorer", si, work / f"scorer-{dep.name}-{i}.log").wait_ready())
        for w in scorers:  # partitions assigned (all scorers joined), adapters loaded, Redis reachable
            w.wait_for(lambda w=w: _ready(w), 120, "scorer ready")

        def scored(task: str) -> float:
            return sum(_scored(w, task) for w in scorers)

        def cpu() -> float:
            return sum(_proc_stats(w.proc.pid)[0] for w in scorers)

        def machine_cpu() -> dict[str, float]:
            """CPU seconds so far of everything on this machine the run involves."""
            out = {"scorers": cpu(), "replay (this process)": time.process_time()}
            if kafka.pid is not None:
                out["kafka broker"] = _proc_stats(kafka.pid)[0]
            if redis_srv is not None and redis_srv.pid is not None:
                out["redis"] = _proc_stats(redis_srv.pid)[0]
            return out

        def paths(task: str) -> Counter[str]:
            return sum((_paths(w, task) for w in scorers), Counter())

        cpu0 = cpu()
        for task in dep.tasks:
            before = scored(task)
            paths0 = paths(task)
            m_cpu0 = machine_cpu()
            started = time.monotonic()
            # The data set may hold fewer events than asked for (queries: 480): replay it again
            # until there are enough, so a short run's start-up does not dominate the rate.
            sent = unique = replay(s, [task], cfg.events, 0.0, seed=11).sent[task]
            while unique > 0 and sent < cfg.events:
                sent += replay(s, [task], min(unique, cfg.events - sent), 0.0, seed=11).sent[task]
            scorers[0].wait_for(lambda t=task, b=before, n=sent: scored(t) - b >= n, 900, f"{task} results")
            seconds = time.monotonic() - started
            m_cpu1 = machine_cpu()
            rate = sent / seconds
            # Where the cores went: the broker, Redis and the load generator share them with the
            # scorer here (the ceiling had them to itself).
            cores = os.cpu_count() or 1
            shares = {k: (m_cpu1[k] - m_cpu0[k]) / (seconds * cores) for k in m_cpu1}
            shares["idle or other"] = max(0.0, 1.0 - sum(shares.values()))
            res: dict[str, Any] = {
                "backend": dep.backends[task],
                "events": sent,
                "seconds": seconds,
                "events_per_s": rate,
                "scorer_cpu_s_per_1000": (m_cpu1["scorers"] - m_cpu0["scorers"]) / sent * 1000,
                "cpu_share": shares,
                "answer_paths": dict(paths(task) - paths0),  # results per path during the run
            }
            # Fresh events when the data set has them; otherwise the same ones again (rescored and
            # republished; latency is read from the results published after `since`).
            skip = unique if unique >= cfg.events else 0
            for share in (0.5, 0.9):
                since = int(time.time() * 1000)
                n0 = scored(task)
                paced = replay(s, [task], cfg.latency_events, rate * share, seed=12, skip=skip).sent[task]
                scorers[0].wait_for(lambda t=task, n=n0, k=paced: scored(t) - n >= k, 600, "paced results")
                lat = _latencies(s, task, paced, since)
                res[f"latency_at_{int(share * 100)}pct"] = {
                    "rate": rate * share,
                    "p50_ms": _pct(lat, 50) * 1000,
                    "p95_ms": _pct(lat, 95) * 1000,
                    "p99_ms": _pct(lat, 99) * 1000,
                    "n": len(lat),
                }
            if dep.profile_s > 0:  # its own pass: py-spy does not slow the measured ones
                n0 = scored(task)
                pool = ThreadPoolExecutor(1)
                fut = pool.submit(
                    _profile, scorers[0].proc.pid, dep.profile_s, work / f"profile-{dep.name}-{task}.txt"
                )
                want = max(1, int(rate * dep.profile_s * 1.2))
                k = 0
                while k < want:
                    got = replay(s, [task], min(unique or 1, want - k), 0.0, seed=13).sent[task]
                    if not got:
                        break
                    k += got
                res["profile"] = fut.result()
                pool.shutdown()
                scorers[0].wait_for(lambda t=task, n=n0, k=k: scored(t) - n >= k, 900, "profiled results")
            out[task] = res
        out["scorer_peak_rss_mib"] = max(_proc_stats(w.proc.pid)[1] for w in scorers) / 2**20
        out["scorer_cpu_s"] = cpu() - cpu0
    finally:
        for w in scorers:
            w.stop()
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
    registry = LocalRegistry(settings.model.adapter_dir)
    try:
        kafka.start()
        redis_url, redis_srv = ensure_redis(None, work / "redis-naive")
        s = settings.replace(bootstrap_servers=kafka.bootstrap_servers, topic_prefix="naive.")
        ensure_topics(s)
        client = redis_lib.Redis.from_url(redis_url)
        for task in TEXT_TASKS:
            version = registry.default_version(task)
            assert version is not None
            path = registry.fetch(task, version)
            tok, base = load_base(settings.model.base_model)
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
                tokenize_kwargs={"truncation": True, "max_length": settings.model.max_seq_len},
            )
            producer = KafkaProducer(bootstrap_servers=s.kafka.bootstrap_servers.split(","), acks="all")
            for o in plan(s.model.data_dir, [task], cfg.naive_events, seed=13):
                producer.send(s.topic(TASKS[task].input_topic), key=o.key.encode(), value=o.value)
            producer.flush(60)
            producer.close()
            consumer = KafkaConsumer(
                s.topic(TASKS[task].input_topic),
                bootstrap_servers=s.kafka.bootstrap_servers.split(","),
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


CASCADE_TASK = REVIEW.name


def cascade_registries(settings: Settings, cfg: ThroughputConfig, work: Path) -> dict[str, Any]:
    """Registries for the quality/cost trade-off of ``review_sentiment``, each a copy of the
    bench's with one default version: ``cascade`` (the newest with a linear stage; built with
    ``training/attach.py`` from the newest without one when the registry has none),
    ``transformer-only`` (the cascade's transformer files without its linear stage, so both
    rows serve the same transformer) and ``linear-only`` (the cascade's files with a rule that
    answers every in-domain review from the linear stage). Returns, per name, its directory and
    version."""
    import shutil

    from streamtune.model.cascade import LINEAR_ONLY
    from streamtune.model.linear import LINEAR_META, LINEAR_WEIGHTS
    from streamtune.training.attach import cascade_from
    from streamtune.training.bootstrap import TrainConfig

    src = settings.model.adapter_dir
    task_dir = lambda root: root / CASCADE_TASK  # noqa: E731
    versions = sorted(int(p.name) for p in task_dir(src).iterdir() if p.name.isdigit())
    reg = LocalRegistry(src)
    with_stage = [v for v in versions if reg.manifest(CASCADE_TASK, v).cascade]
    without = [v for v in versions if v not in with_stage]
    out: dict[str, Any] = {}

    def keep_only(name: str, version: int) -> LocalRegistry:
        root = work / f"registry-{name}"
        shutil.copytree(src, root)
        for v in versions:
            if v != version:
                shutil.rmtree(task_dir(root) / str(v))
        out[name] = {"adapter_dir": str(root), "version": version}
        return LocalRegistry(root)

    if with_stage:
        cascade_reg = keep_only("cascade", with_stage[-1])
    else:
        cascade_reg = keep_only("cascade", without[-1])
        small = (
            TrainConfig(linear_rows=3000, validation_rows=400, eval_rows=300) if cfg.quick else TrainConfig()
        )
        built = cascade_from(CASCADE_TASK, without[-1], settings.model.base_model, settings.model.data_dir,
                             cascade_reg, small)  # fmt: skip
        shutil.rmtree(task_dir(cascade_reg.root) / str(without[-1]))
        out["cascade"] = {
            "adapter_dir": str(cascade_reg.root),
            "version": built.version,
            "built_by_bench": True,
        }
    cascade_m = cascade_reg.manifest(CASCADE_TASK, out["cascade"]["version"])

    def derived(name: str, cascade_info: dict[str, Any], ignore: tuple[str, ...]) -> None:
        """The cascade version's files (less ``ignore``) as the only version of a new registry."""
        root = work / f"registry-{name}"
        shutil.copytree(cascade_reg.root, root)
        build = work / f"build-{name}"
        shutil.copytree(cascade_reg.fetch(CASCADE_TASK, cascade_m.version), build,
                        ignore=shutil.ignore_patterns("manifest.json", "artifacts", *ignore))  # fmt: skip
        m = LocalRegistry(root).publish(build, cascade_m.model_copy(update={
            "version": cascade_m.version + 1, "parent_version": cascade_m.version, "cascade": cascade_info,
            "files": {}, "signature": ""}))  # fmt: skip
        shutil.rmtree(task_dir(root) / str(cascade_m.version))
        out[name] = {"adapter_dir": str(root), "version": m.version}

    derived("transformer-only", {}, (LINEAR_WEIGHTS, LINEAR_META))
    derived("linear-only", {**cascade_m.cascade, "rule": LINEAR_ONLY.as_dict()}, ())
    return out


EARLY_ROW = "cascade-early-answers"  # the trade-off row with STREAMTUNE_EARLY_ANSWERS on


def tradeoff(
    settings: Settings,
    cfg: ThroughputConfig,
    work: Path,
    rep: ThroughputReport,
    best: dict[str, tuple[str, int]],
) -> dict[str, Any]:
    """Quality against cost for ``review_sentiment``, on the same events: naive, transformer-only
    (today's tuned scorer), the cascade, and the linear stage alone. The held-out metric of each
    is what training recorded for the cascade version on the fixed held-out split, each path on
    the same rows (the transformer alone is the transformer-only configuration's model); the rest
    is measured here."""
    from streamtune.model.onnx_export import ONNX_BACKENDS, export_for

    regs = cascade_registries(settings, cfg, work)
    cascade_m = LocalRegistry(Path(regs["cascade"]["adapter_dir"])).manifest(
        CASCADE_TASK, regs["cascade"]["version"]
    )
    held = cascade_m.cascade["held_out"]  # every configuration scored on the same held-out rows
    quality = {
        "transformer-only": held["transformer"],
        "cascade": held["cascade"],
        "linear-only": held["linear"],
    }
    quality[EARLY_ROW] = held["cascade"]
    backend, batch = best[CASCADE_TASK]
    rows: dict[str, Any] = {}
    # (row, registry, linear answers published first): the cascade also with its linear answers
    # ahead of the transformer's rows of their batch (off by default: it reorders per product)
    runs = [(name, name, False) for name in regs]
    runs.insert(1, (EARLY_ROW, "cascade", True))
    for name, reg_name, early in runs:
        info = regs[reg_name]
        reg = LocalRegistry(Path(info["adapter_dir"]))
        if backend in ONNX_BACKENDS and reg.artifact(CASCADE_TASK, info["version"], backend) is None:
            # its own artifact, derived from its own manifest (a copied version has its own already)
            export_for(settings.replace(adapter_dir=reg.root), reg, CASCADE_TASK, info["version"], backend)
        backends = {t: b for t, (b, _) in best.items()}
        batches = {t: n for t, (_, n) in best.items()}
        dep = E2EConfig(name, backends, batches, tasks=(CASCADE_TASK,), adapter_dir=info["adapter_dir"],
                        early_answers=early)  # fmt: skip
        e2e = end_to_end(settings, cfg, dep, work)[CASCADE_TASK]
        answered = e2e.get("answer_paths", {})
        total = sum(answered.values())
        rows[name] = {
            "version": info["version"],
            "backend": backend,
            "batch": batch,
            "held_out": dict(quality[name]),
            "events_per_s": e2e["events_per_s"],
            "share_linear": answered.get("linear", 0) / total if total else 0.0,
            "latency_at_50pct": e2e["latency_at_50pct"],
            "latency_at_90pct": e2e["latency_at_90pct"],
            "scorer_cpu_s_per_1000": e2e["scorer_cpu_s_per_1000"],
            "usd_per_million_events": cfg.price_per_hour / (e2e["events_per_s"] * 3600) * 1e6,
        }
    naive = rep.naive[CASCADE_TASK]
    rows["naive"] = {
        "version": regs["transformer-only"]["version"],
        "held_out": rows["transformer-only"]["held_out"],  # the same model, one message at a time
        "events_per_s": naive["events_per_s"],
        "share_linear": 0.0,
        "usd_per_million_events": cfg.price_per_hour / (naive["events_per_s"] * 3600) * 1e6,
    }
    return {
        "task": CASCADE_TASK,
        "rows": rows,
        "baselines": dict(cascade_m.baselines),
        "rule": cascade_m.cascade.get("rule"),
        "validation_share_linear": cascade_m.cascade.get("share_linear"),
        "held_out_rows": held["rows"],
        "built_by_bench": bool(regs["cascade"].get("built_by_bench")),
    }


def _agreement(ceiling_row: dict[str, Any]) -> float:
    a = ceiling_row["label_agreement_with_fp32"]
    return 1.0 if a is None else float(a)  # None: fp32 itself


@dataclass
class ThroughputReport:
    config: dict[str, Any]
    artifacts: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[str, Any] = field(default_factory=dict)
    tuned: dict[str, Any] = field(default_factory=dict)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    naive: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    tradeoff: dict[str, Any] = field(default_factory=dict)


def deployments(
    cfg: ThroughputConfig, best: dict[str, tuple[str, int]], ceil: dict[str, Any]
) -> list[E2EConfig]:
    """torch fp32 as shipped before; the tuned per-task choice; the tuned choice one scorer per core."""
    fp32 = E2EConfig(
        "torch-fp32",
        {t: "torch" for t in TEXT_TASKS},
        {t: ceil["torch"][t]["best_batch_size"] for t in TEXT_TASKS},
    )
    deps = [fp32]
    backends = {t: b for t, (b, _) in best.items()}
    batches = {t: n for t, (_, n) in best.items()}
    deps.append(E2EConfig("tuned", backends, batches, profile_s=cfg.profile_s))
    if not cfg.quick:  # the overlap's worth: the same deployment with one batch at a time
        deps.append(E2EConfig("tuned-sequential", backends, batches, depth=1))
    cores = os.cpu_count() or 1
    if cfg.scale_out and cores > 1:
        deps.append(E2EConfig(f"tuned-{cores}x1", backends, batches, scorers=cores, threads=1))
    return deps


def _targets(rep: ThroughputReport) -> list[dict[str, Any]]:
    t = rep.end_to_end["tuned"]
    rows: list[dict[str, Any]] = []

    def add(what: str, measured: float, goal: float, higher: bool = True, unit: str = "") -> None:
        met = measured >= goal if higher else measured <= goal
        rows.append(
            {"target": what, "goal": goal, "measured": measured, "met": met, "unit": unit, "higher": higher}
        )

    add("reviews end to end ÷ ceiling (same backend)",
        rep.ratios["tuned/review_sentiment"]["end_to_end_over_ceiling"], 0.85)  # fmt: skip
    add(
        "queries end to end ÷ ceiling (same backend)",
        rep.ratios["tuned/query_class"]["end_to_end_over_ceiling"],
        0.70,
    )
    add("reviews end to end ÷ naive", rep.ratios["tuned/review_sentiment"]["end_to_end_over_naive"], 5.0)
    add("queries end to end ÷ naive", rep.ratios["tuned/query_class"]["end_to_end_over_naive"], 10.0)
    for task in TEXT_TASKS:
        backend = rep.tuned[task][0]
        add(f"{task}: chosen backend ({backend}) ceiling ÷ torch fp32",
            rep.ratios[f"tuned/{task}"]["ceiling_over_torch_fp32"], 3.0)  # fmt: skip
        p99 = t[task]["latency_at_50pct"]["p99_ms"]
        add(f"{task}: p99 latency at 50 % of max rate", p99, 150.0, higher=False, unit="ms")
    add("scorer peak RSS, three tasks loaded", t["scorer_peak_rss_mib"], 1024.0, higher=False, unit="MiB")
    if rep.tradeoff:
        tr = rep.tradeoff["rows"]
        base = max(v["macro_f1"] for k, v in rep.tradeoff["baselines"].items() if k.startswith("tfidf"))
        add("reviews: cascade ÷ transformer-only end to end",
            tr["cascade"]["events_per_s"] / tr["transformer-only"]["events_per_s"], 3.0)  # fmt: skip
        add(
            "reviews: cascade ÷ naive end to end",
            tr["cascade"]["events_per_s"] / tr["naive"]["events_per_s"],
            8.0,
        )
        p99 = tr["cascade"]["latency_at_50pct"]["p99_ms"]
        add("reviews: cascade p99 at 50 % of its max rate", p99, 250.0, higher=False, unit="ms")
        add("reviews: share answered by the linear stage alone", tr["cascade"]["share_linear"], 0.60)
        add("reviews: cascade macro-F1 − best TF-IDF baseline (held out)",
            tr["cascade"]["held_out"]["macro_f1"] - base, 0.03)  # fmt: skip
        gain = tr["cascade"]["held_out"]["macro_f1"] - tr["transformer-only"]["held_out"]["macro_f1"]
        add("reviews: cascade macro-F1 − transformer-only (held out)", gain, 0.0)
        add("reviews: transformer-only macro-F1 − best TF-IDF baseline (held out)",
            tr["transformer-only"]["held_out"]["macro_f1"] - base, 0.02)  # fmt: skip
    return rows


def run(settings: Settings, cfg: ThroughputConfig, work: Path, out_dir: Path | None) -> dict[str, Any]:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # Exports go into a copy of the registry: the bench leaves the shipped one as it was.
    registry = work / "registry"
    shutil.copytree(settings.model.adapter_dir, registry, ignore=shutil.ignore_patterns("artifacts"))
    settings = settings.replace(adapter_dir=registry, export_eval_rows=cfg.export_eval_rows)
    rep = ThroughputReport(config=asdict(cfg))
    rep.artifacts = export_artifacts(settings, cfg)
    rep.ceiling = ceiling(settings, cfg, rep.artifacts)
    best = tuned(rep.ceiling, rep.artifacts)
    rep.tuned = {t: list(v) for t, v in best.items()}
    for dep in deployments(cfg, best, rep.ceiling):
        rep.end_to_end[dep.name] = end_to_end(settings, cfg, dep, work)
    rep.naive = naive(settings, cfg, work)
    fp32_e2e = rep.end_to_end["torch-fp32"]
    for name, e in rep.end_to_end.items():
        for task in TEXT_TASKS:
            backend = e[task]["backend"]
            e2e = e[task]["events_per_s"]
            rep.ratios[f"{name}/{task}"] = {
                "backend": backend,
                "end_to_end_over_ceiling": e2e / rep.ceiling[backend][task]["sequences_per_s"],
                "end_to_end_over_naive": e2e / rep.naive[task]["events_per_s"],
                "end_to_end_over_torch_fp32_end_to_end": e2e / fp32_e2e[task]["events_per_s"],
                "ceiling_over_torch_fp32": rep.ceiling[backend][task]["sequences_per_s"]
                / rep.ceiling["torch"][task]["sequences_per_s"],
            }
            rep.cost[f"{name}/{task}"] = {
                "usd_per_million_events": cfg.price_per_hour / (e2e * 3600) * 1e6,
                "price_per_hour_usd": cfg.price_per_hour,
            }
    rep.tradeoff = tradeoff(settings, cfg, work, rep, best)
    rep.targets = _targets(rep)
    result = asdict(rep)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "bench-throughput-quick" if cfg.quick else "benchmarks"
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        chart(result, out_dir / f"{name}.png")
        (out_dir / f"{name}.md").write_text(markdown(result, chart_name=f"{name}.png") + "\n")
    return result


def chart(r: dict[str, Any], path: Path) -> None:
    """Throughput (ceiling, end to end, naive) and latency percentiles per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for col, task in enumerate(TEXT_TASKS):
        ax = axes[0][col]
        names, values, colors = [], [], []
        for backend, rows in r["ceiling"].items():
            if "sequences_per_s" in rows.get(task, {}):
                names.append(f"ceiling\n{backend}")
                values.append(rows[task]["sequences_per_s"])
                colors.append("#9ecae1")
        for name, e in r["end_to_end"].items():
            names.append(f"e2e\n{name}")
            values.append(e[task]["events_per_s"])
            colors.append("#3182bd")
        names.append("naive")
        values.append(r["naive"][task]["events_per_s"])
        colors.append("#e6550d")
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), names, fontsize=7)
        ax.set_title(f"{task}: events (sequences) per second")
        ax.set_yscale("log")
        ax = axes[1][col]
        deps = list(r["end_to_end"])
        for i, q in enumerate(("p50_ms", "p95_ms", "p99_ms")):
            for j, share in enumerate(("latency_at_50pct", "latency_at_90pct")):
                xs = [k * 7 + j * 3 + i for k in range(len(deps))]
                ys = [r["end_to_end"][d][task][share][q] for d in deps]
                ax.bar(xs, ys, color=["#31a354", "#fd8d3c", "#de2d26"][i],
                       alpha=0.55 if j else 1.0, label=f"{q[:3]} at {share[11:13]} %")  # fmt: skip
        ax.set_xticks([k * 7 + 2.5 for k in range(len(deps))], deps, fontsize=8)
        ax.axhline(150, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{task}: latency ms (event time → result published)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(x: Any, fmt: str = ".0f") -> str:
    return "–" if x is None else format(x, fmt)


def _tradeoff_markdown(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    lines = [
        f"## Quality against cost: {t['task']}",
        "",
        "The same events through each configuration. Held-out metrics: what `streamtune train` "
        f"recorded for the cascade version on {t['held_out_rows']} rows of the fixed held-out split, "
        "every configuration on the same rows (the naive consumer runs the transformer-only model). "
        f"Cascade rule {t['rule']}; the validation split predicted {t['validation_share_linear']:.1%} "
        "answered by the linear stage alone."
        + (
            " The cascade version was built by the bench (`training/attach.py`)."
            if t["built_by_bench"]
            else ""
        ),
        "",
        "| configuration | version | held-out macro-F1 | accuracy | ev/s | linear share "
        "| p50 / p95 / p99 ms at 50 % | at 90 % | CPU s / 1000 ev | USD / 1M ev |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in t["rows"].items():
        q = row["held_out"]

        def lat(key: str, row: dict[str, Any] = row) -> str:
            x = row.get(key)
            return "–" if not x else f"{x['p50_ms']:.0f} / {x['p95_ms']:.0f} / {x['p99_ms']:.0f}"

        lines.append(
            f"| {name} | v{row['version']} | {q['macro_f1']:.3f} | {q['accuracy']:.3f} "
            f"| {row['events_per_s']:.0f} | {row['share_linear']:.0%} "
            f"| {lat('latency_at_50pct')} | {lat('latency_at_90pct')} "
            f"| {_f(row.get('scorer_cpu_s_per_1000'), '.1f')} | {row['usd_per_million_events']:.3f} |"
        )
    for name, q in t["baselines"].items():
        lines.append(
            f"| baseline: {name} | – | {q['macro_f1']:.3f} | {q['accuracy']:.3f} | – | – | – | – | – | – |"
        )
    return [*lines, ""]


def markdown(r: dict[str, Any], chart_name: str = "benchmarks.png") -> str:
    cfg = r["config"]
    lines = [
        "# Throughput and cost (`streamtune bench throughput`)",
        "",
        f"Same machine, same events, one run ({'quick mode' if cfg['quick'] else 'full mode'}). "
        f"Ceiling: tokenize + forward only, windows of {cfg['window']} events sorted by length, best model "
        "batch size. End to end: real scorers on the embedded broker and Redis, events replayed as fast as "
        "possible, time until every result is in Redis. Naive: kafka-python + transformers pipeline, one "
        "message at a time, one Redis SET per result.",
        "",
        f"![throughput and latency]({chart_name})",
        "",
        "## Exported artifacts (ONNX Runtime) and their gate",
        "",
        "| backend | task | agreement with fp32 (held-out rows) | verdict | plan | MatMuls kept fp32 "
        "| MiB | export s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend, tasks in r["artifacts"].items():
        for task, a in tasks.items():
            lines.append(
                f"| {backend} | {task} | {a['agreement']:.4f} ({a['eval_rows']}) "
                f"| {'passed' if a['passed'] else '**refused**'} | {a['plan']} | {a['fp32_matmuls']} "
                f"| {a['size_mib']:.0f} | {_f(a['export_seconds'], '.1f')} |"
            )
    lines += [
        "",
        "## Ceiling (tokenize + forward)",
        "",
        "| backend | task | seq/s (best batch) | per batch size | ÷ torch fp32 "
        "| agreement with fp32 (bench texts) |",
        "|---|---|---|---|---|---|",
    ]
    for backend, tasks in r["ceiling"].items():
        for task, c in tasks.items():
            if "sequences_per_s" not in c:
                lines.append(
                    f"| {backend} | {task} | {c['refused']} | – | – | {c['label_agreement_with_fp32']:.3f} |"
                )
                continue
            per = ", ".join(f"{k}: {v:.0f}" for k, v in c["per_batch_size"].items())
            ratio = c["sequences_per_s"] / r["ceiling"]["torch"][task]["sequences_per_s"]
            agree = c["label_agreement_with_fp32"]
            lines.append(
                f"| {backend} | {task} | {c['sequences_per_s']:.0f} ({c['best_batch_size']}) | {per} "
                f"| {ratio:.2f}× | {'reference' if agree is None else f'{agree:.3f}'} |"
            )
    tuned_txt = ", ".join(f"{t}: {b} (batch {n})" for t, (b, n) in r["tuned"].items())
    lines += [
        "",
        f"Chosen per task (fastest at the ceiling with ≥ 99 % label agreement): {tuned_txt}.",
        "",
        "## End to end vs ceiling vs naive",
        "",
        "| deployment | task | backend | ev/s | ÷ ceiling | ÷ naive | ÷ torch-fp32 e2e "
        "| p50 / p95 / p99 ms at 50 % | p50 / p95 / p99 ms at 90 % | CPU s / 1000 ev | USD / 1M ev |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in r["end_to_end"].items():
        for task in TEXT_TASKS:
            row, ratio = e[task], r["ratios"][f"{name}/{task}"]
            l50, l90 = row["latency_at_50pct"], row["latency_at_90pct"]
            usd = r["cost"][f"{name}/{task}"]["usd_per_million_events"]
            lines.append(
                f"| {name} | {task} | {row['backend']} | {row['events_per_s']:.0f} "
                f"| {ratio['end_to_end_over_ceiling']:.2f} | {ratio['end_to_end_over_naive']:.1f}× "
                f"| {ratio['end_to_end_over_torch_fp32_end_to_end']:.2f}× "
                f"| {l50['p50_ms']:.0f} / {l50['p95_ms']:.0f} / {l50['p99_ms']:.0f} "
                f"| {l90['p50_ms']:.0f} / {l90['p95_ms']:.0f} / {l90['p99_ms']:.0f} "
                f"| {row['scorer_cpu_s_per_1000']:.1f} | {usd:.3f} |"
            )
    lines.append("")
    for task, n in r["naive"].items():
        lines.append(f"Naive {task}: {n['events_per_s']:.1f} ev/s ({n['events']} events).  ")
    lines += ["", "Share of the machine's CPU during each full-rate run (all on the same cores):", ""]
    for name, e in r["end_to_end"].items():
        for task in TEXT_TASKS:
            shares = e[task].get("cpu_share", {})
            txt = ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
            lines.append(f"- {name} / {task}: {txt}")
    lines.append("")
    for name, e in r["end_to_end"].items():
        dep = e["deployment"]
        lines.append(
            f"Peak RSS of a scorer ({name}: {dep['scorers']} process(es), {dep['threads'] or 'all'} "
            f"thread(s) each, {dep.get('depth', 1)} batch(es) in progress per task, three tasks loaded): "
            f"{e['scorer_peak_rss_mib']:.0f} MiB.  "
        )
    lines += [f"Cost at {cfg['price_per_hour']} USD per hour for 2 vCPU (see docs/performance.md: cost).", ""]
    for task in TEXT_TASKS:
        prof = r["end_to_end"].get("tuned", {}).get(task, {}).get("profile")
        if not prof:
            continue
        lines += [f"## Profile (py-spy, tuned scorer, {task} at full rate)", ""]
        if "error" in prof:
            lines.append(prof["error"])
        else:
            lines.append(
                f"{prof['samples']} samples of non-idle threads. By stage (first match on the stack):"
            )
            lines.append("")
            lines += [f"- {k}: {v:.0%}" for k, v in prof["stages"].items()]
            lines += ["", "Top functions by self time:", ""]
            lines += [f"- `{name}`: {share:.0%}" for name, share in prof["top_self"]]
        lines.append("")
    lines += _tradeoff_markdown(r.get("tradeoff") or {})
    lines += ["## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in r["targets"]:
        goal = f"{'≥' if t['higher'] else '≤'} {t['goal']:g}{t['unit']}"
        lines.append(
            f"| {t['target']} | {goal} | {t['measured']:.2f}{t['unit']} | {'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines)
