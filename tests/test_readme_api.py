"""The Python API page (docs/api.md) is true: its examples run, from a scratch directory holding the
samples, and print what their comments say. ``lora_inspect.__all__`` is curated, resolves lazily, and
``import lora_inspect`` stays free of torch."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import lora_inspect

ROOT = Path(__file__).resolve().parents[1]


def _api_examples() -> list[str]:
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", page, flags=re.S)


def _expected_prints(code: str) -> list[str]:
    """For each ``print(...)`` line, the text of its trailing ``# comment`` or of a ``# …`` line right after."""
    lines = code.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("print("):
            continue
        if "  # " in line:
            out.append(line.split("  # ", 1)[1])
        else:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert nxt.startswith("# "), f"print without its expected output in a comment: {line}"
            out.append(nxt[2:])
    return out


def test_the_python_api_examples_run_and_print_what_they_say(tmp_path):
    examples = _api_examples()
    assert len(examples) >= 5  # load_adapter, analyse, truncate/rescale, footprint, check
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    here = os.getcwd()
    namespace: dict = {}
    printed = io.StringIO()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(printed):
            for code in examples:
                exec(compile(code, "docs/api.md", "exec"), namespace)
    finally:
        os.chdir(here)
    expected = [e for code in examples for e in _expected_prints(code)]
    assert printed.getvalue().splitlines() == expected


def test_all_is_curated_and_every_name_resolves_to_what_it_names():
    assert lora_inspect.__all__[0] == "__version__"
    assert set(lora_inspect.__all__[1:]) == set(lora_inspect._EXPORTS)
    for name in lora_inspect._EXPORTS:
        value = getattr(lora_inspect, name)
        assert not isinstance(value, types.ModuleType), name
        module, attr = lora_inspect._EXPORTS[name].split(":")
        assert value is getattr(sys.modules[module], attr)


def test_exported_names_survive_every_submodule_being_imported():
    """A submodule import binds its name on the package; an exported name must not be one of them.
    In a fresh interpreter, so that no name is cached before the submodules are imported."""
    code = (
        "import pkgutil, types, lora_inspect\n"
        "for info in pkgutil.walk_packages(lora_inspect.__path__, 'lora_inspect.'):\n"
        "    __import__(info.name)\n"
        "bad = [n for n in lora_inspect._EXPORTS if isinstance(getattr(lora_inspect, n), types.ModuleType)]\n"
        "print(bad)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_import_is_cheap():
    code = "import sys, lora_inspect; print('torch' in sys.modules, 'numpy' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.split() == ["False", "False"], res.stderr
