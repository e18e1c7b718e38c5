"""Options shared by commands: output format and adapter arguments."""

from __future__ import annotations

import functools

import click

from ..views.render import FORMATS

__all__ = ["output_options", "resolve_format", "ENERGY"]

# τ, the fraction of Σσ² a recommendation keeps: the library checks it too, in words without flags
ENERGY = click.FloatRange(0.0, 1.0, min_open=True)


def output_options(func):
    """Add ``--json`` and ``--format table|json|markdown``; the command receives ``fmt``."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout (same as --format json).")
    @click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default=None,
        help="table (default on a terminal), json, or markdown (for PR comments).",
    )
    @functools.wraps(func)
    def wrapper(*args, as_json: bool, fmt: str | None, **kwargs):
        return func(*args, fmt=resolve_format(as_json, fmt), **kwargs)

    return wrapper


def resolve_format(as_json: bool, fmt: str | None) -> str:
    if as_json and fmt not in (None, "json"):
        raise click.UsageError("--json and --format markdown/table contradict each other")
    return "json" if as_json else (fmt or "table")
