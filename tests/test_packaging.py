"""The package as a user gets it: a wheel and an sdist built from this tree (PEP 517 hooks of setuptools,
the backend pyproject.toml names, run without isolation so nothing is downloaded) install into a fresh
virtual environment and run ``lora-inspect`` from outside the repository.

The venv is created without system site-packages and sees the packages of the interpreter running the
tests — whether that is a system Python or itself a venv — through one ``.pth`` file listing that
interpreter's site directories (:func:`_running_site_dirs`), after the venv's own site-packages: torch,
numpy, … are not re-downloaded, and the freshly installed copy of lora_inspect comes first. (A venv made
with ``--system-site-packages`` sees the *base* interpreter's packages instead, which is not where a
venv-installed torch lives.) Directories listed in a ``.pth`` file are not themselves scanned for
``.pth`` files, so the editable install of lora_inspect in the running environment (a ``.pth`` file and
an import hook) never loads there; the test checks that the repository's copy is not importable before
the install and that the one imported after it is the installed copy.

The sdist is installed the way pip installs one: unpacked, built into a wheel by setuptools' PEP 517
backend (the running interpreter's: the venv needs no setuptools, no ``wheel``), and that wheel installed
with ``--no-deps --no-index``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLANTED = ROOT / "samples" / "planted"
pytestmark = pytest.mark.slow  # builds, two venvs, three runs; kept in the default run (deselect with -m "not slow")

_BUILD = """
import sys
from setuptools import build_meta
kind, out = sys.argv[1], sys.argv[2]
print((build_meta.build_wheel if kind == "wheel" else build_meta.build_sdist)(out))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "LORA_INSPECT_DEBUG", "VIRTUAL_ENV"}}
    env.update(NO_COLOR="1", COLUMNS="160", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", **extra)
    return env


def _sh(cmd: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_clean_env(**extra), timeout=600)
    assert res.returncode == 0, f"{cmd}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}"
    return res


def _running_site_dirs() -> list[str]:
    """Where the interpreter running the tests finds its packages, in its order: its site directories —
    its prefix's site-packages (a venv's own, or a system Python's), its base's when it is a venv that
    sees them (``site.getsitepackages`` lists those exactly then), the user site when enabled — and
    what their ``.pth`` files added after them, less any entry holding the repository's lora_inspect
    (an old-style editable install). ``PYTHONPATH`` and the script's directory come before the site
    directories on ``sys.path`` and are left out, as ``_clean_env`` leaves ``PYTHONPATH`` out."""
    paths = sysconfig.get_paths()
    site_dirs = {*site.getsitepackages(), paths["purelib"], paths["platlib"]}
    if site.ENABLE_USER_SITE:
        site_dirs.add(site.getusersitepackages())
    first = min((i for i, p in enumerate(sys.path) if p in site_dirs), default=len(sys.path))
    out: list[str] = []
    for d in [*sys.path[first:], *sorted(site_dirs)]:
        if not d or d in out or not Path(d).is_dir():
            continue
        init = Path(d) / "lora_inspect" / "__init__.py"
        if init.exists() and init.resolve().is_relative_to(ROOT):
            continue
        out.append(d)
    return out


def _can_build_wheels() -> bool:
    """setuptools ≥ 70.1 builds wheels itself; an older one needs the ``wheel`` package."""
    return any(importlib.util.find_spec(m) is not None for m in ("setuptools.command.bdist_wheel", "wheel"))


def _build(kind: str, src: Path, dist: Path) -> Path:
    return dist / _sh([sys.executable, "-c", _BUILD, kind, str(dist)], cwd=src).stdout.split()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Wheel and sdist built from a copy of the tree (the build's egg-info and build/ stay out of the repo)."""
    if not _can_build_wheels():
        pytest.skip("this interpreter's setuptools cannot build wheels (it needs setuptools>=70.1 or the wheel "
                    "package: pyproject.toml's [build-system] requires); torch 2.13 installs setuptools>=77")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT / "lora_inspect", src / "lora_inspect", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    dist.mkdir()
    return {"wheel": _build("wheel", src, dist), "sdist": _build("sdist", src, dist), "tmp": tmp, "src": src}


def _fresh_venv(tmp: Path, name: str) -> Path:
    """A venv without system site-packages that sees the running interpreter's packages after its own."""
    venv = tmp / name
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    own = Path(_sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    assert own.resolve().is_relative_to(venv.resolve()), own
    (own / "_running_interpreter_site.pth").write_text("".join(d + "\n" for d in _running_site_dirs()),
                                                        encoding="utf-8")
    # the repository's own copy (the running environment's editable install) is not importable here
    probe = "import importlib.util as u; s = u.find_spec('lora_inspect'); print(s.origin if s else '')"
    seen = _sh([str(py), "-c", probe], cwd=tmp).stdout.strip()
    assert not seen or not Path(seen).resolve().is_relative_to(ROOT), f"the repository's lora_inspect leaks in: {seen}"
    return venv


def _install(venv: Path, wheel: Path, tmp: Path) -> None:
    py = venv / "bin" / "python"
    # the running interpreter's pip (seen through the .pth file), running inside the venv, installs into it
    _sh([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        cwd=tmp)
    where = _sh([str(py), "-c", "import lora_inspect; print(lora_inspect.__file__)"], cwd=tmp).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"imported {where}, not the installed copy"
    torch_at = _sh([str(py), "-c", "import torch; print(torch.__file__)"], cwd=tmp).stdout.strip()
    assert any(Path(torch_at).resolve().is_relative_to(Path(d).resolve()) for d in _running_site_dirs()), torch_at


def test_the_venv_sees_the_running_interpreters_packages_and_not_the_repository(built):
    venv = _fresh_venv(built["tmp"], "venv-probe")
    py = str(venv / "bin" / "python")
    got = json.loads(_sh([py, "-c", "import json, sys; print(json.dumps(sys.path))"], cwd=built["tmp"]).stdout)
    own = next(p for p in got if p.startswith(str(venv)) and p.endswith("site-packages"))
    running = [p for p in _running_site_dirs() if p in got]
    assert running, f"none of {_running_site_dirs()} on the venv's sys.path {got}"
    assert all(got.index(own) < got.index(p) for p in running)  # the venv's own packages come first
    assert str(ROOT) not in got and "" not in got[1:]


def test_the_file_names_the_readme_gives(built):
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert built["wheel"].name == f"lora_inspect-{version}-py3-none-any.whl"
    assert built["sdist"].name == f"lora_inspect-{version}.tar.gz"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert built["wheel"].name in readme and built["sdist"].name in readme


def test_wheel_contents(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    assert "lora_inspect/cli.py" in names and "lora_inspect/data/presets.json" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    assert not any(n.startswith(("tests/", "samples/", "benchmarks/")) for n in names)


def _package_files(root: Path) -> set[str]:
    """Every module and data file of the package under ``root`` (what a user's install needs)."""
    pkg = root / "lora_inspect"
    return {p.relative_to(root).as_posix() for p in pkg.rglob("*")
            if p.is_file() and (p.suffix == ".py" or p.parent.name == "data") and "__pycache__" not in p.parts}


def test_sdist_contains_readme_pyproject_and_package_data(built):
    with tarfile.open(built["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("README.md", "pyproject.toml", "PKG-INFO", "lora_inspect/__init__.py", "lora_inspect/cli.py",
                   "lora_inspect/data/presets.json"):
        assert needed in names, f"{needed} missing from {built['sdist'].name}"
    missing = _package_files(built["src"]) - names
    assert not missing, f"{len(missing)} package files missing from {built['sdist'].name}: {sorted(missing)[:5]}"
    assert not any(n.startswith(("tests/", "samples/", "benchmarks/")) for n in names)


def _wheel_from_sdist(built) -> Path:
    """What pip does with an sdist: unpack it and build a wheel with the backend it names."""
    unpacked = built["tmp"] / "sdist-unpacked"
    if not unpacked.exists():
        with tarfile.open(built["sdist"]) as tf:
            if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+
                tf.extractall(unpacked, filter="data")
            else:  # pragma: no cover - older patch releases; the archive is the one built above
                tf.extractall(unpacked)
    (top,) = unpacked.iterdir()
    dist = built["tmp"] / "dist-from-sdist"
    dist.mkdir(exist_ok=True)
    return _build("wheel", top, dist)


def test_the_sdist_builds_the_same_wheel(built):
    wheel = _wheel_from_sdist(built)
    assert wheel.name == built["wheel"].name
    assert set(zipfile.ZipFile(wheel).namelist()) == set(zipfile.ZipFile(built["wheel"]).namelist())


def test_wheel_installs_into_a_fresh_venv_and_runs_rank_from_outside_the_repo(built):
    venv = _fresh_venv(built["tmp"], "venv-wheel")
    _install(venv, built["wheel"], built["tmp"])
    work = built["tmp"] / "elsewhere"
    work.mkdir()
    res = _sh([str(venv / "bin" / "lora-inspect"), "rank", str(PLANTED)], cwd=work)
    assert "14 modules" in res.stdout and "truncate --rank 4" in res.stdout
    doc = json.loads(_sh([str(venv / "bin" / "lora-inspect"), "rank", str(PLANTED), "--json"], cwd=work).stdout)
    assert doc["summary"]["uniform_rank"] == 4
    # the presets travel as package data: footprint --base resolves one from the installed copy
    _sh([str(venv / "bin" / "lora-inspect"), "footprint", str(PLANTED), "--base", "llama-3-8b"], cwd=work)


def test_sdist_installs_into_a_fresh_venv_and_runs(built):
    venv = _fresh_venv(built["tmp"], "venv-sdist")
    _install(venv, _wheel_from_sdist(built), built["tmp"])
    res = _sh([str(venv / "bin" / "python"), "-m", "lora_inspect", "info", str(PLANTED), "--json"], cwd=built["tmp"])
    assert json.loads(res.stdout)["adapter"]["r"] == 32
