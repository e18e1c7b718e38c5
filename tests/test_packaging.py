"""The package as a user gets it: a wheel and an sdist built from this tree (PEP 517 hooks of setuptools,
the backend pyproject.toml names, run without isolation so nothing is downloaded) install into a fresh
virtual environment and run ``lora-inspect`` from outside the repository.

The venv sees the system's site-packages (torch, numpy, … are not re-downloaded) and the project is
installed with ``--no-deps``; the test checks that the ``lora_inspect`` it runs is the installed copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "LORA_INSPECT_DEBUG", "VIRTUAL_ENV"}}
    env.update(NO_COLOR="1", COLUMNS="160", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", **extra)
    return env


def _sh(cmd: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_clean_env(**extra), timeout=600)
    assert res.returncode == 0, f"{cmd}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Wheel and sdist built from a copy of the tree (the build's egg-info and build/ stay out of the repo)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT / "lora_inspect", src / "lora_inspect", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    dist.mkdir()
    wheel = _sh([sys.executable, "-c", _BUILD, "wheel", str(dist)], cwd=src).stdout.split()[-1]
    sdist = _sh([sys.executable, "-c", _BUILD, "sdist", str(dist)], cwd=src).stdout.split()[-1]
    return {"wheel": dist / wheel, "sdist": dist / sdist, "tmp": tmp}


def _venv_with(tmp: Path, name: str, target: Path) -> Path:
    venv = tmp / name
    _sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    # the system's pip, running inside the venv, installs into the venv
    _sh([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(target)], cwd=tmp)
    where = _sh([str(py), "-c", "import lora_inspect; print(lora_inspect.__file__)"], cwd=tmp).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"imported {where}, not the installed copy"
    return venv


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


def test_sdist_contains_readme_pyproject_and_package_data(built):
    with tarfile.open(built["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("README.md", "pyproject.toml", "lora_inspect/__init__.py", "lora_inspect/cli.py",
                   "lora_inspect/data/presets.json"):
        assert needed in names, f"{needed} missing from {built['sdist'].name}"


def test_wheel_installs_into_a_fresh_venv_and_runs_rank_from_outside_the_repo(built):
    venv = _venv_with(built["tmp"], "venv-wheel", built["wheel"])
    work = built["tmp"] / "elsewhere"
    work.mkdir()
    res = _sh([str(venv / "bin" / "lora-inspect"), "rank", str(PLANTED)], cwd=work)
    assert "14 modules" in res.stdout and "truncate --rank 4" in res.stdout
    doc = json.loads(_sh([str(venv / "bin" / "lora-inspect"), "rank", str(PLANTED), "--json"], cwd=work).stdout)
    assert doc["summary"]["uniform_rank"] == 4
    # the presets travel as package data: footprint --base resolves one from the installed copy
    _sh([str(venv / "bin" / "lora-inspect"), "footprint", str(PLANTED), "--base", "llama-3-8b"], cwd=work)


def test_sdist_installs_into_a_fresh_venv_and_runs(built):
    venv = _venv_with(built["tmp"], "venv-sdist", built["sdist"])
    res = _sh([str(venv / "bin" / "python"), "-m", "lora_inspect", "info", str(PLANTED), "--json"], cwd=built["tmp"])
    assert json.loads(res.stdout)["adapter"]["r"] == 32
