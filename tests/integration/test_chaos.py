"""The fault-tolerance suite, short versions (``streamtune chaos --quick``): real brokers (one, or
three in KRaft), real Redis and real scorer processes; each scenario fails on any lost event or
double count. ``make chaos`` runs the long versions and writes docs/chaos.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamtune.core.settings import Settings
from streamtune.devtools.chaos import SCENARIOS, ChaosConfig, run_scenarios

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_loses_nothing_and_counts_nothing_twice(
    scenario: str, settings: Settings, tmp_path: Path
) -> None:
    (report,) = run_scenarios(settings, ChaosConfig(quick=True), tmp_path / "chaos", [scenario])
    if report.extra.get("skipped"):
        pytest.skip(report.detail)
    assert report.events_in > 0
    for line in report.extra.get("worker_warnings", []):  # shown with a failure's captured output
        print(line)
    assert report.passed, report
    assert report.lost == 0 and report.double_counted == 0 and report.undercounted == 0
    if report.audited:  # the trainer's scenarios count labels, not results
        assert report.results_out == report.events_in
