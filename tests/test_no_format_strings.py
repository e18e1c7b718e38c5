"""Behaviour is chosen by the layout object (``ad.layout``, ``lora_inspect.formats.layout_of``) or by typed
fields, never by comparing format strings outside ``lora_inspect/formats/`` (issue 19: a layout is the one home
of everything about its format). Checked on the source (AST): ``x.format == …``, ``!=``, ``in``, ``is``,
``x.format.startswith(…)``/``endswith``, ``match x.format``, and the same on ``source_format``."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lora_inspect"
ALLOWED = PKG / "formats"  # the layouts compare their own formats
ATTRS = {"format", "source_format"}


def _is_format(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in ATTRS


def _offends(node: ast.AST) -> bool:
    if isinstance(node, ast.Compare):
        return any(_is_format(x) for x in [node.left, *node.comparators])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("startswith", "endswith", "removeprefix", "partition", "split") and \
            _is_format(node.func.value)
    return isinstance(node, ast.Match) and _is_format(node.subject)


def offences(source: str) -> list[int]:
    """Line numbers of format-string comparisons in ``source``."""
    return sorted(node.lineno for node in ast.walk(ast.parse(source)) if _offends(node))


def test_the_scan_sees_every_form():
    src = """
a = ad.format == "peft"
b = "kohya" != res.source_format
c = ad.format in ("kohya", "lycoris")
d = ad.format.startswith("peft")
e = canon.source_format.startswith(("peft", "mlx"))
f = x.format is Fmt.DIR
match ad.format:
    case "mlx":
        pass
"""
    assert sorted(offences(src)) == [2, 3, 4, 5, 6, 7, 8]
    fine = """
s = "{} {}".format(a, b)
t = f"{ad.format}"
row.format = ad.format
doc = {"format": ad.format}
u = layout.caps.alpha == AlphaHome.SCALE
"""
    assert offences(fine) == []


def test_no_format_string_comparisons_outside_formats():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if ALLOWED in path.parents:
            continue
        for line in offences(path.read_text(encoding="utf-8")):
            found.append(f"{path.relative_to(PKG.parent).as_posix()}:{line}")
    assert not found, ("format strings compared outside lora_inspect/formats/ (ask the layout, ad.layout / "
                       f"formats.layout_of, or a typed field instead): {found}")
