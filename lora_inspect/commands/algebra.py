"""``convert`` and ``merge`` (wiring only; the work lives in :mod:`lora_inspect.convert`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InspectError, OptionError
from ..formats import MERGE_TARGETS, TARGETS, load_adapter
from ..rewrite import TruncateSpec
from ..units import parse_size
from ..views.render import emit, warn
from ._options import heads_option, output_options, with_heads
from .rewrite import as_usage, max_params_callback, max_size_callback, positive_callback, with_flag

__all__ = ["convert", "merge"]

_DTYPES = ("fp32", "bf16", "fp16")
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@click.command(
    "convert",
    short_help="Write the adapter in another layout, every ΔW unchanged.",
    epilog="""\b
Examples:
  lora-inspect convert ./my-adapter --to mlx -o ./my-adapter-mlx
  lora-inspect convert ./my-adapter --to gguf -o lora.gguf \\
      --base ./base-model --dtype fp16
  lora-inspect convert ./my-adapter --to kohya -o lora.safetensors
  lora-inspect convert lora.safetensors --to diffusers \\
      -o pytorch_lora_weights.safetensors
  lora-inspect convert ./mlx-adapter --to peft -o ./peft-adapter --json
  lora-inspect convert ./peft-unet-adapter --component unet --to kohya \\
      -o lora.safetensors
""",
)
@click.argument("adapter", type=click.Path())
@click.option("--to", "target", required=True, type=click.Choice(TARGETS), help="The layout to write.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write it.")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None,
              help="Dtype of the written factors (default: the source's 16-bit dtype, else fp32).")
@click.option("--arch", default=None,
              help="GGUF: the base's llama.cpp architecture (llama, qwen2 …); default: model_type in --base.")
@click.option("--base", type=click.Path(exists=True), default=None,
              help="GGUF: the base model directory or its config.json (model_type, num_attention_heads, "
                   "num_key_value_heads); default: the adapter's base_model_name_or_path when that folder exists. "
                   "LyCORIS, PEFT LoHa/LoKr: the base checkpoint (as rank --base), for OFT/BOFT/(IA)³ ΔW and the "
                   "kernels of flattened convs.")
@click.option("--component", type=click.Choice(_COMPONENTS), default=None,
              help="A one-model adapter (PEFT, mlx-lm) trained on this pipeline part, for diffusers/kohya output.")
@click.option("--unet-names", type=click.Choice(("auto", "sgm", "diffusers")), default="auto", show_default=True,
              help="kohya: UNet block names. auto = the source's own, else SGM (input_blocks…) for SDXL as "
                   "sd-scripts writes, diffusers-style (down_blocks…) for SD1.x/2.x.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
def convert(adapter, target, out, dtype, arch, base, component, unet_names, force, show_all, fmt):
    """Write ADAPTER in another layout with every ΔW unchanged.

    What the target cannot express is handled explicitly and listed per module: per-module α or
    rsLoRA baked into B, unequal ranks zero-padded (mlx-lm), Q/K rows permuted (llama GGUF),
    LoHa/LoKr written as their exact LoRA, kohya SGM (SDXL) and Flux names mapped (Flux q/k/v split
    or fused exactly). A module the target cannot hold at all (DoRA or conv to GGUF, conv to
    mlx-lm, DoRA to kohya) is refused in one line. OUT is written atomically and re-read (GGUF:
    with gguf.GGUFReader) and every ΔW checked before it appears.
    """
    from ..convert.run import convert as do_convert
    from ..views.algebra import convert_view

    ad = load_adapter(adapter)
    try:
        res = do_convert(ad, Path(out), target, dtype=dtype, arch=arch, base=Path(base) if base else None,
                         force=force, component=component, unet_names=unet_names)
    except InspectError as e:
        raise with_flag(e) from e
    emit(convert_view(res, max_rows=None if show_all or fmt != "table" else 40), fmt)


def _weights(_ctx, _param, value):
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError as e:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from e


_dense_size = positive_callback(parse_size, "--dense-limit")
_METHODS = ("sum", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_DENSE_FLAGS = {"density": "--density", "majority_sign": "--majority-sign", "seed": "--seed",
                "precision": "--dense-dtype", "max_bytes_dense": "--dense-limit", "method": "--method"}


def _dense_spec(method, density, majority_sign, seed, dense_dtype, dense_limit):
    """The DenseSpec of the dense options, or None for the exact sum (usage errors for misplaced options)."""
    from ..convert.dense_merge import DEFAULT_LIMIT, DEFAULT_SEED, DenseSpec

    if method == "sum":
        given = [f for f, v in (("--density", density), ("--majority-sign", majority_sign), ("--seed", seed),
                                ("--dense-dtype", dense_dtype), ("--dense-limit", dense_limit)) if v is not None]
        if given:
            raise click.UsageError(f"{given[0]} goes with a dense --method (ties, dare_linear, dare_ties, "
                                   "magnitude_prune)")
        return None
    if density is None:
        raise click.UsageError(f"--method {method} needs --density D (the fraction of each ΔW kept, in (0, 1])")
    if majority_sign is not None and not method.endswith("ties"):
        raise click.UsageError("--majority-sign goes with --method ties or dare_ties")
    if seed is not None and not method.startswith("dare"):
        raise click.UsageError("--seed goes with --method dare_linear or dare_ties")
    spec = DenseSpec(method, density, majority_sign or "total", DEFAULT_SEED if seed is None else seed,
                     dense_dtype or "fp64", DEFAULT_LIMIT if dense_limit is None else dense_limit)
    try:
        spec.validate()
    except OptionError as e:
        raise click.UsageError(_dense_message(e)) from e
    return spec


def _truncate_spec(rank, energy, max_params, max_size) -> TruncateSpec | None:
    """The TruncateSpec of merge's rank options, None for none (usage errors name the flags)."""
    given = [x for x in (rank, energy, max_params, max_size) if x is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --rank, --energy, --max-params, --max-size")
    if not given:
        return None
    spec = TruncateSpec(rank=rank, energy=energy, max_params=max_params, max_bytes=max_size)
    try:
        spec.validate()
    except OptionError as e:
        raise as_usage(e) from e
    return spec


def _run_merge(ads, out: Path, **options):
    """:func:`lora_inspect.convert.merge.merge` with its errors said with merge's flags."""
    from ..convert.merge import merge as do_merge

    try:
        return do_merge(ads, out, **options)
    except OptionError as e:
        raise as_usage(e) from e
    except InspectError as e:
        if e.option == "max_bytes_dense":
            raise InspectError(e.message, hint="--dense-dtype fp32 needs about half; --dense-limit raises the limit") from e
        raise with_flag(e) from e


def _dense_message(e: OptionError) -> str:
    flag = _DENSE_FLAGS.get(e.option or "", e.option or "")
    return e.message.replace(f"{e.option} must", f"{flag} must", 1)


@click.command(
    "merge",
    short_help="Write the weighted sum of several adapters as one adapter.",
    epilog="""\b
Examples:
  lora-inspect merge ./style ./subject -o ./both         # exact: rank r1 + r2
  lora-inspect merge ./style ./subject --weights 0.7,0.3 --rank 64 -o ./both
  lora-inspect merge ./a ./b ./c --energy 0.99 -o ./abc --json
  lora-inspect merge ./peft-adapter kohya.safetensors --to kohya \\
      -o merged.safetensors
  lora-inspect merge a.gguf b.gguf --base ./Llama-3.2-1B --to peft -o ./ab
  lora-inspect merge ./a ./b --method ties --density 0.2 -o ./ties
  lora-inspect merge ./a ./b --method dare_ties --density 0.3 --seed 7 \\
      --rank 32 -o ./dare

A dense --method gives rank max(r1, r2) unless a rank option says otherwise.
""",
)
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write the merged adapter.")
@click.option("--weights", callback=_weights, default=None, help="One weight per adapter, e.g. 0.7,0.3 (default: 1 each).")
@click.option("--rank", type=int, default=None, help="Keep the best rank-K approximation of each merged ΔW.")
@click.option("--energy", type=float, default=None, help="Each module to its energy rank at τ.")
@click.option("--max-params", callback=max_params_callback, default=None, help="Budget of factor parameters (20M …).")
@click.option("--max-size", callback=max_size_callback, default=None, help="Budget for the weight file (512MiB …).")
@click.option("--to", "target", type=click.Choice(MERGE_TARGETS), default=None,
              help="Output layout (default: the first adapter's).")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None, help="Dtype of the written factors.")
@heads_option
@click.option("--method", type=click.Choice(_METHODS), default="sum", show_default=True,
              help="sum: the exact Σ wᵢ·ΔWᵢ in factor space. The others act on the dense ΔWᵢ (see below).")
@click.option("--density", type=float, default=None, help="Dense methods: the fraction of each ΔWᵢ kept, in (0, 1].")
@click.option("--majority-sign", type=click.Choice(("total", "frequency")), default=None,
              help="ties, dare_ties: elect each entry's sign by sign(Σ τᵢ) (total, default) or sign(Σ sign τᵢ).")
@click.option("--seed", type=int, default=None, help="dare_*: seed of the random masks (default 0).")
@click.option("--dense-dtype", type=click.Choice(("fp64", "fp32")), default=None,
              help="Dense methods: dtype of the dense tensors (default fp64; fp32 needs about half the memory).")
@click.option("--dense-limit", callback=_dense_size, default=None,
              help="Dense methods: refuse a module needing more memory than this (default 8GiB).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
def merge(adapters, out, weights, rank, energy, max_params, max_size, target, dtype, base, method, density,
          majority_sign, seed, dense_dtype, dense_limit, force, show_all, fmt):
    """Write the exact weighted sum Σ wᵢ·ΔWᵢ of ADAPTERS to OUT (or a dense --method).

    Computed per module in factor space (scaled B's side by side, A's stacked, QR of both, a small
    SVD): never a dense ΔW. Without a rank option the result is exact (rank Σrᵢ, less where the
    updates are linearly dependent); --rank/--energy/--max-params/--max-size keep the best
    approximation (Eckart–Young), chosen as truncate does. Works across ranks, rsLoRA, patterns and
    layouts (module names must map onto each other); DoRA is refused. Atomic and self-checked.
    A llama-family GGUF stores Q/K rows permuted per head: --base gives the head counts.

    Dense methods (PEFT's ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd): per module,
    form every input's dense ΔWᵢ = sᵢBᵢAᵢ and prune it elementwise to --density d:

    \b
      magnitude_prune  keep each ΔWᵢ's ⌊d·out·in⌋ largest |entries|,
                       then Σ wᵢ·ΔWᵢ
      dare_linear      keep each entry with probability d, divide by d,
                       then Σ wᵢ·ΔWᵢ
      ties             magnitude prune, elect a sign per entry, average
                       the weighted entries that agree with it (a mean,
                       not a sum)
      dare_ties        the random prune of dare_linear, then the election
                       of ties

    They are functions of the dense ΔW, not of the factors, and ties/dare are not a weighted sum.
    The result has full rank in general: a dense SVD truncates it to max rᵢ of the module's inputs
    (PEFT's svd_rank=None) or by --rank/--energy/--max-params/--max-size (a budget merges every module
    twice). Cost per module: one dense SVD, O(out·in·min(out, in)) time, and about ((2n + 3)·8 + 8)·out·in
    bytes of memory for n inputs in fp64 (((2n + 3)·4 + 8)·out·in in fp32): 3.8 GB for two 14336×4096
    updates in fp64, 2.1 GB in fp32. One module's dense tensors are alive at a time. dare_* draws
    from a generator seeded by --seed and the module name: the same seed and options give the same
    file, whatever the order of the modules.
    """
    from ..views.algebra import merge_view

    spec = _truncate_spec(rank, energy, max_params, max_size)
    dense = _dense_spec(method, density, majority_sign, seed, dense_dtype, dense_limit)
    if len(adapters) < 2:
        raise click.UsageError("merge needs at least two adapters")
    ads = with_heads([load_adapter(a) for a in adapters], base)
    res = _run_merge(ads, Path(out), weights=weights, spec=spec, target=target, dtype=dtype, force=force,
                     dense=dense)
    for n in res.notes:
        if n.startswith("removed "):
            warn(n)
    emit(merge_view(res, max_rows=None if show_all or fmt != "table" else 40), fmt)
