"""``fit ADAPTER --for ENGINE -o OUT``: every module turned into one the engine applies (:mod:`.handlers`,
:mod:`.extras`), written with ``convert``'s writers (atomic, re-read and compared before it appears,
``--force``-guarded: :func:`lora_inspect.convert.run.write_canon`), then checked as the engine would see it:
``check OUT --serving ENGINE`` (:func:`lora_inspect.checks.serving.profile_results`) and ``check --applied``
(:func:`lora_inspect.checks.applied.applied_report`).

One scale: servers apply one α/r to every module (vLLM before 0.7, LoRAX, SGLang) or store one α (GGUF,
mlx-lm), so every written module gets the scale most source modules share, s*; a module whose factors
were recomputed, or whose scale differs, has s/s* folded into B (float64).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..convert.canon import CanonModule, from_adapter, times
from ..convert.run import DTYPES, default_dtype, write_canon
from ..errors import InspectError
from ..formats import check_output, layout_for_target
from ..formats.layout import WriteOptions
from .engines import Engine, engine_named, rank_limit
from .extras import fit_extras
from .handlers import FitContext, Fitted, fit_module
from .results import Action, FitResult

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..basecheckpoint import BaseCheckpoint

__all__ = ["fit", "needs_base"]


def needs_base(engine: Engine, ad: "Adapter", keep_dora: bool, rank: int | None) -> str | None:
    """Why ``fit`` of ``ad`` for ``engine`` needs ``--base`` (one line), or None."""
    dora = [m for m in ad.modules if m.is_dora and m.kind != "embedding"]
    if dora and not (keep_dora and (rank is None or all(m.rank <= rank for m in dora))):
        return (f"{ad.path}: {len(dora)} DoRA module{'s' if len(dora) > 1 else ''} (first {dora[0].name!r}): "
                f"{engine.name} applies no DoRA, and folding it into plain LoRA needs the base weights: give --base DIR")
    if engine.needs_base:
        return f"{ad.path}: a {engine.target.upper()} adapter for {engine.name} needs the base model's config: give --base DIR"
    return None


def _keeps_dora(engine: Engine, ad: "Adapter", caps) -> bool:
    if not (engine.dora and caps.dora):
        return False
    return not caps.dora_all_or_none or all(m.is_dora for m in ad.modules)


def _one_scale(fitted: list[Fitted]) -> list[CanonModule]:
    """Every written module with one scale s*: the most common scale of the modules kept unchanged (1 when none)."""
    mods = [f.module for f in fitted if f.module is not None]
    kept = [f.module.scale for f in fitted if f.module is not None and f.report.action == Action.KEPT]
    s = Counter(kept).most_common(1)[0][0] if kept else 1.0
    if not s > 0:
        s = 1.0
    return [m if m.scale == s else replace(m, b=times(m.b, m.scale / s), scale=s, alpha=None, rslora=False)
            for m in mods]


def _config(ad: "Adapter", canon_cfg: dict | None, carried: list[str]) -> dict | None:
    """The source's PEFT config with modules_to_save reduced to what is carried."""
    from ..checks.serving import extra_module

    if canon_cfg is None:
        return None
    kept = sorted({extra_module(k).rsplit(".", 1)[-1] for k in carried})
    return {**canon_cfg, "modules_to_save": kept or None}


def _base(base: Path | None) -> "BaseCheckpoint | None":
    if base is None:
        return None
    from ..basecheckpoint import open_base_checkpoint

    return open_base_checkpoint(base)


def fit(ad: "Adapter", out: Path, engine_name: str, *, max_rank: int | None = None, base: Path | None = None,
        dtype: str | None = None, force: bool = False) -> FitResult:
    """Fit ``ad`` for ``engine_name`` and write it to ``out`` (module docstring); ``dtype`` fp32/bf16/fp16."""
    engine = engine_named(engine_name)
    rank = rank_limit(engine, max_rank)
    layout = layout_for_target(engine.target)
    out = Path(out)
    keep_dora = _keeps_dora(engine, ad, layout.caps)
    why = needs_base(engine, ad, keep_dora, rank) if base is None else None
    if why is not None:
        raise InspectError(why, option="base")
    check_output(ad, out, force)
    ckpt = _base(base)
    canon = from_adapter(ad, native=True)
    ff = bool(canon.fan_in_fan_out)
    ctx = FitContext(engine, layout, rank, ckpt, keep_dora, ff)
    fitted = [fit_module(ctx, cm, m) for cm, m in zip(canon.modules, ad.modules)]
    extra, carried = fit_extras(ctx, ad)
    written = _one_scale(fitted + extra)
    if not written and not carried:
        raise InspectError(f"{ad.path}: no module of this adapter can be applied by {engine.name}; nothing written")
    new = replace(canon, modules=written, extras=carried, config=_config(ad, canon.config, carried), notes=[])
    dt_name = dtype or layout.default_dtype(default_dtype(ad))
    opts = WriteOptions(DTYPES[dt_name], {k: ad.source.raw(k) for k in carried}, "auto", None,
                        layout.locate_base(ad, base))
    try:
        done = write_canon(new, out, layout, opts, bool(carried))
    except InspectError as e:
        raise e.located(ad.path) from e
    reports = [f.report for f in fitted + extra]
    by_src = {r.source: r.target for r in done.records}
    for r in reports:
        r.target = by_src.get(r.name, r.target)
    res = FitResult(Path(ad.path), str(ad.format), str(engine.name), rank, out, engine.target, dt_name, reports,
                    canon.notes + done.notes, done.worst)
    _check_written(res, engine, rank, ckpt)
    return res


def _check_written(res: FitResult, engine: Engine, rank: int | None, ckpt: "BaseCheckpoint | None") -> None:
    """``check OUT --serving ENGINE`` and ``check --applied ENGINE OUT`` on what was written."""
    from ..checks.applied import applied_report
    from ..checks.serving import parse_serving, profile_results
    from ..formats import load_adapter

    back = load_adapter(res.output)
    if engine.profile is not None:
        name, r = parse_serving(f"{engine.profile}:{rank}" if rank is not None else engine.profile)
        res.serving = profile_results(name, r, back, None)
    res.applied = applied_report(str(engine.name), back, ckpt)


def verify_fit(res: FitResult, base: Path, data: Path, max_tokens: int | None = None) -> None:
    """KL and top-1 agreement of the fitted adapter against the original on ``data`` (``verify``'s machinery,
    :func:`lora_inspect.hf.verify.verify_hf`: the original is the reference)."""
    from ..hf.verify import verify_hf

    if max_tokens is None:
        res.verify = verify_hf([res.source, res.output], base, data)
    else:
        res.verify = verify_hf([res.source, res.output], base, data, max_tokens=max_tokens)
