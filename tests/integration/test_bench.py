"""The benchmarks' quick modes run end to end and report sane numbers (not timing targets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamtune.core.settings import Settings
from streamtune.devtools.bench import throughput, update

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
    # the curve: both paths and the simple baselines, on the same labels and held-out rows
    paths = ("fast", "slow", "baseline: TF-IDF refit", "baseline: majority")
    rows = r["curve"]["rows"]
    expected = sorted((n, p) for n in (60, 120) for p in paths)
    assert sorted((row["labels"], row["path"]) for row in rows) == expected
    assert all(0 <= row["drift_accuracy"] <= 1 and 0 <= row["natural_accuracy"] <= 1 for row in rows)


def test_throughput_benchmark_quick(tmp_path: Path) -> None:
    cfg = throughput.ThroughputConfig.quick_mode()
    r = throughput.run(Settings(), cfg, tmp_path / "work", tmp_path / "out")
    assert set(r["end_to_end"]) == {"torch-fp32", "tuned"}
    for backend in ("onnx-fp32", "onnx-int8"):
        for task in throughput.TEXT_TASKS:
            art = r["artifacts"][backend][task]
            assert art["passed"] == (art["agreement"] >= 0.99) and art["eval_rows"] > 0
    assert all(a["passed"] for a in r["artifacts"]["onnx-fp32"].values())  # fp32 graph == fp32 torch
    for task in throughput.TEXT_TASKS:
        assert r["ceiling"]["torch"][task]["sequences_per_s"] > 0
        backend, batch = r["tuned"][task]
        assert r["ceiling"][backend][task]["sequences_per_s"] > 0 and batch in cfg.batch_sizes
        for name, e in r["end_to_end"].items():
            assert e[task]["events_per_s"] > 0 and r["naive"][task]["events_per_s"] > 0
            lat = e[task]["latency_at_50pct"]
            assert lat["n"] == min(cfg.latency_events, e[task]["events"])
            assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
            assert r["ratios"][f"{name}/{task}"]["end_to_end_over_ceiling"] > 0
        assert r["end_to_end"]["tuned"][task]["backend"] == backend
    for e in r["end_to_end"].values():
        assert e["scorer_peak_rss_mib"] > 100
    prof = r["end_to_end"]["tuned"]["review_sentiment"]["profile"]
    assert "error" in prof or (prof["samples"] > 0 and abs(sum(prof["stages"].values()) - 1) < 1e-6)
    assert {t["target"] for t in r["targets"]} >= {"reviews end to end ÷ naive", "queries end to end ÷ naive"}
    # the quality/cost trade-off of reviews: every configuration on the same events
    t = r["tradeoff"]
    assert set(t["rows"]) == {"transformer-only", "cascade", "cascade-early-answers", "linear-only", "naive"}
    for name, row in t["rows"].items():
        assert row["events_per_s"] > 0 and 0 <= row["share_linear"] <= 1, name
        assert 0 < row["held_out"]["macro_f1"] <= 1, name
    assert t["rows"]["transformer-only"]["share_linear"] == 0.0
    assert t["rows"]["linear-only"]["share_linear"] > 0.5  # every in-domain review
    # the same version on the same events, its linear answers published first or not
    whole, early = t["rows"]["cascade"], t["rows"]["cascade-early-answers"]
    assert whole["share_linear"] == pytest.approx(early["share_linear"], abs=0.02)
    assert set(t["baselines"]) >= {"tfidf_logreg", "tfidf_logreg_unbalanced"}
    out = tmp_path / "out"
    assert "| tuned | review_sentiment |" in (out / "bench-throughput-quick.md").read_text()
    assert "## Quality against cost: review_sentiment" in (out / "bench-throughput-quick.md").read_text()
    assert (out / "bench-throughput-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
