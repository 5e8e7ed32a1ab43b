"""README's generated tables match the settings object and the committed manifests."""

from __future__ import annotations

from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.devtools import docs


def test_readme_tables_are_current() -> None:
    text = docs.README.read_text()
    expected = docs.render(text, docs.blocks(REPO_ROOT / "adapters"))
    assert text == expected, "README tables are stale: run `streamtune docs --write`"


def test_every_setting_is_documented() -> None:
    table = docs.settings_table()
    for name in Settings.model_fields:
        assert f"`STREAMTUNE_{name.upper()}`" in table


def test_quality_table_reports_the_manifest_numbers() -> None:
    table = docs.quality_table(REPO_ROOT / "adapters")
    assert "| review_sentiment |" in table and "macro_f1" in table and "top3" in table and "pr_auc" in table
