"""``extract``: BASE and TUNED in, a LoRA adapter out (docs/extract.md).

Streamed: one tensor pair at a time — ΔW formed from the two memory maps (:mod:`.delta`), its best
rank-k factors computed (:func:`lora_inspect.extract.factor.decompose`: Eckart–Young, certified), the
pages dropped, only the factors kept. ``--max-size`` runs two passes: the spectra of every module, one
allocation by σ² per byte across all of them (:func:`lora_inspect.rewrite.ranks.greedy_budget_ranks`,
the rule ``truncate`` uses), then the factors at the allocated ranks. The adapter is written by the
target layout's own writer (:func:`lora_inspect.convert.run.write_canon`: atomic, re-read and every
module's ΔW compared before it appears).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..convert.canon import Canon
from ..convert.flux import flux_for_target
from ..convert.run import DTYPES, write_canon
from ..errors import InspectError, OptionError
from ..files import check_output_path
from ..formats import ADAPTER_MARKERS, layout_for_target
from ..formats.layout import Naming, WriteOptions
from ..rewrite.ranks import TruncateSpec
from . import delta as dw
from .budget import allocate, header_bytes
from .factors import Factored, factor_module
from .pairs import CheckpointPair, Family, Role, TensorPair, open_pair, raw
from .plan import Plan, plan_tensors
from .results import ExtractedModule, ExtractResult, ExtractSpec, SetAside

__all__ = ["extract", "check_spec", "workers_for"]

Advance = Callable[[int], None]
_BUDGET_DROP = "--max-size keeps no direction of it"
# (stage, tensors done, tensors in the stage): called after every tensor; the command draws the bar
OnStep = Callable[[str, int, int], None]


def check_spec(spec: ExtractSpec) -> None:
    # the same rules as truncate's request (one home: rewrite.ranks.TruncateSpec.validate)
    TruncateSpec(rank=spec.rank, energy=spec.energy, max_bytes=spec.max_bytes).validate()
    if spec.dtype not in DTYPES:
        raise OptionError("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")


def _lora_candidate(p: TensorPair, spec: ExtractSpec) -> bool:
    if not p.path:
        return False
    return p.role in (Role.LINEAR, Role.CONV) or (spec.embeddings == "lora" and p.role in (Role.EMBEDDING, Role.HEAD))


def _changed(ck: CheckpointPair, spec: ExtractSpec, advance: Advance) -> tuple[list[tuple[TensorPair, float]], int]:
    """Every tensor whose bytes changed, with ‖Δ‖²_F (blockwise, nothing held; a LoRA candidate's is
    computed when it is factored, NaN until then), and the count of unchanged tensors."""
    out, same = [], 0
    for p in ck:
        if dw.unchanged(ck, p):
            same += 1
        elif _lora_candidate(p, spec):
            out.append((p, float("nan")))
        elif p.role == Role.OTHER and not _float(ck, p):
            out.append((p, 0.0))
        else:
            e = dw.energy(ck, p)
            if e > 0:
                out.append((p, e))
            else:
                same += 1
        dw.release(ck, p)
        advance(1)
    return out, same


def _float(ck: CheckpointPair, p: TensorPair) -> bool:
    return raw(ck.base, p.base).dtype.kind in "fV"


def _naming(family: Family) -> Naming:
    return {Family.TRANSFORMERS: Naming.MODEL, Family.PIPELINE: Naming.PIPELINE,
            Family.STABLE_DIFFUSION: Naming.PIPELINE, Family.FLUX: Naming.KOHYA}[family]


def _canon(ck: CheckpointPair, done: list[Factored], plan: Plan, base: Path) -> Canon:
    mods = [f.module for f in done if f.module is not None]
    cfg: dict = {"modules_to_save": list(plan.saved_modules) or None}
    if any(a.endswith("ForCausalLM") for a in ck.architectures):
        cfg["task_type"] = "CAUSAL_LM"
    canon = Canon(mods, _naming(ck.family), str(base), ck.model_type == "gpt2", cfg, list(plan.saved_keys))
    return canon


def workers_for(ck: CheckpointPair, lora: list[TensorPair]) -> int:
    """Modules factored at once (one BLAS thread each, docs/internals.md "Threads"): the usable CPUs (at most 4),
    fewer where that many float64 ΔW at once would pass the memory plan (2× the largest stored tensor)."""
    from ..spectrum import worker_count

    biggest = max((8 * p.numel for p in lora), default=0)
    room = max(2 * ck.largest_bytes, 256 << 20)
    return max(1, min(worker_count(), room // biggest if biggest else 1))


def _factor_all(ck: CheckpointPair, lora: list[TensorPair], ranks: dict[str, int] | None, totals: dict[str, float],
                spec: ExtractSpec, advance: Advance, device: str) -> list[Factored]:
    from ..spectrum import parallel_map

    def one(p: TensorPair) -> Factored:
        want = ranks.get(p.key) if ranks is not None else None
        if ranks is not None and not want:
            return Factored(p, None, None, totals[p.key])
        try:
            return factor_module(ck, p, spec, want, device)
        finally:
            dw.release(ck, p)

    workers = 1 if device != "cpu" else workers_for(ck, lora)
    return parallel_map(one, lora, workers=workers, progress=advance)


def _module_rows(done: list[Factored], total: float) -> list[ExtractedModule]:
    rows = []
    for f in done:
        if f.stats is not None:
            f.stats.share = f.energy / total if total > 0 else 0.0
            rows.append(f.stats)
    return rows


def extract(base: str | Path, tuned: str | Path, out: str | Path, spec: ExtractSpec, *, force: bool = False,
            on_step: OnStep | None = None, device: str = "cpu") -> ExtractResult:
    """Extract a LoRA of TUNED − BASE into ``out`` (module docstring). ``on_step(stage, done, total)`` is
    called after every tensor (stages: reading, spectra, factors)."""
    t0 = time.perf_counter()
    check_spec(spec)
    base, tuned, out = Path(base), Path(tuned), Path(out)
    for inp in (base, tuned):
        if inp.exists():
            check_output_path(inp, inp, out, force, ADAPTER_MARKERS)
    ck = open_pair(base, tuned)
    target = spec.to or ("kohya" if ck.family.image else "peft")
    layout = layout_for_target(target)
    changed, same = _changed(ck, spec, _stage(on_step, "reading", len(ck.pairs)))
    plan = plan_tensors(changed, ck.family, layout.caps.full_tensors, target, spec.embeddings, ck.pairs)
    if not plan.lora and not plan.saved_keys:
        raise InspectError(f"{tuned}: no weight differs from BASE {base} in a way a LoRA can carry: nothing to extract")
    ranks: dict[str, int] | None = None
    budget: dict[str, Any] = {}
    totals: dict[str, float] = {}
    if spec.max_bytes is not None:
        fixed = sum(ck.tuned.source(p.tuned.path).tensors[p.tuned.key].nbytes for p in plan.saved_keys.values())
        fixed += header_bytes(plan, target)
        ranks, budget, totals = allocate(ck, plan.lora, spec, fixed, _stage(on_step, "spectra", len(plan.lora)))
    done = _factor_all(ck, plan.lora, ranks, totals, spec, _stage(on_step, "factors", len(plan.lora)), device)
    same += sum(1 for f in done if f.energy == 0)
    plan.set_aside += [SetAside(f.pair.key, f.pair.role, "dropped", _BUDGET_DROP, f.energy,
                                f.pair.numel) for f in done if f.module is None and f.energy > 0]
    total = sum(f.energy for f in done) + sum(s.share for s in plan.set_aside if s.why != _BUDGET_DROP)
    canon = flux_for_target(_canon(ck, done, plan, base), layout.naming)
    if not canon.modules and not plan.saved_keys:
        raise InspectError("the budget keeps no direction of any module: nothing to write")
    extras = {k: raw(ck.tuned, p.tuned) for k, p in plan.saved_keys.items()}
    opts = WriteOptions(DTYPES[spec.dtype], extras, "auto", None, base if base.is_dir() else None)
    written = write_canon(canon, out, layout, opts, carry_extras=bool(extras))
    for s in plan.set_aside:
        s.share = s.share / total if total > 0 else 0.0
    size, files = _size(out)
    notes = canon.notes + written.notes
    return ExtractResult(base, tuned, out, target, str(ck.family), spec.dtype, spec.mode, _module_rows(done, total),
                         plan.set_aside, same, total, size, files, time.perf_counter() - t0, _peak_rss(),
                         ck.largest_bytes, notes, budget, written.worst)


def _stage(on_step: OnStep | None, stage: str, total: int) -> Advance:
    done = [0]

    def advance(n: int = 1) -> None:
        done[0] += n
        if on_step is not None:
            on_step(stage, done[0], total)

    return advance


def _size(out: Path) -> tuple[int, list[str]]:
    if out.is_dir():
        files = sorted(p for p in out.iterdir() if p.is_file())
        return sum(p.stat().st_size for p in files), [p.name for p in files]
    return out.stat().st_size, [out.name]


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
