"""Rules of the suite itself (issue 18), read from the test sources: a module of the project that cannot be
imported fails its tests instead of skipping them, a test that expects the project's one-line error names
ClipdiffError rather than any Exception, and the growth benchmark's test (a fresh interpreter per size) stays out of
``make test-fast``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def calls(name: str) -> Iterator[tuple[str, ast.Call]]:
    """Every call of ``pytest.<name>(…)`` or a bare ``<name>(…)`` in the test sources, with its file:line."""
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == name:
                    yield f"{path.name}:{node.lineno}", node


def first_argument(call: ast.Call, keyword: str) -> ast.expr | None:
    return call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == keyword), None)


def test_no_importorskip_of_the_projects_own_modules():
    """``pytest.importorskip("clipdiff…")`` turns a module of the project that cannot be imported (a missing
    dependency, a typo in an import: ModuleNotFoundError) into a skipped test instead of a failed one."""
    bad = []
    for where, call in calls("importorskip"):
        arg = first_argument(call, "modname")
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)) or arg.value.split(".")[0] == "clipdiff":
            bad.append(f"{where} {ast.unparse(call)}")
    assert not bad, bad


def test_raises_names_the_exception_it_means():
    """``pytest.raises(Exception)`` passes on any error, e.g. a TypeError where the project's ClipdiffError (one
    line for the user) was meant."""
    broad = {"Exception", "BaseException"}
    bad = []
    for where, call in calls("raises"):
        arg = first_argument(call, "expected_exception")
        names = arg.elts if isinstance(arg, ast.Tuple) else [arg]
        if any(isinstance(n, ast.Name) and n.id in broad for n in names):
            bad.append(f"{where} {ast.unparse(call)}")
    assert not bad, bad


def test_the_growth_benchmark_test_is_marked_slow():
    tree = ast.parse((TESTS / "test_bench.py").read_text(encoding="utf-8"))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "test_growth_rows"]
    assert "pytest.mark.slow" in {ast.unparse(d) for d in fn.decorator_list}
