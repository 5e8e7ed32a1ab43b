"""The benchmarks' quick modes run end to end and report sane numbers (not timing targets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamtune.bench import throughput, update
from streamtune.settings import Settings

pytestmark = pytest.mark.integration


def test_update_benchmark_quick(tmp_path: Path) -> None:
    r = update.run(Settings(), update.UpdateBenchConfig.quick(), tmp_path / "work", tmp_path / "out")
    f, s = r["finetune"], r["swap"]
    assert f["labels"] == 96 and f["fit_seconds"] > 0 and f["candidate_version"] == 2
    assert 0 <= f["drifted_before"]["accuracy"] <= 1 and 0 <= f["drifted_after"]["accuracy"] <= 1
    assert s["events_sent"] == s["distinct_results"] > 0  # nothing lost around the swap
    assert s["old_version_results_after_swap"] == 0
    assert 0 < s["release_to_first_new_result_s"] < 60
    assert (tmp_path / "out" / "bench-update-quick.md").read_text().startswith("# One online update")


def test_throughput_benchmark_quick(tmp_path: Path) -> None:
    cfg = throughput.ThroughputConfig.quick_mode()
    r = throughput.run(Settings(), cfg, tmp_path / "work", tmp_path / "out")
    torch_e2e = r["end_to_end"]["torch"]
    for task in throughput.TEXT_TASKS:
        assert r["ceiling"]["torch"][task]["sequences_per_s"] > 0
        assert torch_e2e[task]["events_per_s"] > 0 and r["naive"][task]["events_per_s"] > 0
        lat = torch_e2e[task]["latency_at_50pct"]
        assert lat["n"] == min(cfg.latency_events, torch_e2e[task]["events"])
        assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    for backend in cfg.backends:
        assert backend in r["end_to_end"] or backend in r["skipped"]
        for task in throughput.TEXT_TASKS:
            agree = r["ceiling"][backend][task]["label_agreement_with_fp32"]
            assert 0.0 <= agree <= 1.0
    assert torch_e2e["scorer_peak_rss_mib"] > 100
    assert r["default_backend"] in r["end_to_end"]
    assert "| torch | review_sentiment |" in (tmp_path / "out" / "bench-throughput-quick.md").read_text()
