"""``scan``: a whole tree (or manifest) of adapters → one row each, locally or on Ray (wiring only;
the work is in :mod:`lora_inspect.scan`, the summary in :mod:`lora_inspect.views.scan`).

Exit codes (the CLI's rule): 2 for the command line — a missing ROOT, a file that is no adapter by its
name, nothing found, a bad --policy, an existing output — before anything is written; 1 when the scan
ran but some row in the output (resumed ones included) is unreadable or fails the policy; else 0.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import EXIT_RULE_FAILED, InspectError
from ..views.render import emit
from ._options import ENERGY, output_options

__all__ = ["scan"]


def _policy(path: str | None):
    from ..checks import Policy, read_policy_file

    if path is None:
        return Policy()
    p = Path(path)
    if not p.is_file():
        raise InspectError(f"{p}: no such file (--policy names a pyproject.toml)")
    return Policy(**(read_policy_file(p, named=True) or {}))


def _check_out(out: Path, resume: bool, force: bool) -> None:
    if out.suffix not in (".jsonl", ".parquet"):
        raise InspectError(f"{out}: the output must end in .jsonl or .parquet (see -o)")
    from ..scan import journal_path

    journal = journal_path(out)
    if not resume and not force and (journal.exists() or out.exists()):
        raise InspectError(f"{out if out.exists() else journal}: already exists; --resume continues it, "
                           "--force starts over")


@click.command(
    short_help="Analyse and check every adapter under folders: a row each, then a summary.",
    context_settings={"max_content_width": 80},
    epilog="""\b
Examples:
  lora-inspect scan hub/ -o results.jsonl --jobs 2
  lora-inspect scan hub/ -o results.parquet --policy pyproject.toml
  lora-inspect scan --manifest list.txt -o results.jsonl
  lora-inspect scan hub/ -o results.jsonl --resume    # after an interruption
  lora-inspect scan hub/ -o results.jsonl --backend ray --ray-address auto
\b
ROOT is a folder (every adapter under it, nested ones too), an adapter
file (.safetensors, .bin, .pt, .pth) or an adapter_config.json. Any other
file is refused: a list of paths (one a line, # comments) is read only
with --manifest FILE. Rows are appended to the JSONL journal as each
adapter finishes (results.parquet keeps results.parquet.jsonl beside it);
a killed scan loses only the adapters in flight.
\b
Exit codes: 0 ok; 1 some adapter is unreadable or fails the policy (its
row says why); 2 bad usage (a missing ROOT, a non-adapter file, nothing
found, a bad --policy), before anything is written.
""",
)
@click.argument("roots", nargs=-1, type=click.Path())
@click.option("-o", "--output", "output", required=True, type=click.Path(),
              help="results.jsonl or results.parquet.")
@click.option("--manifest", "manifests", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="A file listing adapter paths, one a line, relative to it (repeatable).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (or Ray CPUs).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", default=None, metavar="ADDR",
              help="An existing Ray cluster (ray.init(address=…)); 'auto' finds it.")
@click.option("--policy", default=None, metavar="PYPROJECT",
              help="Check every adapter against [tool.lora-inspect.check] (or [tool.lora-inspect]) "
                   "of this pyproject.toml.")
@click.option("--energy", type=ENERGY, default=None, help="τ for the energy ranks [default: 0.95].")
@click.option("--resume", is_flag=True, help="Keep the rows already in the output; skip adapters that have one.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              metavar="S", help="Per-adapter time limit in seconds; past it the adapter gets an error row.")
@click.option("--max-memory", default="8GiB", show_default=True, metavar="SIZE",
              help="Per-worker memory limit beyond its start-up size (RLIMIT_AS; local backend); 0 for none.")
@output_options
@click.pass_context
def scan(ctx: click.Context, roots: tuple[str, ...], output: str, manifests: tuple[str, ...], jobs: int,
         backend: str, ray_address: str | None, policy: str | None, energy: float | None, resume: bool,
         force: bool, timeout: float, max_memory: str, fmt: str) -> None:
    """Scan every adapter under ROOT... (and in --manifest lists): one row per adapter with layout,
    digest, ranks, α, the `rank` summary, flags and the `check` verdict; unreadable adapters get an
    error row with the line the single-file commands print. Ends with a summary table.
    """
    from ..defaults import DEFAULT_ENERGY
    from ..scan import ScanConfig, process_seconds, run_scan, summarise_rows
    from ..units import parse_size
    from ..views.scan import scan_progress, scan_view
    from ..views.schemas import SCAN_ROW_SCHEMA

    if not roots and not manifests:
        raise click.UsageError("give ROOT... (folders or adapter files) or --manifest FILE")
    out = Path(output)
    _check_out(out, resume, force)
    memory = parse_size(max_memory, "--max-memory") or None
    cfg = ScanConfig(_policy(policy), energy or DEFAULT_ENERGY, "auto", SCAN_ROW_SCHEMA)
    with scan_progress(enabled=fmt == "table") as (set_total, advance):
        outcome = run_scan(list(roots), out, cfg, backend=backend, jobs=jobs, address=ray_address, timeout=timeout,
                           memory=memory, resume=resume, on_found=set_total, on_row=advance,
                           manifests=list(manifests))
    emit(scan_view(summarise_rows(outcome.rows), outcome, str(out), backend, jobs, process_seconds()), fmt)
    if outcome.failed:
        ctx.exit(EXIT_RULE_FAILED)
