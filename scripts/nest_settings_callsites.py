#!/usr/bin/env python3
"""Rewrite call sites of the flat ``Settings`` attributes to the nested groups (re-runnable).

    python nest_settings_callsites.py REPO_ROOT [--dry-run] [--format] [paths ...]

What it does, on every ``*.py`` under ``REPO_ROOT/workers`` and ``REPO_ROOT/tests`` (or the
given paths, relative to the root), except ``workers/streamtune/core/settings.py`` itself:

* ``<recv>.<flat>`` -> ``<recv>.<group>.<attr>`` (``settings.trainer_lr`` -> ``settings.trainer.lr``)
  where ``<recv>`` is a Settings receiver (see below) and ``<flat>`` a key of ``FLAT_FIELDS``;
* ``<recv>.model_copy(update={"k": v, **more})`` -> ``<recv>.replace(k=v, **more)`` when every
  literal key is a flat setting name.

The mapping is read (``ast.literal_eval``, nothing imported) from ``FLAT_FIELDS`` in
``REPO_ROOT/workers/streamtune/core/settings.py``, so the script follows the table.

Settings receivers:

* strong: expressions that are a Settings everywhere in this code base (``settings``,
  ``self.settings``, ``Settings()``, ``_settings()``, ``tsettings`` ...): always rewritten;
* weak: short names that usually are one (``s``, ``base``, ``strict``, ``slow`` ...), and any name
  that the enclosing functions bind as a Settings (parameter or ``AnnAssign`` annotated
  ``Settings``, assigned from ``Settings(...)``, ``_settings()`` or ``<settings>.replace/
  model_copy(...)``). A weak receiver without such evidence is rewritten only for flat names
  that no other class of the tree also has as an attribute (``backend``, ``shadow``,
  ``group_id``, ``score_ttl_s`` ... are found by scanning ``self.X = ...`` and class-body
  annotations); those are listed as SKIPPED for a human (mypy finds the real ones in workers/).

It is idempotent: a rewritten access has a group (``settings.trainer``) as its receiver, which
is never a receiver. It also lists what it cannot rewrite (``MANUAL``): ``Settings.model_fields``,
``getattr``/``hasattr`` with a flat-name string, ``model_copy`` with a non-literal update.
Run ``ruff format`` on the changed files afterwards (``--format`` does).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS_PY = Path("workers/streamtune/core/settings.py")
STRONG = {
    "settings",
    "self.settings",
    "self._settings",
    "worker.settings",
    "res.settings",
    "resources.settings",
    "Settings()",
    "_settings()",
    "tsettings",
    "rsettings",
    "trainer_settings",
    "scorer_settings",
    "base_settings",
}
WEAK = {"s", "s1", "s2", "si", "base", "slow", "fast", "strict", "lenient", "mixed", "sasl", "wrong", "bad"}
SETTINGS_ANN = re.compile(r"(?<![\w.])Settings\b")


def load_table(root: Path) -> dict[str, tuple[str, str]]:
    tree = ast.parse((root / SETTINGS_PY).read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "FLAT_FIELDS" and node.value is not None:
            table = ast.literal_eval(node.value)
            return {str(k): (str(v[0]), str(v[1])) for k, v in table.items()}
    raise SystemExit(f"{root / SETTINGS_PY}: no FLAT_FIELDS table (is this the nested settings?)")


def other_class_attrs(files: list[Path], flat: set[str]) -> set[str]:
    """Flat names that some other class also has as an attribute (ambiguous for weak receivers)."""
    found: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        found.add(stmt.target.id)
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    found.add(t.attr)
    return found & flat


@dataclass
class Edit:
    start: tuple[int, int]  # (line, col) 1-based line, 0-based col (ast offsets)
    end: tuple[int, int]
    text: str
    drop_blank_line: bool = False  # a deletion that leaves a blank line takes the line with it


@dataclass
class Report:
    changed: list[str] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    manual: list[str] = field(default_factory=list)


def _is_settings_call(value: ast.expr, known: set[str]) -> bool:
    if not isinstance(value, ast.Call):
        return False
    func = ast.unparse(value.func)
    if func in {"Settings", "_settings"} or func.endswith(".Settings"):
        return True
    if isinstance(value.func, ast.Attribute) and value.func.attr in {"replace", "model_copy"}:
        recv = ast.unparse(value.func.value)
        return recv in STRONG or recv in known
    return False


def _bound_settings(scope: ast.AST, inherited: set[str]) -> set[str]:
    """Names bound as a Settings directly in ``scope`` (not in nested functions)."""
    known = set(inherited)
    if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        args = scope.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if a.annotation is not None and SETTINGS_ANN.search(ast.unparse(a.annotation)):
                known.add(a.arg)
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and SETTINGS_ANN.search(ast.unparse(node.annotation))
        ):
            known.add(node.target.id)
        if isinstance(node, ast.Assign) and _is_settings_call(node.value, known):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    known.add(t.id)
        if isinstance(node, ast.NamedExpr) and _is_settings_call(node.value, known):
            known.add(node.target.id)
        stack.extend(ast.iter_child_nodes(node))
    return known


class Rewriter(ast.NodeVisitor):
    def __init__(
        self, path: str, table: dict[str, tuple[str, str]], ambiguous: set[str], report: Report
    ) -> None:
        self.path = path
        self.table = table
        self.ambiguous = ambiguous
        self.report = report
        self.edits: list[Edit] = []
        self.scopes: list[set[str]] = []

    def _known(self) -> set[str]:
        return self.scopes[-1] if self.scopes else set()

    def _visit_scope(self, node: ast.AST) -> None:
        self.scopes.append(_bound_settings(node, self._known()))
        self.generic_visit(node)
        self.scopes.pop()

    visit_Module = _visit_scope
    visit_FunctionDef = _visit_scope
    visit_AsyncFunctionDef = _visit_scope
    visit_Lambda = _visit_scope

    def _receiver(self, node: ast.expr, attr: str) -> str | None:
        """'yes', 'skip' or None (not a settings receiver)."""
        recv = ast.unparse(node)
        if recv in STRONG or recv in self._known():
            return "yes"
        if recv in WEAK:
            return "skip" if attr in self.ambiguous else "yes"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in self.table and node.end_lineno is not None and node.end_col_offset is not None:
            verdict = self._receiver(node.value, node.attr)
            where = f"{self.path}:{node.lineno}"
            if verdict == "yes":
                group, attr = self.table[node.attr]
                end = (node.end_lineno, node.end_col_offset)
                start = (node.end_lineno, node.end_col_offset - len(node.attr))
                self.edits.append(Edit(start, end, f"{group}.{attr}"))
                self.report.rewrites.append(f"{where}: {ast.unparse(node)} -> .{group}.{attr}")
            elif verdict == "skip":
                self.report.skipped.append(
                    f"{where}: {ast.unparse(node)} (receiver not known to be a Settings)"
                )
        if node.attr == "model_fields" and ast.unparse(node.value) == "Settings":
            self.report.manual.append(
                f"{self.path}:{node.lineno}: Settings.model_fields (use Settings.flat_fields())"
            )
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Name)
            and func.id in {"getattr", "hasattr", "setattr"}
            and len(node.args) >= 2
        ):
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in self.table:
                self.report.manual.append(f"{self.path}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(func, ast.Attribute) and func.attr == "model_copy":
            self._model_copy(node, func)
        self.generic_visit(node)

    def _model_copy(self, node: ast.Call, func: ast.Attribute) -> None:
        if self._receiver(func.value, "") != "yes":
            return
        where = f"{self.path}:{node.lineno}"
        update = next((k.value for k in node.keywords if k.arg == "update"), None)
        if node.args or len(node.keywords) != 1 or not isinstance(update, ast.Dict):
            self.report.manual.append(f"{where}: {ast.unparse(node)[:80]} (not a literal update dict)")
            return
        keys = [k for k in update.keys if k is not None]
        if not keys or not all(isinstance(k, ast.Constant) and k.value in self.table for k in keys):
            if any(isinstance(k, ast.Constant) and k.value in self.table for k in keys):
                self.report.manual.append(f"{where}: {ast.unparse(node)[:80]} (keys not all flat settings)")
            return
        # Text-preserving: comments, layout and the values' own source stay; only the call name,
        # ``update={``, each ``"key":`` and the closing ``}`` change.
        kw = next(k for k in node.keywords if k.arg == "update")
        assert func.end_lineno is not None and func.end_col_offset is not None
        assert update.end_lineno is not None and update.end_col_offset is not None
        name_start = (func.end_lineno, func.end_col_offset - len("model_copy"))
        self.edits.append(Edit(name_start, (func.end_lineno, func.end_col_offset), "replace"))
        self.edits.append(
            Edit((kw.lineno, kw.col_offset), (update.lineno, update.col_offset + 1), "", drop_blank_line=True)
        )
        for k, v in zip(update.keys, update.values, strict=True):
            if isinstance(k, ast.Constant):
                self.edits.append(Edit((k.lineno, k.col_offset), (v.lineno, v.col_offset), f"{k.value}="))
        self.edits.append(
            Edit(
                (update.end_lineno, update.end_col_offset - 1),
                (update.end_lineno, update.end_col_offset),
                "",
                drop_blank_line=True,
            )
        )
        self.report.rewrites.append(f"{where}: model_copy(update=...) -> replace(...)")


def apply(src: str, edits: list[Edit]) -> str:
    data = src.encode()
    offsets = [0]
    for line in src.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line.encode()))

    def pos(lc: tuple[int, int]) -> int:
        return offsets[lc[0] - 1] + lc[1]  # ast columns are utf-8 byte offsets

    spans: list[tuple[int, int, str]] = []
    for e in edits:
        s, t = pos(e.start), pos(e.end)
        if e.drop_blank_line and not e.text:
            bol = data.rfind(b"\n", 0, s) + 1
            eol = data.find(b"\n", t)
            eol = len(data) if eol < 0 else eol
            if not data[bol:s].strip() and not data[t:eol].strip():
                s, t = bol, min(eol + 1, len(data))
        spans.append((s, t, e.text))
    # Outermost edits win; an edit inside another is left to the next pass.
    spans.sort(key=lambda x: (x[0], -x[1]))
    kept: list[tuple[int, int, str]] = []
    for s, t, text in spans:
        if kept and s < kept[-1][1]:
            continue
        kept.append((s, t, text))
    for s, t, text in reversed(kept):
        data = data[:s] + text.encode() + data[t:]
    return data.decode()


def rewrite_file(
    path: Path, rel: str, table: dict[str, tuple[str, str]], ambiguous: set[str], report: Report
) -> str | None:
    src = path.read_text()
    out = src
    for _ in range(5):  # nested edits (an attribute inside a model_copy value) need another pass
        try:
            tree = ast.parse(out)
        except SyntaxError as e:
            report.manual.append(f"{rel}: cannot parse ({e})")
            return None
        sub = Report()
        rw = Rewriter(rel, table, ambiguous, sub)
        rw.visit(tree)
        if _ == 0:
            report.skipped += sub.skipped
            report.manual += sub.manual
        if not rw.edits:
            break
        report.rewrites += sub.rewrites
        out = apply(out, rw.edits)
    return out if out != src else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("paths", nargs="*", help="files or folders relative to root (default: workers tests)")
    ap.add_argument("--dry-run", action="store_true", help="report, change nothing (exit 1 if changes)")
    ap.add_argument("--format", action="store_true", help="ruff format the changed files")
    ap.add_argument("--quiet", action="store_true", help="no per-rewrite lines")
    args = ap.parse_args()
    root: Path = args.root.resolve()
    table = load_table(root)
    bases = [root / p for p in (args.paths or ["workers", "tests"])]
    files = sorted({f for b in bases for f in ([b] if b.is_file() else b.rglob("*.py"))})
    files = [f for f in files if f.resolve() != (root / SETTINGS_PY).resolve()]
    scan = sorted({f for b in (root / "workers", root / "tests") if b.exists() for f in b.rglob("*.py")})
    scan = [f for f in scan if f.resolve() != (root / SETTINGS_PY).resolve()]
    ambiguous = other_class_attrs(scan, set(table)) | {"shadow", "backend"}
    report = Report()
    for f in files:
        rel = str(f.relative_to(root))
        new = rewrite_file(f, rel, table, ambiguous, report)
        if new is not None:
            report.changed.append(rel)
            if not args.dry_run:
                f.write_text(new)
    if not args.quiet:
        for line in report.rewrites:
            print("REWRITE", line)
    for line in report.skipped:
        print("SKIPPED", line)
    for line in report.manual:
        print("MANUAL ", line)
    print(
        f"{len(report.rewrites)} rewrites in {len(report.changed)} files"
        f"{' (dry run)' if args.dry_run else ''}; {len(report.skipped)} skipped; {len(report.manual)} manual",
        file=sys.stderr,
    )
    if args.format and report.changed and not args.dry_run:
        ruff = Path(sys.executable).with_name("ruff")
        cmd = [str(ruff) if ruff.exists() else "ruff", "format", *report.changed]
        subprocess.run(cmd, cwd=root, check=False)
    return 1 if args.dry_run and report.changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
