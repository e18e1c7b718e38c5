"""Layering and size rules of the code base, checked on the source (AST), so they hold whatever the final
file names are.

1. The maths and formats layers import no presentation: not rich, click or matplotlib, and not the
   modules that present (``views``, ``render``, ``report``, ``commands``, ``cli``). Only commands, views,
   report and the CLI present.
2. No module in ``lora_inspect/`` is over 400 lines, and no function over 60.
3. No module uses another module's private names: no ``from .x import _name`` and no ``x._name`` on an
   imported ``lora_inspect`` module (a private *module*, ``from . import _safe_re``, is the package's own
   and may be imported). What two modules share is public in the module whose concept it is.

The lists below are the places to edit when modules move. The allow-lists name today's offenders; the
refactor empties them, and a stale entry fails so that they only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lora_inspect"

# The maths / formats / file layer: globs relative to lora_inspect/ (missing ones are skipped).
LOWER_LAYER = [
    "adapter.py", "orientation.py", "naming.py", "spectrum.py", "analysis.py", "validate.py", "_safe_re.py",
    "_plain_keys.py", "files.py", "peft_rules.py", "footprint.py", "diff.py", "checks/*.py", "units.py",
    "defaults.py", "errors.py", "basemodels.py", "formats/*.py", "formats/**/*.py", "rewrite/*.py", "hf/*.py",
    "scan/*.py", "cholesky.py", "basecheckpoint.py", "basemetrics.py", "integrity.py", "ties.py", "optional.py",
]
# at least these must be found, or the globs above are out of date
MUST_EXIST = ["adapter.py", "spectrum.py", "analysis.py", "validate.py", "files.py", "formats/layout.py",
              "rewrite/truncation.py", "checks/rules.py"]
FORBIDDEN_TOP = {"rich", "click", "matplotlib"}
FORBIDDEN_OURS = {"lora_inspect.views", "lora_inspect.render", "lora_inspect.report", "lora_inspect.commands",
                  "lora_inspect.cli"}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# Offenders allowed (empty: the redesign, issue 10, removed them all; keep it so).
LAYERING_ALLOWED: set[str] = set()
LONG_MODULES_ALLOWED: set[str] = set()
LONG_FUNCTIONS_ALLOWED: set[str] = set()
PRIVATE_IMPORTS_ALLOWED: set[str] = set()


def _lower_layer_files() -> list[Path]:
    for name in MUST_EXIST:
        assert (PKG / name).is_file(), f"{name} moved: update LOWER_LAYER / MUST_EXIST in {Path(__file__).name}"
    found: set[Path] = set()
    for pattern in LOWER_LAYER:
        found.update(p for p in PKG.glob(pattern) if p.is_file())
    return sorted(found)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from . import views`
    return names


def _forbidden(name: str) -> str | None:
    if name.split(".")[0] in FORBIDDEN_TOP:
        return name.split(".")[0]
    for ours in FORBIDDEN_OURS:
        if name == ours or name.startswith(ours + "."):
            return ours
    return None


def _layering_violations() -> set[str]:
    out = set()
    for path in _lower_layer_files():
        for name in _imports(path):
            bad = _forbidden(name)
            if bad:
                out.add(f"{path.relative_to(PKG).as_posix()} -> {bad}")
    return out


def _all_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _long_modules() -> set[str]:
    return {p.relative_to(PKG).as_posix() for p in _all_modules()
            if len(p.read_text(encoding="utf-8").splitlines()) > MAX_MODULE_LINES}


def _long_functions() -> set[str]:
    out = set()
    for path in _all_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    out.add(f"{path.relative_to(PKG).as_posix()}:{node.name}")
    return out


def _check(found: set[str], allowed: set[str], what: str) -> None:
    new, stale = found - allowed, allowed - found
    assert not new, f"{what}: {sorted(new)}"
    assert not stale, f"fixed, remove from the allow-list in {Path(__file__).name}: {sorted(stale)}"


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    assert _forbidden("rich.table") == "rich" and _forbidden("lora_inspect.views.rank") == "lora_inspect.views"
    assert _forbidden("lora_inspect.validate") is None and _forbidden("richer") is None
    names = _imports(PKG / "formats" / "__init__.py")
    assert any(n.startswith("lora_inspect.formats.") for n in names)


def test_maths_and_formats_import_no_presentation():
    _check(_layering_violations(), LAYERING_ALLOWED, "presentation imported by the maths/formats layer")


def test_no_module_over_400_lines():
    _check(_long_modules(), LONG_MODULES_ALLOWED, f"modules over {MAX_MODULE_LINES} lines")


def test_no_function_over_60_lines():
    _check(_long_functions(), LONG_FUNCTIONS_ALLOWED, f"functions over {MAX_FUNCTION_LINES} lines")


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from … import`` in ``path``."""
    if not node.level:
        return node.module or ""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    """Whether the dotted ``lora_inspect…`` name is a module or package of ours (not a name inside one)."""
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path) -> set[str]:
    """``from X import _name`` (X ours, ``_name`` not a module) and ``mod._name`` on an imported module of ours."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PKG).as_posix()
    out: set[str] = set()
    modules: set[str] = set()  # local names bound to modules of ours
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(path, node)
            if not (mod == "lora_inspect" or mod.startswith("lora_inspect.")):
                continue
            for a in node.names:
                if _is_module(f"{mod}.{a.name}"):
                    modules.add(a.asname or a.name)
                elif _private(a.name):
                    out.add(f"{rel}: from {mod} import {a.name}")
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("lora_inspect"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in modules):
            out.add(f"{rel}: {node.value.id}.{node.attr}")
    return out


def test_the_private_name_checker_sees_both_forms(tmp_path):
    probe = PKG / "rewrite" / "_layering_probe.py"  # never written: parsed from a string below
    tree_src = "from .truncation import _x, layout_of\nfrom . import truncation\nfrom .. import _safe_re\ntruncation._y\n"
    import unittest.mock as mock

    with mock.patch.object(Path, "read_text", return_value=tree_src):
        found = _private_uses(probe)
    assert found == {"rewrite/_layering_probe.py: from lora_inspect.rewrite.truncation import _x",
                     "rewrite/_layering_probe.py: truncation._y"}


def test_no_module_imports_another_modules_private_names():
    found = set().union(*(_private_uses(p) for p in _all_modules()))
    _check(found, PRIVATE_IMPORTS_ALLOWED, "private names used across modules")
