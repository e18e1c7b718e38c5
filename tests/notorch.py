"""Running the CLI with ``import torch`` made to fail: a ``sitecustomize`` on PYTHONPATH installs a meta-path
finder that refuses torch, so any import of it — direct or through a library — raises ImportError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named %r (torch is blocked for this test)" % name, name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def blocked_env(tmp: Path) -> dict[str, str]:
    """The environment of a run without torch (the blocker checked to work)."""
    site = tmp / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_INSPECT_")}
    env.update(NO_COLOR="1", PYTHONPATH=f"{site}{os.pathsep}{ROOT}", COLUMNS="100")
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "torch is blocked" in probe.stderr  # the blocker works
    return env


def run_blocked(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_inspect", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


_DRIVER = """
import json, sys
from click.testing import CliRunner
from lora_inspect.cli import main
out = []
for args in json.load(sys.stdin):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    out.append([res.exit_code, res.stdout, res.stderr])
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), args
print(json.dumps(out))
"""


def run_many_blocked(jobs: list[list], cwd: Path, env: dict[str, str]) -> list[tuple[int, str, str]]:
    """Several commands in one blocked interpreter (the start-up paid once): (exit code, stdout, stderr)
    each; the driver also asserts that torch never entered ``sys.modules``."""
    res = subprocess.run([sys.executable, "-c", _DRIVER], cwd=cwd, env=env, capture_output=True, text=True,
                         input=json.dumps([[str(a) for a in job] for job in jobs]), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [tuple(r) for r in json.loads(res.stdout)]
