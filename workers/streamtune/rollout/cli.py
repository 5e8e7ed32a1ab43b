"""``streamtune adapters``: list, inspect, canary, promote, roll back and compare versions."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from streamtune.core.errors import AdapterError, StreamtuneError
from streamtune.core.settings import Settings
from streamtune.core.tasks import TASK_NAMES, TASKS
from streamtune.rollout.registry import AdapterStore, Manifest, registry_for
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import Release, canary, current_states, promote, rollback

adapters = typer.Typer(no_args_is_help=True, help="Adapter versions and their rollout.")
out = Console()
if not out.is_terminal:  # pipes and logs get the whole table, not an 80-column cut
    out = Console(width=160)

MAIN_METRIC = {name: spec.gate_metric for name, spec in TASKS.items()}


def _ctx() -> tuple[Settings, AdapterStore, ReleaseLog]:
    s = Settings()
    return s, registry_for(s.model.adapter_dir, s.security.manifest_hmac_key), ReleaseLog(s)


def _task(task: str) -> str:
    if task not in TASK_NAMES:
        raise StreamtuneError(f"unknown task {task!r}; one of {', '.join(TASK_NAMES)}")
    return task


def _verified(reg: AdapterStore, task: str, version: int, force: bool = False) -> Manifest:
    """Refuse before announcing: a version every scorer would refuse is never released, and a
    version its gate rejected needs ``--force``."""
    from streamtune.model.encoder import base_model_sha256

    s = Settings()
    m = reg.manifest(task, version)
    base = base_model_sha256(s.model.base_model) if m.kind == "text-lora" else None
    verified = reg.verify(task, version, base_sha256=base)
    if not verified.releasable and not force:
        raise StreamtuneError(
            f"{task} v{version} failed its release gate ({verified.gate.get('reason', 'no reason')}); "
            "use --force to release it anyway"
        )
    backend = s.backend_for(task)
    if backend.startswith("onnx-"):
        reg.verify_artifact(task, version, backend)  # scorers on this backend would refuse it
    return verified


def _live(s: Settings, reg: AdapterStore, state: Release | None, task: str) -> int:
    if state is not None:
        return state.live_version
    v = reg.default_version(task, s.backend_for(task))  # what a scorer would start with
    if v is None:
        raise AdapterError(f"{task} has no version to serve")
    return v


@adapters.command("list")
def list_() -> None:
    """Every version per task with its main metric, gate verdict and rollout stage."""
    s, reg, log = _ctx()
    states = log.states()
    table = Table()
    for col in ("task", "version", "parent", "created", "metric", "value", "gate", "artifacts", "serving"):
        table.add_column(col)
    for task in TASK_NAMES:
        state = states.get(task)
        live = _live(s, reg, state, task) if reg.versions(task) else None
        for v in reg.versions(task):
            try:
                m = reg.manifest(task, v)
            except AdapterError as e:
                table.add_row(task, str(v), "", "", "", "", f"[red]{e}[/]", "")
                continue
            metric = MAIN_METRIC[task]
            gate = "–" if not m.gate else ("passed" if m.gate.get("passed") else "rejected")
            serving = "live" if v == live else ""
            if state and state.canary_version == v:
                serving = f"canary {state.canary_fraction:.0%}"
            table.add_row(task, str(v), str(m.parent_version or ""), m.created_at.strftime("%Y-%m-%d %H:%M"),
                          metric, f"{m.metrics.get(metric, float('nan')):.3f}", gate,
                          _artifacts(reg, task, v), serving)  # fmt: skip
    out.print(table)


def _artifacts(reg: AdapterStore, task: str, version: int) -> str:
    from streamtune.core.settings import BACKENDS

    parts = []
    for backend in BACKENDS:
        try:
            art = reg.artifact(task, version, backend)
        except AdapterError:
            parts.append(f"{backend} [red]invalid[/]")
            continue
        if art is not None:
            verdict = "" if art.passed else " [red]refused[/]"
            parts.append(f"{backend} {art.agreement:.3f}{verdict}")
    return ", ".join(parts)


@adapters.command()
def export(
    task: Annotated[str, typer.Option(help="A task (purchase_intent: onnx-fp32 only)")],
    version: Annotated[int | None, typer.Option(help="Version (default: the one serving)")] = None,
    backend: Annotated[str, typer.Option(help="onnx-int8 or onnx-fp32")] = "onnx-int8",
) -> None:
    """Export a version to ONNX Runtime (merged, fused, quantized), check its label agreement with
    fp32 on the held-out slice and store it, with checksums, in the version's registry directory."""
    from streamtune.model.onnx_export import export_for

    s, reg, log = _ctx()
    v = version if version is not None else _live(s, reg, log.states().get(_task(task)), task)
    existing = reg.artifact(task, v, backend)
    if existing is not None and existing.passed:  # immutable: exporting again is a no-op
        reg.verify_artifact(task, v, backend)
        out.print(f"{task} v{v} {backend}: exported already (agreement {existing.agreement:.4f}), verified")
        return
    art = export_for(s, reg, task, v, backend)
    verdict = "[green]passed[/]" if art.passed else "[red]refused[/]"
    out.print(
        f"{task} v{v} {backend}: agreement with fp32 {art.agreement:.4f} on {art.eval_rows} held-out rows "
        f"(gate {art.min_agreement}) {verdict}; plan {art.details.get('plan')}, "
        f"{len(art.fp32_nodes)} MatMuls kept fp32, {art.details.get('seconds')} s"
    )
    if not art.passed:
        raise typer.Exit(1)


@adapters.command()
def show(task: str, version: int) -> None:
    """A version's manifest."""
    _, reg, _ = _ctx()
    out.print_json(reg.manifest(_task(task), version).model_dump_json())


@adapters.command("canary")
def canary_(
    task: str,
    version: int,
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of entities (stable hash)")] = 0.1,
    force: Annotated[bool, typer.Option(help="Release even if its gate rejected it")] = False,
) -> None:
    """Route a share of products/sessions to VERSION; the rest stay on the live version."""
    s, reg, log = _ctx()
    m = _verified(reg, _task(task), version, force)
    live = _live(s, reg, log.states().get(task), task)
    if live == version:
        raise StreamtuneError(f"{task} v{version} is already live")
    sha, by = reg.manifest_sha256(task, version), getpass.getuser()
    rel = canary(task, version, fraction, live, sha, by, forced=not m.releasable)  # type: ignore[arg-type]
    log.publish(rel)
    out.print(f"{task}: v{version} canary on {fraction:.0%} of entities, v{live} live")


@adapters.command("promote")
def promote_(
    task: str,
    version: int,
    force: Annotated[bool, typer.Option(help="Release even if its gate rejected it")] = False,
) -> None:
    """Make VERSION live for every entity."""
    _, reg, log = _ctx()
    m = _verified(reg, _task(task), version, force)
    sha, by = reg.manifest_sha256(task, version), getpass.getuser()
    log.publish(promote(task, version, sha, by, forced=not m.releasable))  # type: ignore[arg-type]
    out.print(f"{task}: v{version} live")


@adapters.command("rollback")
def rollback_(
    task: str,
    to: Annotated[int | None, typer.Option(help="Version to go back to (default: the previous live)")] = None,
    reason: str = "",
) -> None:
    """Stop the canary, or go back from the live version to the previous (or given) one."""
    _, reg, log = _ctx()
    records, _ = log.read_all()
    state = current_states(records).get(_task(task))
    if state is None:
        raise StreamtuneError(f"{task} has no release to roll back")
    if to is None:
        if state.canary_version is not None:
            bad, to = state.canary_version, state.live_version
        else:
            bad = state.live_version
            earlier = [r.live_version for r in records if r.task == task and r.stage != "refused"]
            previous = [v for v in earlier if v != bad]
            if not previous:
                raise StreamtuneError(f"{task}: no earlier live version; use --to")
            to = previous[-1]
    else:
        bad = state.canary_version or state.live_version
    m = _verified(reg, task, to, force=True)  # going back to what served before
    sha, by = reg.manifest_sha256(task, to), getpass.getuser()
    log.publish(rollback(task, bad, to, sha, reason, by, forced=not m.releasable))  # type: ignore[arg-type]
    out.print(f"{task}: v{bad} rolled back, v{to} live")


@adapters.command()
def sign() -> None:
    """Sign every version published before STREAMTUNE_MANIFEST_HMAC_KEY was set (files verified first)."""
    _, reg, _ = _ctx()
    for task in TASK_NAMES:
        for version in reg.versions(task):
            state = "signed" if reg.sign_existing(task, version) else "already signed"
            out.print(f"{task} v{version}: {state}")


@adapters.command()
def diff(task: str, v1: int, v2: int) -> None:
    """Two versions' metrics (and gate results) side by side."""
    _, reg, _ = _ctx()
    a, b = reg.manifest(_task(task), v1), reg.manifest(task, v2)
    table = Table(title=f"{task}: v{v1} vs v{v2}")
    for col in ("", f"v{v1}", f"v{v2}", "Δ"):
        table.add_column(col, justify="right")

    def rows(prefix: str, x: dict[str, object], y: dict[str, object]) -> None:
        for k in sorted(set(x) | set(y)):
            xv, yv = x.get(k), y.get(k)
            delta = f"{yv - xv:+.4f}" if isinstance(xv, float) and isinstance(yv, float) else ""
            table.add_row(f"{prefix}{k}", _fmt(xv), _fmt(yv), delta)

    rows("", dict(a.metrics), dict(b.metrics))
    rows("gate.", _flat(a.gate), _flat(b.gate))
    rows("training.", {k: a.training.get(k) for k in ("train_rows", "labels", "seconds")},
         {k: b.training.get(k) for k in ("train_rows", "labels", "seconds")})  # fmt: skip
    out.print(table)


def _fmt(v: object) -> str:
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _flat(d: dict[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
