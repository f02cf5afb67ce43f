"""Layers read top-down: every ``import clipdiff…`` (at module level or inside a function) points to a lower layer
or stays inside its own package. Parsed with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clipdiff"

# top to bottom; a module's layer is that of its longest matching prefix
LAYERS = [
    ("entry points", ["clipdiff", "clipdiff.train", "clipdiff.sample", "clipdiff.evaluate", "clipdiff.label",
                      "clipdiff.render", "clipdiff.pipeline", "clipdiff.aggregate", "clipdiff.bench"]),
    ("pipelines and tools", ["clipdiff.pipelines", "clipdiff.eval", "clipdiff.labeling"]),
    ("models", ["clipdiff.models"]),
    ("diffusion math and data", ["clipdiff.diffusion", "clipdiff.data"]),
    ("plumbing", ["clipdiff.utils"]),
    ("errors", ["clipdiff.errors"]),
]


def unit(module: str) -> tuple[int, str]:
    """(layer index, the package or entry module that owns ``module``)."""
    best = max((p for _, prefixes in LAYERS for p in prefixes if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if best in prefixes), best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every clipdiff import in the file, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "clipdiff":
            out += [(node.lineno, f"clipdiff.{a.name}") for a in node.names]  # from clipdiff import eval
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
    return [(line, m) for line, m in out if m == "clipdiff" or m.startswith("clipdiff.")]


def violations(paths) -> list[str]:
    bad = []
    for path in paths:
        src = module_name(path)
        src_layer, src_unit = unit(src)
        for line, target in imports(path):
            layer, owner = unit(target)
            if owner == src_unit or layer > src_layer or (layer == src_layer == 0):
                continue  # its own package, a lower layer, or one entry point using another
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} {src} ({LAYERS[src_layer][0]}) imports "
                       f"{target} ({LAYERS[layer][0]})")
    return bad


def test_no_import_points_up_or_sideways():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    assert violations(files) == []


def test_the_checker_sees_upward_imports_inside_functions(tmp_path, monkeypatch):
    fake = tmp_path / "clipdiff"
    (fake / "diffusion").mkdir(parents=True)
    (fake / "diffusion" / "guide.py").write_text(
        "import torch\nfrom clipdiff.diffusion.schedule import x\n\n\ndef f():\n"
        "    from clipdiff.models.components.clip import load_clip\n")
    (fake / "eval").mkdir()
    (fake / "eval" / "fid.py").write_text("from clipdiff import pipelines\nfrom clipdiff.models import export\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations(sorted(fake.rglob("*.py"))) == [
        ("clipdiff/diffusion/guide.py:6 clipdiff.diffusion.guide (diffusion math and data) imports "
        "clipdiff.models.components.clip (models)"),
        ("clipdiff/eval/fid.py:1 clipdiff.eval.fid (pipelines and tools) imports clipdiff.pipelines "
        "(pipelines and tools)")]
