"""The review cascade end to end with its linear answers published first, and with the whole
batch waiting for the transformer (``STREAMTUNE_EARLY_ANSWERS`` off), alternated on the same
events, as ``streamtune bench throughput``'s trade-off section runs each configuration.

    python -m streamtune.devtools.early_answers_experiment [--backend onnx-int8] [--pairs 2]
        [--out F]

A full ``bench throughput`` run has both rows (``cascade`` and ``cascade-early-answers``) but takes
most of an hour; this runs only them, ``--pairs`` times each, alternating (on a 2-core machine
the first runs of a session are slower: compare the rows of one pair). Reported per run: events/s
end to end, p50/p95/p99 latency at 50 % and 90 % of that rate, scorer CPU seconds per 1,000
reviews and the answers per path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from streamtune.core.settings import Settings
from streamtune.core.tasks import QUERY, REVIEW
from streamtune.devtools.bench.throughput import E2EConfig, ThroughputConfig, cascade_registries, end_to_end
from streamtune.rollout.registry import LocalRegistry

KEYS = ("events_per_s", "latency_at_50pct", "latency_at_90pct", "scorer_cpu_s_per_1000", "answer_paths")


def run(backend: str, pairs: int, work: Path) -> dict[str, Any]:
    from streamtune.model.onnx_export import ONNX_BACKENDS, export_for

    s = Settings()
    registry = work / "registry"  # exports go into a copy: the shipped registry stays as it is
    shutil.copytree(s.model.adapter_dir, registry, ignore=shutil.ignore_patterns("artifacts"))
    s = s.replace(adapter_dir=registry, export_eval_rows=1000)
    cfg = ThroughputConfig()
    info = cascade_registries(s, cfg, work)["cascade"]
    reg = LocalRegistry(Path(info["adapter_dir"]))
    if backend in ONNX_BACKENDS and reg.artifact(REVIEW.name, info["version"], backend) is None:
        export_for(s.replace(adapter_dir=reg.root), reg, REVIEW.name, info["version"], backend)
    out: dict[str, Any] = {"backend": backend, "version": info["version"], "runs": []}
    for i in range(pairs):
        for early in (False, True):
            name = f"{'early' if early else 'whole-batch'}-{i + 1}"
            dep = E2EConfig(
                name, {REVIEW.name: backend, QUERY.name: "torch"}, {REVIEW.name: 32, QUERY.name: 64},
                tasks=(REVIEW.name,), adapter_dir=info["adapter_dir"], early_answers=early,
            )  # fmt: skip
            e2e = end_to_end(s, cfg, dep, work)[REVIEW.name]
            row = {"run": name, "early_answers": early, **{k: e2e[k] for k in KEYS}}
            out["runs"].append(row)
            print(_line(row), flush=True)
    return out


def _line(r: dict[str, Any]) -> str:
    a, b = r["latency_at_50pct"], r["latency_at_90pct"]
    return (
        f"| {r['run']} | {r['events_per_s']:.0f} | {a['p50_ms']:.0f} / {a['p95_ms']:.0f} / {a['p99_ms']:.0f} "
        f"| {b['p50_ms']:.0f} / {b['p95_ms']:.0f} / {b['p99_ms']:.0f} | {r['scorer_cpu_s_per_1000']:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--backend", default="onnx-int8")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="early-answers-") as tmp:
        result = run(args.backend, args.pairs, Path(tmp))
    print("| run | ev/s | p50 / p95 / p99 ms at 50 % | at 90 % | CPU s / 1000 ev |")
    print("|---|---|---|---|---|")
    for r in result["runs"]:
        print(_line(r))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
