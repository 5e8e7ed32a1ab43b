"""Documentation tables generated from the code and the registry, so the documentation cannot drift.

``streamtune docs --write`` rewrites the blocks between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` in the file each block lives in (:data:`BLOCK_FILES`: the settings table in
``docs/settings.md``, the version-1 quality table in ``docs/training.md``);
``tests/unit/test_docs.py`` fails when one is stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic_core import PydanticUndefined

from streamtune.core.errors import StreamtuneError
from streamtune.core.settings import FLAT_FIELDS, REPO_ROOT, Settings
from streamtune.core.tasks import TASK_NAMES
from streamtune.rollout.registry import LocalRegistry

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"

# Where each generated block lives (one file per block; no copies elsewhere).
BLOCK_FILES: dict[str, Path] = {
    "settings": DOCS / "settings.md",
    "quality": DOCS / "training.md",
    "curve": DOCS / "two-speeds.md",
}


def _default(name: str) -> str:
    field = Settings.flat_field(name)
    if field.default_factory is not None:
        return "(see description)"
    value = field.default
    if value is PydanticUndefined:
        return "(required)"
    if isinstance(value, Path):
        try:
            return str(value.relative_to(REPO_ROOT)) or "."
        except ValueError:
            return str(value)
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def settings_table() -> str:
    """Markdown table of every setting: variable, default, meaning."""
    lines = ["| variable | in code | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.flat_fields():
        desc = (field.description or "").replace("|", "\\|")
        group, attr = FLAT_FIELDS[name]
        lines.append(f"| `STREAMTUNE_{name.upper()}` | `{group}.{attr}` | `{_default(name)}` | {desc} |")
    return "\n".join(lines)


def _cell(value: float | None, bold: bool = False) -> str:
    if value is None:
        return ""
    return f"**{value:.3f}**" if bold else f"{value:.3f}"


def quality_table(adapter_dir: Path) -> str:
    """Markdown table of every shipped version's held-out metrics beside the baselines its
    manifest records, on the same rows. A version with a linear stage adds what each of its
    models scores alone and the share of rows its linear stage answers alone; a click version
    with boosted trees, what its MLP and its trees score alone (it serves their blend)."""
    registry = LocalRegistry(adapter_dir)
    lines = [
        "| task | version | held-out rows | metric | served | transformer / MLP alone "
        "| linear stage / trees alone | linear share | majority | best other baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in TASK_NAMES:
        for version in registry.versions(task):
            m = registry.manifest(task, version)
            held = m.cascade.get("held_out", {})
            share = held.get("shares", {}).get("linear")
            parts = m.training.get("trees", {}).get("held_out", {})
            neural = held.get("transformer", parts.get("mlp", {}))
            cheap = held.get("linear", parts.get("trees", {}))
            for metric, value in m.metrics.items():
                if metric == "positive_rate":
                    continue
                others = {k: b[metric] for k, b in m.baselines.items() if k != "majority" and metric in b}
                best = max(others, key=lambda k: others[k]) if others else None
                alt = f"{others[best]:.3f} ({best})" if best else ""
                lines.append(
                    f"| {task} | {version} | {m.training.get('held_out_rows', '')} | {metric} | "
                    f"{_cell(value, bold=True)} | {_cell(neural.get(metric))} | {_cell(cheap.get(metric))} | "
                    f"{'' if share is None else f'{share:.0%}'} | "
                    f"{_cell(m.baselines.get('majority', {}).get(metric))} | {alt} |"
                )
    return "\n".join(lines)


CURVE_JSON = DOCS / "bench-update-curve.json"  # `streamtune bench update --parts curve` writes it


def curve_table() -> str:
    """The two-speed curve of the last full ``bench update --parts curve`` run, from its JSON."""
    from streamtune.devtools.bench import curve

    if not CURVE_JSON.is_file():
        return "Not yet measured: run `streamtune bench update --parts curve`."
    r = json.loads(CURVE_JSON.read_text(encoding="utf-8"))
    m = r["machine"]
    machine = f"{m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads)"
    head = [f"Last full run: {machine}, {r['seconds']} s."]
    return "\n".join(head + curve.markdown(r["curve"])[3:])


def blocks(adapter_dir: Path) -> dict[str, str]:
    """Every generated block's body, by block name."""
    return {"settings": settings_table(), "quality": quality_table(adapter_dir), "curve": curve_table()}


def render(text: str, generated: dict[str, str], where: str = "the document") -> str:
    """``text`` with every block in ``generated`` replaced; a missing marker is an error."""
    for name, body in generated.items():
        begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
        match = re.search(re.escape(begin) + ".*?" + re.escape(end), text, re.S)
        if match is None:
            raise StreamtuneError(f"{where} has no <!-- {name}:begin/end --> block")
        text = text[: match.start()] + begin + body + "\n" + end + text[match.end() :]
    return text


def expected_files(adapter_dir: Path) -> dict[Path, tuple[str, str]]:
    """Each file that holds generated blocks: (its text now, its text with current blocks)."""
    generated = blocks(adapter_dir)
    by_file: dict[Path, dict[str, str]] = {}
    for name, path in BLOCK_FILES.items():
        by_file.setdefault(path, {})[name] = generated[name]
    out = {}
    for path, bodies in by_file.items():
        if not path.is_file():
            raise StreamtuneError(f"{path} is missing: it holds the {', '.join(bodies)} table(s)")
        text = path.read_text(encoding="utf-8")
        out[path] = (text, render(text, bodies, where=str(path.relative_to(REPO_ROOT))))
    return out


def stale(adapter_dir: Path) -> list[Path]:
    """Files whose generated blocks differ from what the code and registry produce now."""
    return [path for path, (now, want) in expected_files(adapter_dir).items() if now != want]


def write(adapter_dir: Path) -> list[Path]:
    """Rewrite the generated blocks where they are stale; the files that changed."""
    changed = []
    for path, (now, want) in expected_files(adapter_dir).items():
        if now != want:
            path.write_text(want, encoding="utf-8")
            changed.append(path)
    return changed
