"""The presentation layer is the only one that presents: the domain modules of the views area
(results and maths) import neither rich, matplotlib, click nor :mod:`lora_inspect.views`, checked on
their source (static imports) and in a fresh interpreter (nothing pulled in at import time)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lora_inspect"
DOMAIN = ["analysis.py", "diff.py", "footprint.py", "units.py", "naming.py", "checks"]
FORBIDDEN = ("rich", "matplotlib", "click", "lora_inspect.views", "lora_inspect.report", "lora_inspect.commands")


def _files(entry: str) -> list[Path]:
    p = PKG / entry
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def _imports(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file (relative imports resolved)."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("path", [f for e in DOMAIN for f in _files(e)], ids=lambda p: str(p.relative_to(PKG)))
def test_domain_module_imports_no_presentation(path):
    bad = sorted(n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_resolver_sees_a_relative_import():
    """The check above can fail: relative imports are resolved to the names it looks for."""
    assert "lora_inspect.naming" in _imports(PKG / "checks" / "rules.py")  # `from ..naming import …`
    assert "lora_inspect.views.render" in _imports(PKG / "views" / "inspect.py")  # `from .render import …`


def test_importing_the_domain_loads_no_presentation():
    code = ("import sys\nimport lora_inspect.analysis, lora_inspect.diff, lora_inspect.footprint, lora_inspect.checks\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'matplotlib', 'click')"
            " or m.startswith(('lora_inspect.views', 'lora_inspect.report'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
