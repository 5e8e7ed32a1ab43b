"""README tables generated from the code and the registry, so the documentation cannot drift.

``streamtune docs --write`` rewrites the blocks between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` in README.md; ``tests/test_docs.py`` fails when they are stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic_core import PydanticUndefined

from streamtune.core.errors import StreamtuneError
from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.core.tasks import TASK_NAMES
from streamtune.rollout.registry import LocalRegistry

README = REPO_ROOT / "README.md"


def _default(name: str) -> str:
    field = Settings.model_fields[name]
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
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        lines.append(f"| `STREAMTUNE_{name.upper()}` | `{_default(name)}` | {desc} |")
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
    return {"settings": settings_table(), "quality": quality_table(adapter_dir)}


def render(text: str, generated: dict[str, str]) -> str:
    """``text`` with every generated block replaced; a missing marker is an error."""
    for name, body in generated.items():
        begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
        match = re.search(re.escape(begin) + ".*?" + re.escape(end), text, re.S)
        if match is None:
            raise StreamtuneError(f"README has no <!-- {name}:begin/end --> block")
        text = text[: match.start()] + begin + body + "\n" + end + text[match.end() :]
    return text
