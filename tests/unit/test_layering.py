"""The package's layers, checked on the source: every ``import`` / ``from`` statement of every
module under ``workers/streamtune``, at module level and inside functions, read with ``ast``
(nothing is imported). Each rule's failure lists every offending (module, line, import).

- ``streamtune.devtools`` (stack, demo, bench, chaos) is imported by nothing outside it, except
  by ``streamtune.cli`` inside its command functions;
- ``streamtune.core`` imports only ``streamtune.core`` and third-party libraries, never Kafka,
  Faust, Redis or torch;
- the serving side (scorer, model, kafka, rollout, ops) never imports training or the trainer;
- the pure stages (batch gate, overlap, sessions, offset guard, core, drift) do not import Faust, not
  even through the package modules they import;
- matplotlib and py-spy (the ``bench`` extra) are used by devtools only;
- the torch-free modules (the linear stage, the cascade, tokenization, the trees, drift) import neither torch,
  transformers nor peft, nor pickle in any form, at any level or through the package modules
  they import.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import streamtune

PACKAGE_DIR = Path(streamtune.__file__).resolve().parent
ROOT = "streamtune"
DEVTOOLS = "streamtune.devtools"
CORE = "streamtune.core"
SERVING = [
    "streamtune.scorer",
    "streamtune.model",
    "streamtune.kafka",
    "streamtune.rollout",
    "streamtune.ops",
]
TRAINING = ["streamtune.training", "streamtune.trainer"]
NOT_IN_CORE = ["faust", "mode", "aiokafka", "kafka", "redis", "torch"]
FAUST = ["faust", "mode", "aiokafka"]  # mode and aiokafka: Faust's own foundations
FAUST_FREE = [
    "streamtune.scorer.gate",
    "streamtune.scorer.overlap",
    "streamtune.scorer.sessions",
    "streamtune.ops.progress",
    "streamtune.kafka.offsets",
    "streamtune.core",  # and every module in it
    "streamtune.drift",
]
BENCH_ONLY = ["matplotlib", "py_spy"]
TORCH_FREE = [
    "streamtune.model.linear",
    "streamtune.model.cascade",
    "streamtune.model.tokens",
    "streamtune.model.trees",
    "streamtune.drift",
]
TORCH = ["torch", "transformers", "peft"]
PICKLE = ["pickle", "joblib", "dill", "cloudpickle"]
CLI = "streamtune.cli"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it names, absolute: "faust", "streamtune.core.settings.Settings"
    line: int
    top_level: bool  # runs when the module is imported (not inside a function)

    def __str__(self) -> str:
        where = "module level" if self.top_level else "in a function"
        return f"{self.module}:{self.line} imports {self.target} ({where})"


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def within_any(name: str, prefixes: list[str]) -> bool:
    return any(within(name, p) for p in prefixes)


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import statement in ``source``, wherever it is; relative ones made absolute. A
    ``from a import b`` names ``a.b`` (``b`` may be a submodule or an attribute of ``a``)."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(module, a.name, node.lineno, top_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.extend(Import(module, f"{base}.{a.name}", node.lineno, top_level) for a in node.names)
        in_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, top_level and not in_function)

    visit(ast.parse(source), True)
    return found


def _scan() -> tuple[dict[str, list[Import]], dict[str, Path]]:
    paths = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts}
    table = {m: imports_of(p.read_text(), m, p.name == "__init__.py") for m, p in paths.items()}
    return table, paths


IMPORTS, PATHS = _scan()
ALL = [imp for imps in IMPORTS.values() for imp in imps]


def _report(rule: str, offending: Sequence[object]) -> str:
    return f"{rule}: {len(offending)} offending import(s)\n  " + "\n  ".join(str(o) for o in offending)


def _own_module(target: str) -> str | None:
    """The package module ``target`` (``streamtune.x.y`` or ``streamtune.x.y.Name``) refers to."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in IMPORTS:
            return ".".join(parts[:cut])
    return None


def _loaded_on_import(module: str) -> dict[str, list[str]]:
    """The package modules executed when ``module`` is imported (its packages' ``__init__``
    files, then every module-level import of a package module, transitively), each with the
    chain that brings it in."""
    chains: dict[str, list[str]] = {}
    todo = [(module, [module])]
    while todo:
        m, chain = todo.pop()
        if m in chains or m not in IMPORTS:
            continue
        chains[m] = chain
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        nxt = [*parents, *(own for i in IMPORTS[m] if i.top_level and (own := _own_module(i.target)))]
        todo.extend((n, [*chain, n]) for n in nxt if n not in chains)
    return chains


# --- the scan itself ---------------------------------------------------------------------------


def test_the_scan_sees_the_whole_package() -> None:
    assert len(IMPORTS) >= 50, sorted(IMPORTS)
    for m in ("streamtune", "streamtune.cli", "streamtune.kafka.compat", "streamtune.devtools.stack"):
        assert m in IMPORTS, m
    assert any(i.target.startswith("faust") for i in IMPORTS["streamtune.kafka.compat"])


def test_imports_are_found_at_every_level_and_relative_ones_resolved() -> None:
    source = (
        "import os, faust.streams as fs\n"
        "from . import sibling\n"
        "from ..core.settings import Settings\n"
        "class C:\n"
        "    import json\n"
        "    def m(self):\n"
        "        from streamtune.devtools import stack\n"
        "async def f():\n"
        "    import torch\n"
        "g = lambda: __import__('x')\n"
        "if True:\n"
        "    import numpy\n"
    )
    found = {(i.target, i.top_level) for i in imports_of(source, "streamtune.scorer.gate", False)}
    assert found == {
        ("os", True),
        ("faust.streams", True),
        ("streamtune.scorer.sibling", True),
        ("streamtune.core.settings.Settings", True),
        ("json", True),  # a class body runs at import
        ("streamtune.devtools.stack", False),
        ("torch", False),
        ("numpy", True),
    }
    pkg = {i.target for i in imports_of("from .gate import BatchGate", "streamtune.scorer", True)}
    assert pkg == {"streamtune.scorer.gate.BatchGate"}


# --- the rules ---------------------------------------------------------------------------------


def test_nothing_outside_devtools_imports_devtools() -> None:
    bad = [
        i
        for i in ALL
        if within(i.target, DEVTOOLS)
        and not within(i.module, DEVTOOLS)
        and not (i.module == CLI and not i.top_level)  # the CLI's commands import it when run
    ]
    assert not bad, _report("only devtools (and streamtune.cli, inside its commands) imports devtools", bad)


def test_core_imports_only_core_and_no_kafka_faust_redis_or_torch() -> None:
    bad = [
        i
        for i in ALL
        if within(i.module, CORE)
        and ((within(i.target, ROOT) and not within(i.target, CORE)) or within_any(i.target, NOT_IN_CORE))
    ]
    assert not bad, _report(f"streamtune.core imports only streamtune.core, never {NOT_IN_CORE}", bad)


def test_the_serving_side_never_imports_training_or_the_trainer() -> None:
    bad = [i for i in ALL if within_any(i.module, SERVING) and within_any(i.target, TRAINING)]
    assert not bad, _report(f"{SERVING} never import {TRAINING}", bad)


def test_the_pure_stages_do_not_import_faust() -> None:
    pure = [m for m in IMPORTS if within_any(m, FAUST_FREE)]
    assert "streamtune.scorer.gate" in pure and "streamtune.kafka.offsets" in pure
    assert "streamtune.core.settings" in pure
    direct = [i for m in pure for i in IMPORTS[m] if within_any(i.target, FAUST)]
    through: list[str] = []  # Faust loaded by a package module the pure one imports at module level
    for m in pure:
        for loaded, chain in _loaded_on_import(m).items():
            if loaded == m:
                continue
            hits = [
                f"{i.target} (line {i.line})"
                for i in IMPORTS[loaded]
                if i.top_level and within_any(i.target, FAUST)
            ]
            if hits:
                through.append(f"{m} loads {', '.join(hits)} through {' -> '.join(chain)}")
    assert not direct and not through, _report(f"{FAUST_FREE} do not import {FAUST}", [*direct, *through])


def test_bench_tools_are_used_by_devtools_only() -> None:
    bad = [i for i in ALL if within_any(i.target, BENCH_ONLY) and not within(i.module, DEVTOOLS)]
    runs_py_spy = [  # py-spy is a program, not a module: look for its name as a string too
        f"{m}:{node.lineno} names the py-spy program"
        for m, path in PATHS.items()
        if not within(m, DEVTOOLS)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value == "py-spy"
    ]
    assert not bad and not runs_py_spy, _report(
        "matplotlib and py-spy (the bench extra) only in devtools", [*bad, *runs_py_spy]
    )


def test_the_linear_stage_and_the_cascade_need_no_torch_and_no_pickle() -> None:
    assert all(m in IMPORTS for m in TORCH_FREE), [m for m in TORCH_FREE if m not in IMPORTS]
    banned = [*TORCH, *PICKLE]
    direct = [i for m in TORCH_FREE for i in IMPORTS[m] if within_any(i.target, banned)]
    through: list[str] = []  # loaded by a package module the torch-free one imports at module level
    for m in TORCH_FREE:
        for loaded, chain in _loaded_on_import(m).items():
            hits = [f"{i.target} (line {i.line})" for i in IMPORTS[loaded]
                    if loaded != m and i.top_level and within_any(i.target, banned)]  # fmt: skip
            if hits:
                through.append(f"{m} loads {', '.join(hits)} through {' -> '.join(chain)}")
    assert not direct and not through, _report(f"{TORCH_FREE} import none of {banned}", [*direct, *through])


@pytest.mark.parametrize("module", [m for m in FAUST_FREE if m != CORE])
def test_the_named_pure_modules_exist_or_are_skipped(module: str) -> None:
    if module not in IMPORTS:
        pytest.skip(f"{module} does not exist (yet)")
    assert PATHS[module].is_file()


def test_every_test_module_name_is_unique_across_the_tiers() -> None:
    """pytest imports test modules by basename (``rootdir``-relative, no packages): two tiers with
    the same file name make the whole suite fail at collection, though each tier alone passes."""
    tests = Path(__file__).resolve().parents[1]
    names: dict[str, list[str]] = {}
    for p in tests.rglob("test_*.py"):
        names.setdefault(p.name, []).append(str(p.relative_to(tests)))
    assert not {n: ps for n, ps in names.items() if len(ps) > 1}
