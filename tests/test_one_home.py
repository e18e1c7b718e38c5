"""One home each (issue 19): one atomic writer, one definition of each shared constant, one gate for
optional dependencies, one TOML reader for every supported Python.

- Every writer (rewrites' :class:`AtomicOutput`, train's files, the basis cache, scan's Parquet) names its
  temporary the same way, so a process killed between writing and renaming leaves a temporary that
  ``stale_temporaries`` lists and the next write removes; ``os_error`` and ``os.replace`` live in files.py.
- ``PEFT_PREFIX`` is defined in peft_rules.py only, ``KOHYA_PREFIXES`` in formats/kohya.py only, and the
  kohya names the reader accepts are the ones ``hf.apply`` and ``train.verify`` map onto a model.
- Every optional package is imported through ``lora_inspect.optional.require``: without it, one line
  naming the package and the extra, exit 2 through the CLI.
- TOML comes from ``lora_inspect.optional.tomllib``: tomllib on 3.11+, tomli on 3.10 (checked under a
  real Python 3.10 when one is installed, and by running the fallback branch here in any case).
"""

from __future__ import annotations

import ast
import errno
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from builders import run_cli, write_kohya

from lora_inspect.errors import InspectError
from lora_inspect.files import TMP_MARK, AtomicOutput, atomic_path, remove_stale, stale_temporaries
from lora_inspect.optional import EXTRAS, require

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "lora_inspect"
SAMPLE = REPO / "samples" / "text"


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _trees() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(PKG).as_posix(), ast.parse(p.read_text(encoding="utf-8"))) for p in _modules()]


# ------------------------------------------------------------------ 1. one atomic writer

_KILLED = 17
# each writer as a program; os.replace exits the process: killed after the temporary is written, before the rename
WRITERS = {
    "AtomicOutput": """
        from lora_inspect.files import AtomicOutput
        with AtomicOutput(d / "out.safetensors", suffix=".safetensors") as a:
            a.tmp.write_bytes(b"partial")
            a.commit()
    """,
    "train": """
        from lora_inspect.train.io import atomic_write_json
        atomic_write_json({"a": 1}, d / "task.json")
    """,
    "basis cache": """
        import torch
        from lora_inspect.basemetrics import BasisCache
        BasisCache(d).get(("w",), lambda: (torch.eye(2), torch.ones(2, dtype=torch.float64)))
    """,
    "parquet": """
        from lora_inspect.scan.journal import write_parquet
        write_parquet([{"path": "x"}], d / "rows.parquet", [("path", "str")])
    """,
}


def _ours(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".lora-inspect-" in p.name)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_write_killed_before_its_rename_leaves_a_temporary_the_next_write_removes(tmp_path, writer):
    d = tmp_path / "out"
    d.mkdir()
    program = "import os, sys\nfrom pathlib import Path\n" \
              f"sys.path.insert(0, {str(REPO)!r})\nd = Path({str(d)!r})\n" \
              f"os.replace = lambda *a, **k: os._exit({_KILLED})\n" + textwrap.dedent(WRITERS[writer])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", program], stderr=subprocess.PIPE, text=True, env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == _KILLED, err
    left = _ours(d)
    assert len(left) == 1 and f"{TMP_MARK}{proc.pid}-" in left[0], left  # the one naming scheme
    assert [q.name for q in stale_temporaries(d)] == left  # the writing process is gone: stale
    assert [q.name for q in d.iterdir()] == left  # no output appeared
    with AtomicOutput(d / "next") as atomic:  # the next write into the directory cleans up
        pass
    assert len(atomic.notes) == 1 and left[0] in atomic.notes[0]
    assert _ours(d) == [] and list(stale_temporaries(d)) == []


def test_a_live_writers_temporary_is_not_stale(tmp_path):
    with atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
        assert TMP_MARK in tmp.name and list(stale_temporaries(tmp_path)) == []  # this process runs
        assert remove_stale(tmp_path) == [] and tmp.exists()
    assert (tmp_path / "x.json").read_text() == "{}" and _ours(tmp_path) == []


def test_atomic_path_os_error_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(InspectError) as e, atomic_path(target) as tmp:
        tmp.write_text("new")
    assert str(e.value) == f"{target}: cannot write: {os.strerror(errno.ENOSPC)} (ENOSPC)"
    assert target.read_text() == "old" and _ours(tmp_path) == []


def test_threads_get_distinct_temporaries(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from lora_inspect.files import temp_path

    with ThreadPoolExecutor(4) as pool:
        names = list(pool.map(lambda _: temp_path(tmp_path / "x"), range(64)))
    assert len(set(names)) == 64


def _calls(tree: ast.Module, owner: str, attrs: set[str]) -> list[str]:
    return [f"{owner}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in attrs
            and isinstance(n.value, ast.Name) and n.value.id == owner]


def test_renames_temporaries_and_os_error_live_in_files_py():
    renames, temps, defs = {}, {}, []
    for rel, tree in _trees():
        if rel != "files.py":
            renames[rel] = _calls(tree, "os", {"replace", "rename", "renames"})
            temps[rel] = _calls(tree, "tempfile", {"mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"})
        defs += [rel for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "os_error"]
    assert {k: v for k, v in renames.items() if v} == {}, "rename through lora_inspect.files.atomic_path"
    assert {k: v for k, v in temps.items() if v} == {}, "temporaries come from lora_inspect.files.temp_path"
    assert defs == ["files.py"]


# ------------------------------------------------------------------ 2. one home for each constant

def _assigned(name: str) -> list[str]:
    return [rel for rel, tree in _trees() for n in tree.body
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            and any(isinstance(t, ast.Name) and t.id == name for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]


def test_prefix_constants_are_defined_once():
    assert _assigned("PEFT_PREFIX") == ["peft_rules.py"]
    assert _assigned("KOHYA_PREFIXES") == ["formats/kohya.py"]
    literal = [rel for rel, tree in _trees() for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and n.value == "base_model.model."]
    assert literal == ["peft_rules.py"], "use peft_rules.PEFT_PREFIX / strip_prefix"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"to_q": nn.Linear(6, 8, bias=False), "to_k": nn.Linear(6, 8, bias=False)})


@pytest.mark.parametrize("prefix", ["lora_te3_", "lora_transformer_"])
def test_every_kohya_prefix_the_reader_accepts_maps_onto_the_model(tmp_path, prefix):
    from lora_inspect.formats import load_adapter
    from lora_inspect.formats.kohya import KOHYA_PREFIXES
    from lora_inspect.hf.apply import bind_adapter
    from lora_inspect.train.verify import adapter_deltas

    assert prefix in KOHYA_PREFIXES
    g = torch.Generator().manual_seed(0)
    mods = {f"{prefix}attn_{n}": (torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g), 1.0)
            for n in ("to_q", "to_k")}
    path = write_kohya(tmp_path / "k.safetensors", mods)
    ad = load_adapter(path)  # the reader
    assert ad.format == "kohya" and sorted(m.name for m in ad.modules) == sorted(mods)
    model = _Tiny()
    bound = bind_adapter(path, model, ad)  # hf/apply
    assert bound.modules == {f"attn.{n}": f"{prefix}attn_{n}" for n in ("to_q", "to_k")}
    deltas = adapter_deltas(path, {n: tuple(m.weight.shape) for n, m in model.named_modules()
                                   if isinstance(m, nn.Linear)})  # train/verify
    for layer, name in bound.modules.items():
        b, a = bound.factors[layer]
        want = torch.from_numpy(ad.module(name).delta())
        assert torch.allclose(b @ a, want) and torch.allclose(deltas[layer], want)


def test_a_kohya_lycoris_file_beside_a_peft_config_is_refused_with_the_reason(tmp_path):
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {f"lora_unet_x_proj.hada_w{i}_{ab}": torch.randn(*((8, 2) if ab == "a" else (2, 6)), generator=g)
          for i in (1, 2) for ab in "ab"}
    sd["lora_unet_x_proj.alpha"] = torch.tensor(2.0)
    f = tmp_path / "loha.safetensors"
    save_file(sd, str(f))
    assert run_cli("info", f, "--json").exit_code == 0  # alone: the LyCORIS layout reads it
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    r = run_cli("info", f)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "LyCORIS" in r.stderr and str(tmp_path / "adapter_config.json") in r.stderr
    assert "only plain LoRA" not in r.stderr


# ------------------------------------------------------------------ 3. one gate for optional dependencies

def _direct_optional_imports() -> list[str]:
    """``import X`` / ``from X import …`` of an optional package outside ``if TYPE_CHECKING``."""
    out = []
    for rel, tree in _trees():
        guarded = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for n in ast.walk(tree):
            names = ([a.name for a in n.names] if isinstance(n, ast.Import)
                     else [n.module or ""] if isinstance(n, ast.ImportFrom) and not n.level else [])
            out += [f"{rel}:{n.lineno} {m}" for m in names if m.split(".")[0] in EXTRAS and id(n) not in guarded]
    return out


def test_optional_packages_are_imported_only_through_require():
    assert _direct_optional_imports() == []


def test_the_extras_table_matches_pyproject():
    from lora_inspect.optional import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (dist, extra) in EXTRAS.items():
        pins = [s.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for s in extras[extra]]
        assert dist in pins, f"{module}: {dist} is not in the {extra} extra"


def _blocked(monkeypatch, *names: str) -> None:
    for n in names:
        monkeypatch.setitem(sys.modules, n, None)


def _line(call) -> str:
    with pytest.raises(InspectError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_require_names_the_package_and_the_extra(monkeypatch, tmp_path):
    from lora_inspect.hf.model import require_hf
    from lora_inspect.scan import ray_backend
    from lora_inspect.scan.journal import write_parquet
    from lora_inspect.train.model import load_base

    _blocked(monkeypatch, *EXTRAS, "pyarrow.parquet", "matplotlib.figure")
    for module, (dist, extra) in EXTRAS.items():
        assert _line(lambda m=module: require(m, "this")) == f"this needs {dist}: pip install 'lora-inspect[{extra}]'"
    assert _line(lambda: write_parquet([], tmp_path / "r.parquet", [])).endswith(
        "writing Parquet needs pyarrow: pip install 'lora-inspect[scan]'")
    assert _line(lambda: ray_backend.run_ray(["x"], None, lambda *_: None)) == \
        "the ray backend needs ray: pip install 'lora-inspect[ray]'"
    assert _line(lambda: require_hf("verify")) == "verify needs transformers: pip install 'lora-inspect[hf]'"
    (tmp_path / "config.json").write_text("{}")
    assert "needs transformers: pip install 'lora-inspect[hf]'" in _line(lambda: load_base(tmp_path))
    with pytest.raises(KeyError):
        require("json", "nothing")  # not an optional dependency: a programming error, not a user's


@pytest.mark.parametrize("command, blocked, line", [
    (["convert", str(SAMPLE), "--to", "gguf", "--arch", "llama", "-o", "{tmp}/x.gguf"], ["gguf"],
     "writing GGUF needs gguf: pip install 'lora-inspect[convert]'"),
    (["report", str(SAMPLE), "-o", "{tmp}/r.html"], ["matplotlib", "matplotlib.figure"],
     "report needs matplotlib: pip install 'lora-inspect[plot]'"),
])
def test_cli_without_an_optional_package_exits_2_with_one_line(tmp_path, monkeypatch, command, blocked, line):
    _blocked(monkeypatch, *blocked)
    r = run_cli(*[c.replace("{tmp}", str(tmp_path)) for c in command])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("lora-inspect: error: ") and r.stderr.rstrip().endswith(line), r.stderr
    assert "unexpected" not in r.stderr and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 4. TOML on Python 3.10 and 3.11+

def test_toml_is_read_only_through_lora_inspect_optional():
    users = [f"{rel}: {ast.unparse(n)}" for rel, tree in _trees() for n in ast.walk(tree)
             if isinstance(n, (ast.Import, ast.ImportFrom)) and rel != "optional.py"
             and any(m.split(".")[0] in ("tomllib", "tomli")
                     for m in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]))]
    assert users == []


def test_pyproject_says_310_everywhere_and_brings_tomli_there():
    from lora_inspect.optional import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cfg["project"]["requires-python"] == ">=3.10"
    assert cfg["tool"]["ruff"]["target-version"] == "py310" and cfg["tool"]["mypy"]["python_version"] == "3.10"
    tomli = [d for d in cfg["project"]["dependencies"] if d.startswith("tomli")]
    assert len(tomli) == 1 and tomli[0].replace(" ", "").endswith(";python_version<'3.11'"), tomli


def test_the_310_branch_takes_tomli(monkeypatch):
    """Run optional.py as Python 3.10 would (any interpreter): its TOML module is tomli, not tomllib."""
    _optional_as_310(monkeypatch)


def _optional_as_310(monkeypatch) -> None:
    stub = types.ModuleType("tomli")
    stub.loads = lambda s: {"stub": s}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tomli", stub)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # 3.10 has none: importing it would fail
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    spec = importlib.util.spec_from_file_location("lora_inspect._optional_as_310", PKG / "optional.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.tomllib is stub and mod.tomllib.loads("x") == {"stub": "x"}


def _python310() -> str | None:
    """A working Python 3.10 (a pyenv shim may exist and still refuse to run)."""
    cands = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python")), reverse=True)
    cands += [x for x in [shutil.which("python3.10")] if x]
    for exe in cands:
        p = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"], capture_output=True,
                           text=True)
        if p.returncode == 0 and p.stdout.strip() == "True":
            return exe
    return None


_UNDER_310 = r"""
import pathlib, sys
assert sys.version_info[:2] == (3, 10), sys.version
for p in sorted(pathlib.Path(sys.argv[1], "lora_inspect").rglob("*.py")):
    compile(p.read_text(encoding="utf-8"), str(p), "exec", dont_inherit=True)  # 3.11-only syntax fails here
sys.path.insert(0, sys.argv[1])
from lora_inspect.optional import tomllib
print(tomllib.__name__, tomllib.loads('[tool.lora-inspect.check]\nmax-rank = 64\n')["tool"])
"""


def test_under_a_real_python_310(tmp_path, monkeypatch):
    """Byte-compile every module and read TOML through lora_inspect.optional with Python 3.10 (the lowest
    requires-python). Without a 3.10 interpreter, the 3.10 branch is run here instead (and a warning says
    so); with one
    lacking tomli (tests use no network), a stub tomli on its path stands in for the package."""
    exe = _python310()
    if exe is None:  # still check something real: the 3.10 branch, run here; and say what was not checked
        _optional_as_310(monkeypatch)
        warnings.warn("no Python 3.10 interpreter found: modules were not byte-compiled under 3.10", stacklevel=1)
        return
    has_tomli = subprocess.run([exe, "-c", "import tomli"], capture_output=True).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if not has_tomli:
        (tmp_path / "tomli.py").write_text("def loads(s):\n    return {'tool': {'stub': True}}\n")
        env["PYTHONPATH"] = str(tmp_path)
    p = subprocess.run([exe, "-c", _UNDER_310, str(REPO)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    want = "{'lora-inspect': {'check': {'max-rank': 64}}}" if has_tomli else "{'stub': True}"
    assert p.stdout.strip() == f"tomli {want}"
