"""The chaos report's pure parts: merging a partial run into the last full one, and the table."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from streamtune.devtools.chaos import (
    FIRST_FULL_RUN,
    SCENARIOS,
    ChaosConfig,
    ScenarioReport,
    markdown,
    merge_reports,
    worker_warnings,
)


def test_a_partial_run_replaces_its_rows_and_keeps_the_others_in_suite_order() -> None:
    old = [asdict(ScenarioReport(name, "f", events_in=10, results_out=10, passed=True)) for name in SCENARIOS]
    for d in old:
        d.pop("measured")  # records of the first full run do not say when
    new = ScenarioReport("trainer_down", "f2", events_in=7, passed=True, audited=False, measured="2026-12-02")
    merged = merge_reports(old, [new])
    assert [r.name for r in merged] == list(SCENARIOS)
    (got,) = [r for r in merged if r.name == "trainer_down"]
    assert got is new
    assert {r.measured for r in merged if r.name != "trainer_down"} == {FIRST_FULL_RUN}


def test_unknown_fields_of_an_old_record_are_ignored_and_unknown_scenarios_go_last() -> None:
    old = [dict(asdict(ScenarioReport("retired", "f")), obsolete=1)]
    merged = merge_reports(old, [ScenarioReport("poison_mix", "f")])
    assert [r.name for r in merged] == ["poison_mix", "retired"]


def test_the_table_leaves_result_columns_empty_for_the_trainers_scenarios() -> None:
    rows = [
        ScenarioReport("poison_mix", "p", 5, 5, longest_gap_s=1.5, passed=True, measured="d1"),
        ScenarioReport("trainer_down", "t", 9, lost=2, passed=False, audited=False, measured="d2"),
    ]
    lines = markdown(rows, ChaosConfig(quick=True)).splitlines()
    (poison,) = [x for x in lines if x.startswith("| poison_mix")]
    (trainer,) = [x for x in lines if x.startswith("| trainer_down")]
    assert poison == "| poison_mix | p | 5 | 5 | 0 | 0 | 1.50 |  | yes | d1 |"
    assert trainer == "| trainer_down | t | 9 |  | 2 |  |  |  | NO | d2 |"


def test_worker_warnings_are_the_latest_warnings_of_every_log_in_time_order(tmp_path: Path) -> None:
    def line(ts: str, level: str, event: str) -> str:
        return json.dumps({"event": event, "level": level, "timestamp": ts})

    (tmp_path / "scorer-1.log").write_text(
        "\n".join(
            [
                line("2026-12-02T10:00:01Z", "info", "started"),
                line("2026-12-02T10:00:03Z", "warning", "offsets_skipped"),
                "not json at all",
                "\x1b[?25h" + line("2026-12-02T10:00:05Z", "error", "batch_failed"),
            ]
        )
    )
    (tmp_path / "scorer-2.log").write_text(line("2026-12-02T10:00:04Z", "warning", "redis_unavailable"))
    got = worker_warnings(tmp_path)
    assert [g.split(":")[0] for g in got] == ["scorer-1", "scorer-2", "scorer-1"]
    assert ["offsets_skipped" in got[0], "redis_unavailable" in got[1], "batch_failed" in got[2]] == [
        True,
        True,
        True,
    ]
    assert worker_warnings(tmp_path, limit=1) == got[-1:]
