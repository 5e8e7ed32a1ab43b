"""The ``streamtune`` command."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from streamtune.core.errors import StreamtuneError
from streamtune.core.settings import Settings, env_name_for_loc
from streamtune.core.tasks import TASK_NAMES

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Real-time scoring with hot-swappable LoRA adapters.",
)
console = Console(stderr=True)

ALL = "all"


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        err = e.errors()[0]
        name = env_name_for_loc(err["loc"])
        console.print(f"[red]error:[/] {name}: {err['msg']}")
        raise typer.Exit(2) from e


def _tasks(task: str) -> list[str]:
    if task == ALL:
        return list(TASK_NAMES)
    if task not in TASK_NAMES:
        console.print(f"[red]error:[/] unknown task {task!r}; one of {', '.join(TASK_NAMES)} or all")
        raise typer.Exit(2)
    return [task]


@app.command()
def scorer() -> None:
    """Run the scoring worker (scale out by starting more: they share one consumer group)."""
    from streamtune.scorer.main import run_scorer

    run_scorer(_settings())


@app.command()
def trainer() -> None:
    """Run the online trainer: join labels to events, fine-tune from the live version, gate, release."""
    from streamtune.trainer.main import run_trainer

    run_trainer(_settings())


@app.command()
def topics() -> None:
    """Create the missing topics (partitions and replication from settings)."""
    from streamtune.kafka.topics import ensure_topics, topic_specs

    s = _settings()
    created = ensure_topics(s)
    for spec in topic_specs(s):
        state = "created" if spec.name in created else "exists"
        console.print(f"{spec.name:32} partitions={spec.partitions} replication={spec.replication} {state}")


@app.command()
def train(
    task: Annotated[str, typer.Option(help="review_sentiment | query_class | purchase_intent | all")] = ALL,
    seed: int = 13,
    epochs: int = 1,
    train_rows: Annotated[int, typer.Option(help="Training rows per text task (0: all)")] = 3000,
    max_len: int = 128,
    if_missing: Annotated[bool, typer.Option(help="Only train tasks that have no version yet")] = False,
    transformer_from: Annotated[
        int,
        typer.Option(
            help="A text task: publish a new version with this version's transformer as it is, plus a"
            " linear stage and a cascade rule fitted beside it (0: train the transformer too)"
        ),
    ] = 0,
) -> None:
    """Fine-tune a task's adapter on the shipped data, evaluate on held-out rows, publish a version."""
    from streamtune.ops.logs import configure_logging
    from streamtune.rollout.registry import registry_for
    from streamtune.training.bootstrap import TrainConfig, train_task

    s = _settings()
    configure_logging(s.ops.log_level, json=False)
    registry = registry_for(s.model.adapter_dir, s.security.manifest_hmac_key)
    cfg = TrainConfig(seed=seed, epochs=epochs, train_rows=train_rows, max_len=max_len)
    for t in _tasks(task):
        if if_missing and registry.latest(t) is not None:
            continue
        if transformer_from:
            from streamtune.training.attach import cascade_from

            m = cascade_from(t, transformer_from, s.model.base_model, s.model.data_dir, registry, cfg)
        else:
            m = train_task(t, s.model.base_model, s.model.data_dir, registry, cfg)
        table = Table(title=f"{t} v{m.version} (held-out rows: {m.training['held_out_rows']})")
        table.add_column("model")
        for k in m.metrics:
            table.add_column(k, justify="right")
        table.add_row("streamtune (served)", *[f"{v:.3f}" for v in m.metrics.values()])
        held = m.cascade.get("held_out", {})
        for part, vals in m.training.get("trees", {}).get("held_out", {}).items():  # click: MLP, trees
            table.add_row(f"  {part} alone", *[f"{vals.get(k, float('nan')):.3f}" for k in m.metrics])
        for path in ("linear", "transformer"):
            if path in held:
                table.add_row(
                    f"  {path} alone", *[f"{held[path].get(k, float('nan')):.3f}" for k in m.metrics]
                )
        for name, vals in m.baselines.items():
            table.add_row(name, *[f"{vals.get(k, float('nan')):.3f}" for k in m.metrics])
        Console().print(table)
        if held:
            rule, shares = m.cascade["rule"], held["shares"]
            Console().print(
                f"cascade: threshold {rule['threshold']:.3f}, blend weight {rule['weight']:.1f}, "
                f"min coverage {rule['min_coverage']:.3f}; held-out shares "
                + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
            )


@app.command()
def replay(
    task: Annotated[str, typer.Option(help="Task to replay, or all")] = ALL,
    limit: Annotated[int, typer.Option(help="Valid events per task at most")] = 1000,
    rate: Annotated[float, typer.Option(help="Events per second in total (0: as fast as possible)")] = 0.0,
    malformed: Annotated[float, typer.Option(help="Share of deliberately malformed events (0-1)")] = 0.0,
    labels: Annotated[bool, typer.Option(help="Also produce each event's label on `labels`")] = False,
    seed: int = 7,
    skip: Annotated[int, typer.Option(help="Skip this many rows per data set first")] = 0,
    reviews: Annotated[
        str, typer.Option(help="natural: the data set's mix; critical: the drifted, class-balanced wave")
    ] = "natural",
    label_delay: Annotated[float, typer.Option(help="Seconds between an event and its label")] = 0.0,
) -> None:
    """Produce events from the shipped data sets."""
    from streamtune.devtools.demo.replay import replay as run_replay

    if reviews not in ("natural", "critical"):
        console.print(f"[red]error:[/] --reviews {reviews!r}: natural or critical")
        raise typer.Exit(2)
    report = run_replay(
        _settings(), _tasks(task), limit, rate, malformed, labels, seed, skip,
        reviews=reviews,  # type: ignore[arg-type]
        label_delay_s=label_delay,
    )  # fmt: skip
    print(
        json.dumps(
            {
                "sent": report.sent,
                "malformed": report.malformed,
                "labels": report.labels,
                "seconds": round(report.seconds, 2),
            }
        )
    )


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="e.g. scores.review, scores.search, scores.click, events.dlq")],
    from_beginning: bool = False,
    max_messages: Annotated[int, typer.Option(help="Stop after this many (0: run until Ctrl-C)")] = 0,
    raw: Annotated[bool, typer.Option(help="Print the JSON as received")] = False,
) -> None:
    """Subscribe to an output topic and print results readably."""
    from streamtune.devtools.demo.tail import run_tail

    run_tail(_settings(), topic, from_beginning, max_messages, raw)


@app.command()
def schemas(
    write: Annotated[bool, typer.Option(help="Regenerate schemas/ from the typed models")] = False,
) -> None:
    """List (or regenerate) the JSON Schemas of every payload."""
    from streamtune.core import schemas as sch

    if write:
        for p in sch.write_all():
            console.print(str(p))
    else:
        for name in sch.SCHEMA_MODELS:
            console.print(f"{name}: {sch.SCHEMA_DIR / (name + '.json')}")


@app.command()
def docs(
    write: Annotated[bool, typer.Option(help="Rewrite the generated tables in docs/")] = False,
) -> None:
    """Print (or write into docs/settings.md, docs/training.md) the tables generated from the code."""
    from streamtune.devtools import docs as d

    adapter_dir = _settings().model.adapter_dir
    if write:
        changed = d.write(adapter_dir)
        for path in changed:
            console.print(f"updated {path.relative_to(d.REPO_ROOT)}")
        if not changed:
            files = sorted({str(p.relative_to(d.REPO_ROOT)) for p in d.BLOCK_FILES.values()})
            console.print(f"generated tables are current ({', '.join(files)})")
    else:
        for body in d.blocks(adapter_dir).values():
            print(body, end="\n\n")


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: until Ctrl-C)")] = 0.0,
    rate: Annotated[float, typer.Option(help="Replay rate, events/s in total")] = 20.0,
    malformed: Annotated[float, typer.Option(help="Share of malformed events in the replay")] = 0.02,
    drift_after: Annotated[float, typer.Option(help="Seconds before the review stream drifts")] = 15.0,
    second_drift_after: Annotated[
        float, typer.Option(help="Seconds after the first drift: reviews from other sites (0: none)")
    ] = 150.0,
    fast_interval: Annotated[float, typer.Option(help="The trainer's fast-path cadence, seconds")] = 30.0,
    label_delay: Annotated[float, typer.Option(help="Seconds between an event and its label")] = 5.0,
    train_after: Annotated[int, typer.Option(help="New joined labels that start a training run")] = 300,
    train_budget: Annotated[float, typer.Option(help="Time budget of a training run, seconds")] = 90.0,
    live_view: Annotated[
        bool, typer.Option(help="Live terminal view (off: timeline at the end only)")
    ] = True,
) -> None:
    """Start the embedded stack, a scorer, a trainer and a drifting replay; show it live."""
    from streamtune.devtools.demo.main import DemoOptions, run_demo

    opts = DemoOptions(
        duration=duration, rate=rate, malformed=malformed, drift_after=drift_after, label_delay=label_delay,
        train_after=train_after, train_budget=train_budget, live_view=live_view,
        second_drift_after=second_drift_after, fast_interval=fast_interval,
    )  # fmt: skip
    run_demo(_settings(), opts)


bench = typer.Typer(no_args_is_help=True, help="Benchmarks, measured on this machine in one run.")


@bench.command("update")
def bench_update(
    quick: Annotated[
        bool, typer.Option(help="Seconds-scale run that checks the benchmark works (CI)")
    ] = False,
    labels: Annotated[int, typer.Option(help="Drifted labels to fine-tune on")] = 2000,
    epochs: int = 1,
    parts: Annotated[
        str, typer.Option(help="Comma-separated: finetune, swap (needs finetune), curve (fast vs slow)")
    ] = "finetune,swap,curve",
    sizes: Annotated[str, typer.Option(help="Fresh-label counts of the curve")] = "100,250,500,1000,2000",
    out: Annotated[str, typer.Option(help="Directory for the JSON and markdown report ('' : none)")] = "docs",
) -> None:
    """Fine-tune time on N labels, accuracy before/after on drifted data, hot-swap latency and gap."""
    from pathlib import Path

    from streamtune.core.settings import REPO_ROOT
    from streamtune.devtools.bench.update import UpdateBenchConfig, markdown, run
    from streamtune.ops.logs import configure_logging

    s = _settings()
    configure_logging("WARNING", json=False)
    from streamtune.devtools.bench.curve import CurveConfig

    curve = CurveConfig(sizes=tuple(int(n) for n in sizes.split(",")), epochs=epochs)
    chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    cfg = (
        UpdateBenchConfig.quick()
        if quick
        else UpdateBenchConfig(labels=labels, epochs=epochs, curve=curve, parts=chosen)
    )
    result = run(s, cfg, REPO_ROOT / "var" / "bench-update", Path(out) if out else None)
    print(markdown(result))


@bench.command("throughput")
def bench_throughput(
    quick: Annotated[
        bool, typer.Option(help="Seconds-scale run that checks the benchmark works (CI)")
    ] = False,
    backends: Annotated[
        str, typer.Option(help="Comma-separated: torch, torch-bf16, onnx-fp32, onnx-int8 (default: all)")
    ] = "",
    out: Annotated[str, typer.Option(help="Directory for the JSON and markdown report ('' : none)")] = "docs",
) -> None:
    """Ceiling vs streamtune end to end vs a naive consumer, per backend; ratios, latency, cost."""
    from pathlib import Path

    from streamtune.core.settings import REPO_ROOT
    from streamtune.devtools.bench.throughput import ThroughputConfig, markdown, run
    from streamtune.ops.logs import configure_logging

    s = _settings()
    configure_logging("WARNING", json=False)
    base = ThroughputConfig.quick_mode() if quick else ThroughputConfig()
    chosen = tuple(b.strip() for b in backends.split(",") if b.strip()) or base.backends
    if "torch" not in chosen:
        chosen = ("torch", *chosen)  # fp32 is the reference every ratio and agreement is against
    cfg = type(base)(**{**base.__dict__, "backends": chosen})
    result = run(s, cfg, REPO_ROOT / "var" / "bench-throughput", Path(out) if out else None)
    print(markdown(result))


@app.command()
def chaos(
    quick: Annotated[bool, typer.Option(help="Short scenarios (CI); full runs write docs/chaos.*")] = False,
    scenario: Annotated[
        list[str] | None, typer.Option(help="Run only these (repeatable); default: all")
    ] = None,
    out: Annotated[str, typer.Option(help="Directory for chaos.json and chaos.md ('': none)")] = "",
) -> None:
    """Fault-tolerance suite: kill, stop and flood real processes mid-stream; fail on any loss."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from streamtune.core.settings import REPO_ROOT
    from streamtune.devtools.chaos import ChaosConfig, markdown, merge_reports, run_scenarios
    from streamtune.ops.logs import configure_logging

    s = _settings()
    configure_logging("WARNING", json=False)
    cfg = ChaosConfig(quick=quick)
    reports = run_scenarios(s, cfg, REPO_ROOT / "var" / "chaos", scenario or None)
    target = Path(out) if out else (None if quick else REPO_ROOT / "docs")
    failed = [r.name for r in reports if not r.passed and not r.extra.get("skipped")]
    if target is not None and scenario and (target / "chaos.json").exists():
        # Some scenarios: their rows replace the earlier ones, the rest of the report stays.
        reports = merge_reports(json.loads((target / "chaos.json").read_text()), reports)
    text = markdown(reports, cfg)
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        (target / "chaos.json").write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
        (target / "chaos.md").write_text(text)
    print(text)
    if failed:
        raise typer.Exit(1)


def _register_subcommands() -> None:
    from streamtune.rollout.cli import adapters

    app.add_typer(adapters, name="adapters")
    app.add_typer(bench, name="bench")


_register_subcommands()


def main() -> None:
    try:
        app()
    except StreamtuneError as e:
        # One line, never wrapped: scripts and people grep for the setting it names.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
