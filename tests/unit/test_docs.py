"""The documentation stays true: generated tables match the settings object and the committed
manifests, README stays short, every relative link resolves, and README's layout names every
folder of the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamtune.core.errors import StreamtuneError
from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.core.tasks import TASK_NAMES
from streamtune.devtools import docs
from streamtune.rollout.registry import LocalRegistry

ADAPTERS = REPO_ROOT / "adapters"
PACKAGE = REPO_ROOT / "workers" / "streamtune"
README_MAX_LINES = 260

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown_files() -> list[Path]:
    return [docs.README, *sorted(docs.DOCS.glob("*.md"))]


def test_generated_tables_are_current() -> None:
    stale = docs.stale(ADAPTERS)
    names = ", ".join(str(p.relative_to(REPO_ROOT)) for p in stale)
    assert not stale, f"generated tables are stale in {names}: run `streamtune docs --write`"


def test_a_stale_table_is_detected_and_rewritten() -> None:
    """The check above is not vacuous: a tampered block differs from its rendering."""
    generated = docs.blocks(ADAPTERS)
    for name, path in docs.BLOCK_FILES.items():
        text = path.read_text(encoding="utf-8")
        first_row = [line for line in generated[name].splitlines() if line.startswith("|")][2]
        assert first_row in text, f"{name} table missing from {path}"
        tampered = text.replace(first_row, first_row.replace("|", "| stale", 1), 1)
        assert tampered != text
        assert docs.render(tampered, {name: generated[name]}) == text


def test_a_missing_block_is_an_error() -> None:
    with pytest.raises(StreamtuneError, match="settings:begin/end"):
        docs.render("no markers here\n", {"settings": "x"})


def test_each_block_lives_in_exactly_one_file() -> None:
    for name, home in docs.BLOCK_FILES.items():
        holders = [p for p in _markdown_files() if f"<!-- {name}:begin -->" in p.read_text(encoding="utf-8")]
        assert holders == [home], f"<!-- {name} --> block in {holders}, expected only in {home}"


def test_every_setting_is_documented() -> None:
    table = docs.settings_table()
    page = docs.BLOCK_FILES["settings"].read_text(encoding="utf-8")
    for name, _ in Settings.flat_fields():
        assert f"`STREAMTUNE_{name.upper()}`" in table
        variable = f"STREAMTUNE_{name.upper()}"
        assert f"| `{variable}` |" in page, f"{variable} is not in docs/settings.md"


def test_quality_table_reports_the_manifest_numbers() -> None:
    table = docs.quality_table(ADAPTERS)
    registry = LocalRegistry(ADAPTERS)
    for task in TASK_NAMES:
        for version in registry.versions(task):
            m = registry.manifest(task, version)
            for metric, value in m.metrics.items():
                if metric != "positive_rate":  # every served metric, on its version's row
                    assert (
                        f"| {task} | {version} | {m.training['held_out_rows']} | {metric} | **{value:.3f}** |"
                        in table
                    )


def test_readme_is_short() -> None:
    lines = docs.README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): use docs/"


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub generates for a markdown file (lowercase, punctuation dropped,
    spaces to hyphens)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)
    }


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_points_to_an_existing_file(path: Path) -> None:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # an absolute URL
        file_part, _, anchor = target.partition("#")
        linked = path.parent / file_part if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(REPO_ROOT)}: broken relative links: {broken}"


def _package_folders() -> list[str]:
    """Every folder of the package that holds Python source (not caches or empty leftovers)."""
    return sorted(
        {
            py.parent.relative_to(PACKAGE).as_posix()
            for py in PACKAGE.rglob("*.py")
            if py.parent != PACKAGE and "__pycache__" not in py.parts
        }
    )


def _readme_layout() -> str:
    text = docs.README.read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match is not None, "README.md has no '## Layout' section"
    return match.group(1)


def test_readme_layout_lists_every_package_folder() -> None:
    layout = _readme_layout()
    folders = _package_folders()
    assert "core" in folders and "devtools/demo" in folders
    missing = [f for f in folders if not re.search(rf"(^|\s){re.escape(f)}/", layout, re.M)]
    assert not missing, f"README's layout does not list: {missing}"
