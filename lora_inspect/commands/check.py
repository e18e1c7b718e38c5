"""``check``: a CI gate — exit 0 when every rule holds, 1 when any fails, 2 for bad input or usage
(a missing or unreadable adapter: the gate does not judge what it cannot read; ``scan`` records it as a
row instead).

Wiring only: the policy (:func:`lora_inspect.checks.read_policy_file`, from ``--policy`` or the nearest
pyproject.toml), adapter discovery in directories (scan's, :func:`lora_inspect.scan.adapters_under`),
reading tensors only for the rules that need them, the GitHub step summary.
The rules themselves live in :mod:`lora_inspect.checks`, the report in :mod:`lora_inspect.views.check`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..basemodels import load_base
from ..checks import (
    Policy,
    evaluate,
    find_pyproject,
    parse_min_energy,
    parse_serving,
    read_policy_file,
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

__all__ = ["check"]


def _policy_fields(no_config: bool, policy_file: str | None) -> tuple[dict, str | None]:
    """(Policy fields, the file they came from): ``--policy FILE``, else the nearest pyproject.toml."""
    if policy_file is not None:
        if no_config:
            raise InspectError("--policy and --no-config contradict each other: give one")
        p = Path(policy_file)
        if not p.is_file():
            raise InspectError(f"{p}: no such file (--policy names a pyproject.toml)")
        return read_policy_file(p, named=True) or {}, str(p)
    pp = None if no_config else find_pyproject(Path.cwd())
    table = read_policy_file(pp, named=False) if pp is not None else None
    return (table, str(pp)) if table is not None else ({}, None)


def _adapters(args: tuple[str, ...]) -> list[tuple[Path, bool]]:
    """(path, named on the command line) for every adapter the arguments hold: scan's discovery (one
    home), nested adapters included."""
    from ..scan import adapters_under

    out: dict[Path, bool] = {}  # each adapter once, named if any argument names it
    for a in args:
        for p in adapters_under(Path(a)):
            named = p == Path(a) or (Path(a).name == "adapter_config.json" and p == Path(a).parent)
            out[p] = out.get(p, False) or named
    return list(out.items())


def _spectra(ad):
    """``rank``'s analysis, for --min-energy: imported only then (it needs torch; the other rules do not)."""
    from ..analysis import analyse

    return analyse(ad, DEFAULT_ENERGY)


def _entries(paths: list[tuple[Path, bool]], policy: Policy, bm) -> tuple[list, list[str]]:
    """(shown path, results) per adapter, and the files skipped: a tensor file without LoRA keys (base
    weights) found inside a folder is no adapter (as in ``scan``); named on the command line it is an error."""
    from ..scan import no_lora_keys

    entries, skipped = [], []
    for p, named in paths:
        try:
            ad = load_adapter(p)
        except UnpairedFactorError as e:
            entries.append((_shown(p), unreadable_results(str(e))))
            continue
        except InspectError:
            if named or not (p.is_file() and no_lora_keys(p)):
                raise
            skipped.append(_shown(p))
            continue
        report = _spectra(ad) if policy.needs_spectra else None
        # the spectra already read every module's factors: only the other tensors are scanned again
        values = scan_values(ad, report, finite=policy.require_finite) if policy.needs_values else None
        entries.append((_shown(p), evaluate(ad, policy, base=bm, report=report, values=values)))
    return entries, skipped


def _shown(p: Path) -> str:
    """The path as the user would write it: relative to the working directory when inside it."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _applied(ctx: click.Context, engine: str, adapters: tuple[str, ...], base: str | None, fmt: str) -> None:
    """``--applied ENGINE``: what the engine applies of one adapter (:mod:`lora_inspect.checks.applied`); exit 1
    when a module is dropped silently or refused."""
    from ..checks.applied import applied_report
    from ..fit.engines import engine_named
    from ..views.check import applied_check_view

    if len(adapters) != 1:
        raise click.UsageError("--applied takes one adapter")
    try:
        name = str(engine_named(engine).name)
    except InspectError as e:
        raise click.UsageError(f"--applied: {e.message}") from e
    ckpt = None
    if base is not None:
        from ..basecheckpoint import open_base_checkpoint

        ckpt = open_base_checkpoint(base)
    rep = applied_report(name, load_adapter(adapters[0]), ckpt)
    emit(applied_check_view(rep), fmt)
    if not rep.ok:
        sys.stdout.flush()
        ctx.exit(EXIT_RULE_FAILED)


@click.command(
    short_help="Gate adapters against a policy (rank, size, serving, NaN): exit 1 on a failure.",
    context_settings={"max_content_width": 80},
    epilog="""\b
Examples:
  lora-inspect check adapters/ --serving vllm:16 --max-size 100MB
  lora-inspect check ./my-adapter --max-rank 64 --max-params 20M --deny-dora
  lora-inspect check ./my-adapter --min-energy 0.9@16 --base llama-3-8b
  lora-inspect check adapters/ --policy ci/pyproject.toml --format markdown
  lora-inspect check --applied vllm ./my-adapter --base ./llama-3-8b
\b
Policy in pyproject.toml, in [tool.lora-inspect.check] or [tool.lora-inspect]
(flags override it; an unknown key is an error):
  [tool.lora-inspect.check]
  max-rank = 64
  max-size = "100MB"
  serving = ["vllm:64"]
  integrity = true      # no NaN/inf, no all-zero B (the default)
\b
Exit codes: 0 every rule holds, 1 a rule failed, 2 bad input or usage
(a missing or unreadable adapter, a bad policy file, a bad option).
""",
)
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--max-rank", type=click.IntRange(min=1), default=None, help="Largest rank any module may have.")
@click.option("--max-params", default=None, metavar="N",
              help="Most LoRA (low-rank factor) parameters: 4194304, 4,194,304, 20M.")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Largest weight file: 100MB (10⁶ B), 512MiB (2²⁰ B), bytes.")
@click.option("--max-extra-params", default=None, metavar="N",
              help="Most full-tensor parameters (modules_to_save, whole embeddings).")
@click.option("--min-energy", default=None, metavar="τ@K",
              help="Every module keeps ≥ τ of Σσ² in its top K directions (reads tensors).")
@click.option("--allow-dora/--deny-dora", "allow_dora", default=None, help="Allow or refuse DoRA adapters.")
@click.option("--integrity/--no-integrity", "integrity", default=None,
              help="Refuse NaN/inf in any tensor and modules whose B is all zero (untrained); "
                   "default on; reads tensors.")
@click.option("--require-finite/--no-require-finite", "require_finite", default=None,
              help="The NaN/inf part of --integrity alone.")
@click.option("--serving", multiple=True, metavar="PROFILE[:R]",
              help="vllm[:max_lora_rank], llamacpp, lorax, sglang, ollama (repeatable).")
@click.option("--base", default=None, metavar="PRESET|CONFIG.json",
              help="Every module must exist in this base with the same shape.")
@click.option("--applied", "applied", default=None, metavar="ENGINE",
              help="Instead of the policy: a dry run of ENGINE's key mapping (vllm, lorax, sglang, ollama, "
                   "llama.cpp, mlx-lm, diffusers, comfyui) on one adapter; --base DIR checks real weight names.")
@click.option("--policy", "policy_file", default=None, metavar="PYPROJECT",
              help="Read the policy from this pyproject.toml instead of the nearest one.")
@click.option("--no-config", is_flag=True, help="Ignore the policy in the nearest pyproject.toml.")
@output_options
@click.pass_context
def check(ctx: click.Context, adapters: tuple[str, ...], max_rank, max_params, max_size, max_extra_params, min_energy,
          allow_dora, integrity, require_finite, serving, base, applied, policy_file: str | None, no_config: bool,
          fmt: str) -> None:
    """Gate ADAPTER... (files, adapter directories, or directories of adapters,
    nested ones included, found as `scan` finds them) against a policy.

    Every failure is named with the adapter's value and the limit. The integrity rule (on by
    default) fails NaN/inf in any tensor and modules whose B is all zero, an adapter saved before
    training. Only it and --min-energy read tensor data; every other rule reads the file header alone.
    Tensor files without LoRA keys inside a folder (base weights) are skipped, as `scan` does.
    When $GITHUB_STEP_SUMMARY is set, the Markdown report is appended to it.
    """
    if applied is not None:
        _applied(ctx, applied, adapters, base, fmt)
        return
    fields, source = _policy_fields(no_config, policy_file)
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
    entries, skipped = _entries(_adapters(adapters), policy, bm)
    if not entries:
        raise InspectError(f"{', '.join(skipped[:3])}: tensor files without LoRA keys (base weights), no adapter")
    view = check_view(entries, policy, source, skipped)
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
