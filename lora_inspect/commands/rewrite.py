"""``truncate`` and ``rescale``: rewrite an adapter into a new one in the same layout (wiring only;
the work lives in :mod:`lora_inspect.rewrite`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ..errors import InspectError, OptionError
from ..formats import load_adapter
from ..rewrite import TruncateSpec
from ..rewrite import rescale as do_rescale
from ..rewrite import truncate as do_truncate
from ..units import parse_count, parse_size
from ..views import adapter_summary
from ..views.render import emit, note, progress, warn
from ..views.rewrite import rescale_view, truncate_view
from ._options import output_options

# the library names a request value as a parameter; the commands name their flags
FLAGS = {"rank": "--rank", "energy": "--energy", "max_params": "--max-params", "max_bytes": "--max-size",
         "uniform": "--uniform", "factor": "--factor", "alpha": "--alpha", "bake": "--bake", "force": "--force"}
# a library hint about a parameter, said with the flag
HINTS = {"bake": "use --bake to multiply B instead", "factor": "use --factor", "force": "pass --force to replace it"}


def with_flag(e: InspectError) -> InspectError:
    if e.option in HINTS and not isinstance(e, OptionError):
        return InspectError(e.message, hint=HINTS[e.option])
    return e


def as_usage(e: OptionError) -> click.UsageError:
    option = e.option or ""
    flag = FLAGS.get(option, option)
    msg = e.message.replace(f"{option} must", f"{flag} must").replace(f"{option} goes", f"{flag} goes")
    if msg == e.message and not msg.startswith(flag):
        msg = f"{flag}: {msg}"
    return click.UsageError(msg)


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """Library errors that name a request parameter become messages that name the command's flag."""
    try:
        yield
    except OptionError as e:
        raise as_usage(e) from e
    except InspectError as e:
        raise with_flag(e) from e


def _say(warnings: list[str], notes: list[str]) -> None:
    for w in warnings:
        warn(w)
    for n in notes:
        if n.startswith("removed "):  # a stale temporary of a killed run: said on stderr too
            note(n)


def _exactly_one(**given) -> None:
    named = [FLAGS[k] for k, x in given.items() if x is not None]
    if len(named) != 1:
        flags = ", ".join(FLAGS[k] for k in given)
        raise click.UsageError(f"give exactly one of {flags}" + (f" (got {', '.join(named)})" if named else ""))

__all__ = ["truncate_cmd", "rescale_cmd", "truncate", "rescale", "with_flag", "as_usage", "positive_callback",
           "max_size_callback", "max_params_callback"]


def positive_callback(parse, what: str):
    """A click callback parsing a budget with ``parse`` (units.parse_size / parse_count)."""

    def callback(_ctx, _param, value):
        if value is None:
            return None
        try:
            n = parse(value, what)
        except InspectError as e:
            raise click.BadParameter(str(e)) from e
        if n <= 0:
            raise click.BadParameter(f"must be positive, got {value!r}")
        return n

    return callback


max_size_callback = positive_callback(parse_size, "--max-size")
max_params_callback = positive_callback(parse_count, "--max-params")


@click.command(
    "truncate",
    short_help="Write a lower-rank copy: the best rank-k approximation.",
    epilog="""\b
Examples:
  lora-inspect truncate ./my-adapter -o ./my-adapter-r16 --rank 16
  lora-inspect truncate ./my-adapter -o ./small --energy 0.95
  lora-inspect truncate ./my-adapter -o ./small --energy 0.95 --uniform
  lora-inspect truncate lora.safetensors -o lora-20M.safetensors \\
      --max-params 20M
  lora-inspect truncate ./my-adapter -o ./small --max-size 512MiB --json
  lora-inspect truncate ./my-adapter -o ./r8-cal --rank 8 \\
      --calibrate eval.txt --base ./Llama-3.2-1B

--uniform gives every module one rank (zero-padded), for servers that need
one (vLLM, mlx-lm).
""",
)
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write the new adapter (same layout).")
@click.option("--rank", type=int, default=None, help="Every module to min(K, its r).")
@click.option("--energy", type=float, default=None, help="Each module to its energy rank at τ (keeps ≥ τ of Σσ²).")
@click.option("--max-params", callback=max_params_callback, default=None, help="Budget of LoRA factor parameters (20M, 1.5B …).")
@click.option("--max-size", callback=max_size_callback, default=None,
              help="Budget for the weight file (20MB, 1.5GB, 512MiB; SI = powers of 10, IEC = of 2).")
@click.option("--uniform", is_flag=True, help="With --energy or a budget: one rank for every module (zero-padded).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@click.option("--calibrate", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Text (.txt, .jsonl): keep the rank-k ΔW with the least output error on it (needs --base).")
@click.option("--base", type=click.Path(file_okay=False), default=None, help="With --calibrate: the Hugging Face base model directory.")
@click.option("--ridge", type=float, default=1e-2, show_default=True, help="With --calibrate: λ = ridge·tr(Σ)/in added to Σ.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="With --calibrate: at most N tokens (default 65536).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="With --calibrate: sequences per forward pass (8).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="With --calibrate: where the base runs.")
@output_options
def truncate_cmd(adapter, out, rank, energy, max_params, max_size, uniform, force, show_all, calibrate, base, ridge,
                 max_tokens, batch_size, device, fmt):
    """Write the best rank-k approximation of every module of ADAPTER to OUT.

    Each ΔW is replaced by its Eckart–Young truncation (QR of the factors + an r×r SVD), split
    evenly between the new factors with the scale baked in. OUT keeps ADAPTER's layout and dtype;
    it is written atomically, re-read and checked before it appears.
    """
    _exactly_one(rank=rank, energy=energy, max_params=max_params, max_bytes=max_size)
    spec = TruncateSpec(rank=rank, energy=energy, max_params=max_params, max_bytes=max_size, uniform=uniform)
    with _mapped_errors():
        spec.validate()
    ad = load_adapter(adapter)
    if calibrate is not None:
        from .calibrate import calibrated

        with _mapped_errors():
            res = calibrated(ad, out, spec, calibrate, base, ridge, max_tokens, batch_size, device, force, fmt == "table")
    else:
        if base is not None:
            raise click.UsageError("--base goes with --calibrate FILE")
        with _mapped_errors(), progress(len(ad.modules), "truncating", enabled=fmt == "table") as advance:
            res = do_truncate(ad, Path(out), spec, force=force, progress=advance)
    _say(res.warnings, res.notes)
    emit(truncate_view(res, adapter_summary(ad), max_rows=None if show_all or fmt != "table" else 40), fmt)


@click.command(
    "rescale",
    short_help="Write a copy with every module's strength multiplied by F.",
    epilog="""\b
Examples:
  lora-inspect rescale ./my-adapter -o ./half --factor 0.5
  lora-inspect rescale ./my-adapter -o ./a32 --alpha 32
  lora-inspect rescale lora.safetensors -o strong.safetensors \\
      --factor 1.5 --bake
""",
)
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write the new adapter (same layout).")
@click.option("--alpha", type=float, default=None, help="Set lora_alpha to A; alpha_pattern entries keep their ratio to it.")
@click.option("--factor", type=float, default=None, help="Multiply every module's ΔW (its effective scale) by F.")
@click.option("--bake", is_flag=True, help="Leave the config alone and multiply every B (and lora bias) instead.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
def rescale_cmd(adapter, out, alpha, factor, bake, force, show_all, fmt):
    """Write ADAPTER to OUT with every module's strength multiplied by F.

    PEFT: lora_alpha and every alpha_pattern entry × F (rsLoRA's α/√r scales the same way);
    kohya/diffusers: every .alpha tensor × F; mlx-lm: lora_parameters.scale × F. --bake multiplies
    the B factors instead. OUT is written atomically, re-read and checked.
    """
    _exactly_one(alpha=alpha, factor=factor)
    ad = load_adapter(adapter)
    with _mapped_errors(), progress(len(ad.modules), "spectra", enabled=fmt == "table") as advance:
        res = do_rescale(ad, Path(out), factor=factor, alpha=alpha, bake=bake, force=force, progress=advance)
    _say(res.warnings, res.notes)
    emit(rescale_view(res, adapter_summary(ad), max_rows=None if show_all or fmt != "table" else 40), fmt)


truncate = truncate_cmd
rescale = rescale_cmd
