"""Documentation tables generated from the code and the registry, so the documentation cannot drift.

``streamtune docs --write`` rewrites the blocks between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` in the file each block lives in (:data:`BLOCK_FILES`: the settings table in
``docs/settings.md``, the version-1 quality table in ``docs/training.md``);
``tests/unit/test_docs.py`` fails when one is stale.
"""

from __future__ import annotations

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


def quality_table(adapter_dir: Path, version: int = 1) -> str:
    """Markdown table of a version's held-out metrics beside the baselines its manifest records."""
    registry = LocalRegistry(adapter_dir)
    lines = [
        f"| task | held-out rows | metric | streamtune v{version} | majority | TF-IDF/logistic regression |",
        "|---|---|---|---|---|---|",
    ]
    for task in TASK_NAMES:
        m = registry.manifest(task, version)
        other = next((k for k in m.baselines if k != "majority"), None)
        for metric, value in m.metrics.items():
            if metric == "positive_rate":
                continue
            maj = m.baselines.get("majority", {}).get(metric)
            alt = m.baselines.get(other, {}).get(metric) if other else None
            lines.append(
                f"| {task} | {m.training.get('held_out_rows', '')} | {metric} | **{value:.3f}** | "
                f"{'' if maj is None else f'{maj:.3f}'} | {'' if alt is None else f'{alt:.3f}'} |"
            )
    return "\n".join(lines)


def blocks(adapter_dir: Path) -> dict[str, str]:
    """Every generated block's body, by block name."""
    return {"settings": settings_table(), "quality": quality_table(adapter_dir)}


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
