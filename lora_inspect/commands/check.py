"""``check``: a CI gate — exit 0 when every rule holds, 1 when any fails, 2 for bad input.

Wiring only: policy discovery (``[tool.lora-inspect.check]`` in the nearest pyproject.toml), adapter
discovery in directories, reading tensors only for the rules that need them, the GitHub step summary.
The rules themselves live in :mod:`lora_inspect.checks`, the report in :mod:`lora_inspect.views.check`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..analysis import analyse
from ..basemodels import load_base
from ..checks import (
    Policy,
    evaluate,
    parse_min_energy,
    parse_serving,
    policy_from_table,
    scan_values,
    unreadable_results,
)
from ..defaults import DEFAULT_ENERGY
from ..errors import EXIT_RULE_FAILED, InspectError, UnpairedFactorError
from ..formats import load_adapter
from ..units import parse_count, parse_size
from ..views.check import check_view
from ..views.render import emit, stderr_console, to_markdown
from ._options import output_options

__all__ = ["check", "find_pyproject", "discover_adapters"]

_ADAPTER_MARKERS = ("adapter_config.json", "adapters.safetensors", "adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` (as black and ruff find theirs)."""
    for d in [start, *start.parents]:
        p = d / "pyproject.toml"
        if p.is_file():
            return p
    return None


def read_policy_table(path: Path) -> dict | None:
    from ..optional import tomllib  # the standard library's on 3.11+, tomli on 3.10

    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InspectError(f"{path}: not valid TOML ({e})") from e
    table = doc.get("tool", {}).get("lora-inspect", {}).get("check")
    if table is None:
        return None
    fields = policy_from_table(table, f"{path} [tool.lora-inspect.check]")
    base = fields.get("base")
    if base and ("/" in base or base.endswith(".json")) and not Path(base).is_absolute():
        fields["base"] = str(path.parent / base)  # relative to the pyproject.toml
    return fields


def _is_adapter_dir(d: Path) -> bool:
    return any((d / m).is_file() for m in _ADAPTER_MARKERS)


def discover_adapters(path: Path) -> list[Path]:
    """An adapter file or directory as given; a directory holding several adapters → each of them."""
    if not path.exists():
        raise InspectError(f"{path}: no such file or directory")
    if path.is_file() or _is_adapter_dir(path):
        return [path]
    found: list[Path] = []
    for d, subdirs, files in os.walk(path):
        dp = Path(d)
        subdirs.sort()
        if dp != path and _is_adapter_dir(dp):
            found.append(dp)
            subdirs.clear()
            continue
        found.extend(dp / f for f in sorted(files) if f.endswith(_WEIGHT_SUFFIXES))
    if not found:
        raise InspectError(f"{path}: no adapters found here (no adapter_config.json, adapters.safetensors or weight files)")
    return found


def _shown(p: Path) -> str:
    """The path as the user would write it: relative to the working directory when inside it."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


@click.command(
    epilog="""\b
Examples:
  lora-inspect check adapters/ --serving vllm:16 --max-size 100MB
  lora-inspect check ./my-adapter --max-rank 64 --max-params 20M --deny-dora
  lora-inspect check ./my-adapter --min-energy 0.9@16 --base llama-3-8b --format markdown
\b
Policy in pyproject.toml (flags override it):
  [tool.lora-inspect.check]
  max-rank = 64
  max-size = "100MB"
  serving = ["vllm:64"]
  integrity = true      # no NaN/inf, no all-zero B (the default)
\b
Exit codes: 0 every rule holds, 1 a rule failed, 2 bad input.
""",
)
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--max-rank", type=click.IntRange(min=1), default=None, help="Largest rank any module may have.")
@click.option("--max-params", default=None, metavar="N", help="Most LoRA (low-rank factor) parameters: 4194304, 4,194,304, 20M.")
@click.option("--max-size", default=None, metavar="SIZE", help="Largest weight file: 100MB (10⁶ B), 512MiB (2²⁰ B), bytes.")
@click.option("--max-extra-params", default=None, metavar="N", help="Most full-tensor parameters (modules_to_save, whole embeddings).")
@click.option("--min-energy", default=None, metavar="τ@K", help="Every module keeps ≥ τ of Σσ² in its top K directions (reads tensors).")
@click.option("--allow-dora/--deny-dora", "allow_dora", default=None, help="Allow or refuse DoRA adapters.")
@click.option("--integrity/--no-integrity", "integrity", default=None,
              help="Refuse NaN/inf in any tensor and modules whose B is all zero (untrained); default on; reads tensors.")
@click.option("--require-finite/--no-require-finite", "require_finite", default=None, help="The NaN/inf part of --integrity alone.")
@click.option("--serving", multiple=True, metavar="PROFILE[:R]", help="vllm[:max_lora_rank], llamacpp, lorax, sglang, ollama (repeatable).")
@click.option("--base", default=None, metavar="PRESET|CONFIG.json", help="Every module must exist in this base with the same shape.")
@click.option("--no-config", is_flag=True, help="Ignore [tool.lora-inspect.check] in pyproject.toml.")
@output_options
@click.pass_context
def check(ctx: click.Context, adapters: tuple[str, ...], max_rank, max_params, max_size, max_extra_params, min_energy,
          allow_dora, integrity, require_finite, serving, base, no_config: bool, fmt: str) -> None:
    """Gate ADAPTER... (files, adapter directories, or directories of adapters) against a policy.

    Every failure is named with the adapter's value and the limit. The integrity rule (on by
    default) fails NaN/inf in any tensor and modules whose B is all zero, an adapter saved before
    training. Only it and --min-energy read tensor data; every other rule reads the file header alone.
    When $GITHUB_STEP_SUMMARY is set, the Markdown report is appended to it.
    """
    fields: dict = {}
    source = None
    if not no_config:
        pp = find_pyproject(Path.cwd())
        if pp is not None:
            table = read_policy_table(pp)
            if table is not None:
                fields.update(table)
                source = str(pp)
    cli = {
        "max_rank": max_rank,
        "max_params": None if max_params is None else parse_count(max_params, "--max-params"),
        "max_size": None if max_size is None else parse_size(max_size, "--max-size"),
        "max_extra_params": None if max_extra_params is None else parse_count(max_extra_params, "--max-extra-params"),
        "min_energy": None if min_energy is None else parse_min_energy(min_energy),
        "allow_dora": allow_dora,
        "require_finite": require_finite,
        "integrity": integrity,
        "serving": [parse_serving(s) for s in serving] or None,
        "base": base,
    }
    fields.update({k: v for k, v in cli.items() if v is not None})
    policy = Policy(**fields)
    bm = load_base(policy.base) if policy.base else None
    paths = [p for a in adapters for p in discover_adapters(Path(a))]

    entries = []
    for p in paths:
        try:
            ad = load_adapter(p)
        except UnpairedFactorError as e:
            entries.append((_shown(p), unreadable_results(str(e))))
            continue
        report = analyse(ad, DEFAULT_ENERGY) if policy.needs_spectra else None
        # the spectra already read every module's factors: only the other tensors are scanned again
        values = scan_values(ad, report, finite=policy.require_finite) if policy.needs_values else None
        entries.append((_shown(p), evaluate(ad, policy, base=bm, report=report, values=values)))

    view = check_view(entries, policy, source)
    emit(view, fmt)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(to_markdown(view) + "\n")
        except OSError as e:
            stderr_console().print(f"warning: cannot append to $GITHUB_STEP_SUMMARY ({summary}): {e}", markup=False)
    if not view.data["ok"]:
        sys.stdout.flush()
        ctx.exit(EXIT_RULE_FAILED)
