"""The chaos report's pure parts: merging a partial run into the last full one, and the table."""

from __future__ import annotations

from dataclasses import asdict

from streamtune.devtools.chaos import (
    FIRST_FULL_RUN,
    SCENARIOS,
    ChaosConfig,
    ScenarioReport,
    markdown,
    merge_reports,
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
