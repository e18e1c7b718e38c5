"""Options shared by commands: output format and adapter arguments."""

from __future__ import annotations

import functools

import click

from ..views.render import FORMATS

__all__ = ["output_options", "resolve_format", "ENERGY", "base_options", "open_base", "heads_option", "with_heads"]

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


def base_options(func):
    """``--base DIR|FILE`` (a base checkpoint: base-aware metrics), ``--intruders``, ``--basis-cache DIR``;
    the command receives ``base``, ``intruders``, ``basis_cache``."""
    func = click.option(
        "--basis-cache", "basis_cache", type=click.Path(file_okay=False), default=None,
        help="With --intruders: keep each base matrix's singular basis here (safetensors, keyed by file, "
        "tensor, offset, size and mtime) for the next run.")(func)
    func = click.option(
        "--intruders", is_flag=True,
        help="With --base: count intruder dimensions (Shuttleworth et al. 2024, k=10, ε=0.5); needs one dense "
        "SVD per base matrix.")(func)
    return click.option(
        "--base", "base", type=click.Path(), default=None, metavar="DIR|FILE",
        help="The base checkpoint (a Hugging Face model directory, a diffusers pipeline, or one .safetensors "
        "file): adds ‖ΔW‖/‖W‖, σ₁ ratio, amplification and overlap per module.")(func)


def open_base(base: str | None, intruders: bool, basis_cache: str | None):
    """(checkpoint or None, basis cache or None); usage errors name the flags."""
    if base is None:
        if intruders or basis_cache:
            raise click.UsageError("--intruders and --basis-cache need --base")
        return None, None
    from pathlib import Path

    from ..basecheckpoint import open_base_checkpoint
    from ..basemetrics import BasisCache

    return open_base_checkpoint(base), BasisCache(Path(basis_cache) if basis_cache else None)


def heads_option(func):
    """``--base DIR`` for a command that reads the transformers-space ΔW of its inputs (``merge``, ``diff``):
    the base model whose config.json gives a llama-family GGUF's head counts, as ``convert``'s --base does for
    a GGUF source; the command receives ``base`` and passes its adapters through :func:`with_heads`."""
    return click.option(
        "--base", "base", type=click.Path(exists=True), default=None, metavar="DIR",
        help="GGUF: the base model directory or its config.json (model_type, num_attention_heads, "
        "num_key_value_heads), to undo a llama GGUF's Q/K row permutation.")(func)


def with_heads(ads: list, base: str | None) -> list:
    """Each adapter completed by its base model (:meth:`~lora_inspect.formats.layout.Layout.with_base`): a
    llama-family GGUF's permuted Q/K modules get their head counts from ``base``; without ``base``, an adapter
    that needs them is refused in one line naming --base, before anything is computed or written."""
    from pathlib import Path

    from ..formats import layout_of

    where = Path(base) if base is not None else None
    return [layout_of(ad).with_base(ad, where) for ad in ads]
