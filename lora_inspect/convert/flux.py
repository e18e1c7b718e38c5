"""Flux transformer LoRAs: kohya/BFL names (fused qkv, fused ``linear1``) ↔ diffusers names (split), exactly.

BFL/kohya files (sd-scripts ``networks/lora_flux.py``) name the modules of the original Flux code
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_3_linear1`` …); diffusers'
``FluxTransformer2DModel`` has separate q/k/v (and, in single blocks, ``proj_mlp``) Linear layers.
The key map is diffusers' own (``diffusers · src/diffusers/loaders/lora_conversion_utils.py ·
_convert_kohya_flux_lora_to_diffusers`` / ``_convert_sd_scripts_to_ai_toolkit``, adapted from
sd-scripts ``networks/convert_flux_lora.py``); the maths (docs/formats.md, "Flux"):

- split (fused → parts): ΔW = s·B·A with B cut by rows into the parts; part j keeps A and B_j
  (exact), restricted to the columns where B_j is non-zero (sd-scripts' block-diagonal
  ``split_qkv`` layout gives each part its own r/3 rows of A, as diffusers' "sparse" branch does).
  ``linear1`` rows are [h, h, h, out − 3h] with h = its input width (the hidden size: BFL
  ``SingleStreamBlock`` feeds it the hidden state), cross-checked with ``linear2``.
  ``final_layer_adaLN_modulation_1`` rows are (shift, scale) in BFL and (scale, shift) in diffusers'
  ``norm_out.linear``: B's two row halves swap (``swap_scale_shift``), A is unchanged.
- fuse (parts → fused): A = cat(A_q, A_k, A_v), B = block-diagonal(f_q·B_q, f_k·B_k, f_v·B_v) with
  f_j = s_j/s (rank Σr_j), or, when all parts hold the same A (a split that was never trained
  apart), A and B = cat(f_j·B_j) by rows (rank kept). A part the adapter lacks gets zero rows of B
  (ΔW = 0 there, as for an unadapted layer); diffusers' kohya converter splits it back.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import InspectError
from ..formats.layout import Naming
from ..kinds import Kind
from ..units import plural
from .canon import Canon, CanonModule, numbers, same_values, times
from .names import kohya_to_dotted

__all__ = ["flux_for_target", "split_to_diffusers", "fuse_to_kohya", "is_bfl_flux", "is_diffusers_flux",
           "bfl_to_diffusers", "diffusers_to_bfl"]

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_DOUBLE = {"img_attn_proj": "attn.to_out.0", "img_mlp_0": "ff.net.0.proj", "img_mlp_2": "ff.net.2",
           "img_mod_lin": "norm1.linear", "txt_attn_proj": "attn.to_add_out", "txt_mlp_0": "ff_context.net.0.proj",
           "txt_mlp_2": "ff_context.net.2", "txt_mod_lin": "norm1_context.linear"}
_DOUBLE_FUSED: dict[str, tuple[str, ...]] = {"img_attn_qkv": _QKV, "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"linear2": "proj_out", "modulation_lin": "norm.linear"}
_SINGLE_FUSED: dict[str, tuple[str, ...]] = {"linear1": _QKV + ("proj_mlp",)}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}
_SWAP = "final_layer_adaLN_modulation_1"
_BLOCKS: dict[str, tuple[str, dict[str, str], dict[str, tuple[str, ...]]]] = {
    "double_blocks": ("transformer_blocks", _DOUBLE, _DOUBLE_FUSED),
           "single_blocks": ("single_transformer_blocks", _SINGLE, _SINGLE_FUSED)}
_BFL_RE = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_DIFF_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
MLP_RATIO = 4  # diffusers FluxTransformer2DModel builds FluxSingleTransformerBlock with mlp_ratio = 4.0


def bfl_to_diffusers(bfl: str) -> tuple[str, ...] | None:
    """A BFL module name (``double_blocks_0_img_attn_qkv``, no ``lora_unet_``) → its diffusers path(s)."""
    if bfl in _TOP:
        return (_TOP[bfl],)
    mt = _BFL_RE.match(bfl)
    if mt is None:
        return None
    head, single, fused = _BLOCKS[mt.group(1)]
    pre = f"{head}.{int(mt.group(2))}."
    if mt.group(3) in single:
        return (pre + single[mt.group(3)],)
    if mt.group(3) in fused:
        return tuple(pre + p for p in fused[mt.group(3)])
    return None


def diffusers_to_bfl(path: str) -> tuple[str, int, int] | None:
    """A diffusers Flux path → (BFL name, part index, number of parts); None if it is not one."""
    for bfl, p in _TOP.items():
        if path == p:
            return bfl, 0, 1
    mt = _DIFF_RE.match(path)
    if mt is None:
        return None
    block = next(k for k, v in _BLOCKS.items() if v[0] == mt.group(1))
    _, single, fused = _BLOCKS[block]
    pre = f"{block}_{int(mt.group(2))}_"
    for bfl, p in single.items():
        if mt.group(3) == p:
            return pre + bfl, 0, 1
    for bfl, parts in fused.items():
        if mt.group(3) in parts:
            return pre + bfl, parts.index(mt.group(3)), len(parts)
    return None


def _bfl_name(m: CanonModule) -> str | None:
    return m.path.replace(".", "_") if m.component == "unet" else None


def is_bfl_flux(canon: Canon) -> bool:
    """A kohya-named file (kohya, LyCORIS) with BFL Flux block names (``lora_unet_double_blocks_…``/``single_blocks_…``)."""
    return canon.naming == Naming.KOHYA and any(_BFL_RE.match(_bfl_name(m) or "") for m in canon.modules)


def _flux_component(canon: Canon) -> set[str | None]:
    comps: set[str | None] = {"transformer"}
    if canon.naming == Naming.MODEL:
        comps.add(None)  # one model: a FluxTransformer2DModel adapted with PEFT directly
    return comps


def is_diffusers_flux(canon: Canon) -> bool:
    """A non-kohya adapter of a Flux transformer: single-stream blocks, or double blocks with a Flux base.
    Double blocks alone are also SD3's (``transformer_blocks.N.attn.add_q_proj`` …): not fused then."""
    comps = _flux_component(canon)
    paths = [m.path for m in canon.modules if m.component in comps]
    if canon.naming == Naming.KOHYA or not paths:
        return False
    if any(p.startswith("single_transformer_blocks.") for p in paths):
        return True
    return "flux" in (canon.base_model or "").lower() and any(p.startswith("transformer_blocks.") for p in paths)


@dataclass
class _Log:
    split: Counter = field(default_factory=Counter)  # "qkv"/"linear1" → count
    ranks: Counter = field(default_factory=Counter)  # "rank 4 → 12" → count
    zero: list[str] = field(default_factory=list)
    baked: list[str] = field(default_factory=list)
    swapped: int = 0
    mlp_assumed: list[str] = field(default_factory=list)


def _plain(m: CanonModule, what: str) -> None:
    if m.kind != Kind.LINEAR:
        raise InspectError(f"module {m.source_name or m.name!r}: a Flux {what} must be a Linear LoRA, not {m.kind}")
    if m.magnitude is not None:
        raise InspectError(f"module {m.source_name or m.name!r}: DoRA on a Flux {what} is not split or fused "
                           "(its magnitude would need the base weight's row norms)")


def _new(m: CanonModule, component: str | None, path: str, b: np.ndarray, a: np.ndarray, scale: float,
         source: str) -> CanonModule:
    return CanonModule(component, path, Kind.LINEAR, np.ascontiguousarray(b), np.ascontiguousarray(a), scale, None, 4, m.magnitude,
                       source, scale * int(b.shape[1]), False)


def _swap_rows(m: CanonModule) -> np.ndarray:
    if m.shape[0] % 2:
        raise InspectError(f"module {m.source_name or m.name!r}: final-layer modulation with an odd output width "
                           f"{m.shape[0]} cannot be split into shift and scale halves")
    h = m.shape[0] // 2
    return np.concatenate([m.b[h:], m.b[:h]])


def _split_dims(m: CanonModule, canon: Canon, bfl: str, n: int) -> list[int]:
    out, inp = m.shape
    who = m.source_name or m.name
    if n == 3:
        if out % 3:
            raise InspectError(f"module {who!r}: fused qkv with {out} output rows is not three equal parts")
        return [out // 3] * 3
    h = inp  # linear1's input is the hidden state
    lin2 = bfl[: -len("linear1")] + "linear2"
    other = next((o for o in canon.modules if _bfl_name(o) == lin2), None)
    if other is not None and other.shape[0] != h:
        raise InspectError(f"module {who!r}: hidden size {h} (linear1's input) disagrees with {lin2}'s output "
                           f"{other.shape[0]}; cannot split linear1")
    if out <= 3 * h:
        raise InspectError(f"module {who!r}: linear1 has {out} output rows, not 3·{h} (q, k, v) plus an MLP part; "
                           "cannot determine the split")
    return [h, h, h, out - 3 * h]


def _split(m: CanonModule, dims: list[int], paths: tuple[str, ...]) -> list[CanonModule]:
    """B by rows into the parts; A shared, or only the columns where a part's B is non-zero."""
    out, lo = [], 0
    for d, path in zip(dims, paths):
        bj = m.b[lo:lo + d]
        lo += d
        cols = (numbers(bj) != 0).any(axis=0)
        if bool(cols.any()) and not bool(cols.all()):
            bj, aj = bj[:, cols], m.a[cols]
        else:
            aj = m.a
        out.append(_new(m, "transformer", path, bj.copy(), aj.copy(), m.scale, m.source_name or m.name))
    return out


def split_to_diffusers(canon: Canon) -> Canon:
    """kohya/BFL Flux names → diffusers names, fused modules split (module docstring)."""
    mods: list[CanonModule] = []
    log = _Log()
    for m in canon.modules:
        bfl = _bfl_name(m)
        if bfl is None:
            mods.append(m)
            continue
        paths = bfl_to_diffusers(bfl)
        if paths is None:
            raise InspectError(f"module {m.source_name or m.name!r}: not a Flux module this converter maps to "
                               "diffusers names")
        if len(paths) > 1:
            _plain(m, "fused module")
            dims = _split_dims(m, canon, bfl, len(paths))
            mods += _split(m, dims, paths)
            log.split["linear1" if len(paths) == 4 else "qkv"] += 1
            continue
        b = m.b
        if bfl == _SWAP:
            _plain(m, "final-layer modulation")
            b, log.swapped = _swap_rows(m), log.swapped + 1
        mods.append(CanonModule("transformer", paths[0], m.kind, b, m.a, m.scale, m.kernel, m.conv_ndim, m.magnitude,
                                m.source_name, m.alpha, m.rslora))
    notes = list(canon.notes)
    if log.split["qkv"]:
        notes.append(f"Flux: {log.split['qkv']} fused qkv modules split into to_q/to_k/to_v (add_*_proj for txt): "
                     "B cut by rows, A shared (exact)")
    if log.split["linear1"]:
        notes.append(f"Flux: {log.split['linear1']} single-block linear1 modules split into to_q/to_k/to_v/proj_mlp "
                     "(rows h, h, h, rest; h = linear1's input width): exact")
    if log.swapped:
        notes.append("Flux: final_layer_adaLN_modulation_1 → norm_out.linear with B's shift/scale row halves swapped")
    return Canon(mods, canon.naming, canon.base_model, canon.fan_in_fan_out, canon.config, canon.extras, notes)


def _part_rows(bfl: str, parts: dict[int, CanonModule], n: int, canon: Canon, log: _Log) -> list[int]:
    """Output rows of each part: h (= the input width, the hidden size) for q, k, v; proj_mlp's own
    width, else proj_out's input − h, else MLP_RATIO·h (diffusers' FluxSingleTransformerBlock)."""
    h = next(iter(parts.values())).shape[1]
    for j, p in parts.items():
        if p.shape[1] != h or (j < 3 and p.shape[0] != h):
            raise InspectError(f"module {p.source_name or p.name!r}: shape {p.shape} does not fit a Flux block of "
                               f"hidden size {h}; cannot fuse it into {bfl}")
    if n == 3:
        return [h] * 3
    if 3 in parts:
        return [h, h, h, parts[3].shape[0]]
    idx = bfl[len("single_blocks_"):].split("_")[0]
    lin2 = next((m for m in canon.modules if m.path == f"single_transformer_blocks.{idx}.proj_out"
                 and m.component in _flux_component(canon)), None)
    if lin2 is not None and lin2.shape[1] > h:
        return [h, h, h, lin2.shape[1] - h]
    log.mlp_assumed.append(bfl)
    return [h, h, h, MLP_RATIO * h]


def _fuse(bfl: str, parts: dict[int, CanonModule], dims: list[int], log: _Log) -> CanonModule:
    """A = cat(A_j), B = block-diagonal(f_j·B_j) (or one shared A and B stacked by rows), f_j = s_j/s."""
    order = sorted(parts)
    for j in order:
        _plain(parts[j], "q/k/v part")
    s = Counter(parts[j].scale for j in order).most_common(1)[0][0]
    first = parts[order[0]]
    shared = all(same_values(parts[j].a, first.a) for j in order)
    k = first.rank if shared else sum(parts[j].rank for j in order)
    b = np.zeros((sum(dims), k), dtype=np.float64)
    col = 0
    for j in order:
        p, lo = parts[j], sum(dims[:j])
        f = p.scale / s
        if f != 1.0:
            log.baked.append(f"{p.name} (s = {p.scale:.6g}, fused s = {s:.6g})")
        width = k if shared else p.rank
        b[lo:lo + dims[j], col:col + width] = numbers(times(p.b, f))
        col += 0 if shared else p.rank
    a = first.a if shared else _cat([parts[j].a for j in order])
    log.zero += [f"{bfl}[{j}]" for j in range(len(dims)) if j not in parts]
    how = "shared A" if shared else "block-diagonal"
    log.ranks[f"rank {'+'.join(str(parts[j].rank) for j in order)} → {k} ({how})"] += 1
    names = [parts[j].source_name or parts[j].name for j in order]
    stem = os.path.commonprefix(names).rpartition(".")[0] + "."
    source = names[0] if len(names) == 1 else stem + "{" + ",".join(x[len(stem):] for x in names) + "}"
    path = kohya_to_dotted("lora_unet_" + bfl)[1]
    return CanonModule("unet", path, Kind.LINEAR, b, a.copy(), s, None, 4, None, source, s * k, False)


def _cat(xs: list[np.ndarray]) -> np.ndarray:
    """Rows stacked (``torch.cat``): one stored dtype is kept (bf16 bits too), mixed ones are promoted."""
    if len({x.dtype for x in xs}) == 1:
        return np.concatenate(xs)
    return np.concatenate([numbers(x) for x in xs])


def _renamed(m: CanonModule, bfl: str, log: _Log) -> CanonModule:
    b, scale = m.b, m.scale
    if bfl == _SWAP:
        _plain(m, "final-layer modulation")
        b, log.swapped = _swap_rows(m), log.swapped + 1
    if bfl.startswith("final_layer_"):  # diffusers' kohya converter ignores final_layer α: store α = r
        b, scale = times(b, scale), 1.0
    path = kohya_to_dotted("lora_unet_" + bfl)[1]
    return CanonModule("unet", path, m.kind, b, m.a, scale, m.kernel, m.conv_ndim, m.magnitude,
                       m.source_name or m.name, scale * m.rank, False)


def _fuse_notes(log: _Log) -> list[str]:
    notes = []
    if log.ranks:
        what = "; ".join(f"{n}× {r}" for r, n in sorted(log.ranks.items()))
        notes.append(f"Flux: q/k/v(/proj_mlp) fused into qkv/linear1, down = cat(A), up = block-diagonal(B) "
                     f"unless all parts share A: {what}")
    if log.zero:
        notes.append(f"Flux: {plural(len(log.zero), 'absent part')} ({', '.join(log.zero[:3])}…) written as zero rows of up "
                     "(ΔW = 0 there)")
    if log.baked:
        notes.append(f"Flux: per-part scale baked into up for {plural(len(log.baked), 'part')} ({log.baked[0]} …)")
    if log.mlp_assumed:
        notes.append(f"Flux: MLP width of {', '.join(log.mlp_assumed[:3])} taken as {MLP_RATIO}·hidden "
                     "(no proj_mlp/proj_out module; diffusers' Flux mlp_ratio)")
    if log.swapped:
        notes.append("Flux: norm_out.linear → final_layer_adaLN_modulation_1 with up's scale/shift row halves "
                     "swapped; final_layer modules have s baked into up (α = r: diffusers ignores their α)")
    return notes


def fuse_to_kohya(canon: Canon) -> Canon:
    """diffusers Flux names → kohya/BFL names, q/k/v (+ proj_mlp) fused (module docstring)."""
    comps = _flux_component(canon)
    log = _Log()
    slots: list[CanonModule | str] = []
    groups: dict[str, dict[int, CanonModule]] = {}
    nparts: dict[str, int] = {}
    for m in canon.modules:
        if m.component not in comps:
            slots.append(m)
            continue
        hit = diffusers_to_bfl(m.path)
        if hit is None:
            raise InspectError(f"module {m.name!r}: not a Flux transformer module with a kohya/BFL name (diffusers' "
                               "loader drops BFL modules from a file that mixes the two namings)")
        bfl, j, n = hit
        if n == 1:
            slots.append(_renamed(m, bfl, log))
            continue
        if bfl not in groups:
            groups[bfl], nparts[bfl] = {}, n
            slots.append(bfl)
        groups[bfl][j] = m
    mods = [s if isinstance(s, CanonModule) else _fuse(s, groups[s], _part_rows(s, groups[s], nparts[s], canon, log),
                                                       log) for s in slots]
    return Canon(mods, canon.naming, canon.base_model, canon.fan_in_fan_out, canon.config, canon.extras,
                 list(canon.notes) + _fuse_notes(log))


def flux_for_target(canon: Canon, naming: Naming) -> Canon:
    """The canon in the Flux naming of a target layout that names its modules by ``naming`` (its
    ``Layout.naming``): BFL kohya → a target without kohya names is split to diffusers names; a diffusers/PEFT
    Flux adapter → a kohya-named target is fused to BFL names; everything else is returned as is."""
    if naming != Naming.KOHYA and is_bfl_flux(canon):
        return split_to_diffusers(canon)
    if naming == Naming.KOHYA and is_diffusers_flux(canon):
        return fuse_to_kohya(canon)
    return canon
