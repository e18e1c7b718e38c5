"""llama.cpp GGUF LoRA adapters read as a layout: the output of llama.cpp's ``convert_lora_to_gguf.py``
(and of ``convert --to gguf``), docs/formats.md "llama.cpp GGUF adapters".

What llama.cpp reads (``src/llama-adapter.cpp``, ``src/llama-adapter.h · get_scale``): ``general.type =
adapter``, ``adapter.type = lora``, ``general.architecture``, one float32 ``adapter.lora.alpha`` (absent
or 0: scale 1), tensors ``<base tensor>.lora_a`` / ``.lora_b`` (``*_norm.weight`` skipped, any other name
refused). Linear: ``lora_a`` (r, in), ``lora_b`` (out, r) in numpy order (ne ``[in, r]``, ``[r, out]``);
``token_embd``: ``lora_a`` (vocab, r), ``lora_b`` (dim, r) (ΔW = lora_a·lora_bᵀ). The scale of a tensor is
α over *its own* rank. The converter writes only the PEFT config's ``lora_alpha``: rsLoRA and
``alpha_pattern`` are dropped, so the file's α is the truth here and ``info`` says what it cannot hold.

Module names are mapped back from GGUF's (``blk.3.attn_q``) to transformers paths
(``model.layers.3.self_attn.q_proj``) through ``gguf.TensorNameMap`` reversed, so that ``convert`` and
``merge`` meet other layouts' modules. LLaMA-family converters permute the rows of Q and K per head
(``convert_hf_to_gguf.py · LlamaModel.permute``): a row permutation changes no singular value, so
``info``, ``rank``, ``truncate`` and ``rescale`` need no head counts; anything that needs the
transformers-space ΔW (``convert`` to another layout, ``merge``, ``diff``) needs them from the base's
config.json, given by :meth:`GgufReadLayout.with_base`; without them those modules refuse in one line
naming --base.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import validate as v
from ..adapter import Adapter, LowRankUpdate, Module
from ..arrays import BF16, scaled
from ..errors import InspectError
from ..kinds import Kind
from ..optional import require
from ..orientation import PEFT, Orientation, OrientName, Shapes
from ..units import plural, verb
from .common import build_module, group_keys
from .gguf import HEAD_KEYS, MODEL_TYPE_ARCH, PERMUTE_ARCHS, GgufLayout
from .gguf_source import GgufSource, is_gguf
from .layout import Format, Found, Rewrite

if TYPE_CHECKING:  # pragma: no cover
    from ..files import AtomicOutput
    from .tensors import TensorSource

__all__ = ["GgufReadLayout", "GgufFormat", "unpermute_rows"]

_ALPHA = "adapter.lora.alpha"
_ALORA = "adapter.alora.invocation_tokens"
# which of gguf's many source names for a GGUF tensor is the transformers module path (first match wins)
_PREFER = tuple(re.compile(p) for p in (r"model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj$",
                                        r"model\.layers\.\d+\.(?:self_attn|mlp)\.\w+$", r"model\.embed_tokens$",
                                        r"lm_head$", r"model\.layers\.\d+\.[\w.]+$"))
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class GgufFormat(Format):
    GGUF = "gguf"


class _EmbeddingRows(Orientation):
    """llama.cpp's ``token_embd`` pair: lora_a (vocab, r) is B, lora_b (dim, r) is Aᵀ (ΔW (vocab, dim))."""

    name = OrientName.EMBEDDING

    def shapes(self, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> Shapes:
        return Shapes(a_shape[0], b_shape[0], a_shape[1], b_shape[1], Kind.EMBEDDING)

    def to_linear(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a, b.T

    def to_stored(self, b_lin: np.ndarray, a_lin: np.ndarray, a_shape: tuple[int, ...],
                  b_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        return b_lin, a_lin.T


EMBEDDING_ROWS = _EmbeddingRows()


def unpermute_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``LlamaModel.permute(w, n_head, n_head_kv)`` on the rows of ``b`` (``heads``: the count
    that permute used, the KV heads for K)."""
    return b.reshape(heads, b.shape[0] // heads // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


@dataclass
class _PermutedRows(LowRankUpdate):
    """Q or K of a LLaMA-family GGUF: B's rows permuted per head. The spectrum and truncation work on the
    stored pair (the same singular values); :meth:`factors`, the transformers-space pair, needs ``heads``."""

    heads: int | None = None

    def stored(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        return super().factors(source, dtype)

    def factors(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        b, a = self.stored(source, dtype)
        if self.heads is None:
            raise InspectError(f"tensor {self.b_key!r}: llama.cpp stores Q/K rows permuted per attention head and "
                               "the adapter holds no head counts: undoing it needs the base model's config.json "
                               "(--base of convert, merge or diff)")
        return unpermute_rows(b, self.heads), a

    def singular_values(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        if self.heads is not None:
            return None  # the factor route, un-permuted
        from ..spectrum import all_finite, singular_values

        b, a = self.stored(source, dtype)
        if not (all_finite(b) and all_finite(a)):
            raise ValueError("non-finite factors")
        return singular_values(b, a, scale)

    def decomposition(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        """The stored rows are cut (a truncation is written back in the GGUF's own row order)."""
        from ..spectrum import all_finite, decompose

        b, a = self.stored(source, dtype)
        if not (all_finite(b) and all_finite(a)):
            raise ValueError("non-finite factors")
        return decompose(b, a, scale)


def _header(source: GgufSource) -> tuple[str, float]:
    """(general.architecture, α) with llama.cpp's checks; α 0 when absent (llama.cpp: scale 1)."""
    where = f"{source.path}: GGUF"
    flat = {k: source.value(k, ("STRING",)) for k in ("general.type", "adapter.type", "general.architecture")}
    kind = v.string(flat, "general.type", where, default="")
    if kind != "adapter":
        what = "a model, not a LoRA adapter" if kind == "model" else "llama.cpp loads only 'adapter' files as a LoRA"
        raise InspectError(f"{where} general.type is {kind!r}: {what}")
    if v.string(flat, "adapter.type", where, default="") != "lora":
        raise InspectError(f"{where} adapter.type is {flat.get('adapter.type')!r}, not 'lora' (llama.cpp refuses it)")
    arch = v.string(flat, "general.architecture", where)
    if not arch:
        raise InspectError(f"{where} general.architecture is missing (llama.cpp checks it against the base model)")
    alpha = v.number({_ALPHA: source.value(_ALPHA, ("FLOAT32",))}, _ALPHA, where, default=0.0, minimum=0.0)
    return arch, float(alpha)


def _hf_names(arch: str, gnames: list[str]) -> dict[str, str]:
    """GGUF tensor name (``blk.0.attn_q.weight``) → the transformers module path, through gguf's name map
    for ``arch`` reversed; a name with no such path keeps its GGUF name (without ``.weight``)."""
    gguf = require("gguf", "reading a GGUF adapter")
    arch_enum = next((k for k, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    bases = {g: g.removesuffix(".weight") for g in gnames}
    if arch_enum is None:
        return bases
    blocks = max((int(m.group(1)) + 1 for g in gnames if (m := _BLOCK.match(g))), default=1)
    sources: dict[str, list[str]] = defaultdict(list)
    for hf, (_, gname) in gguf.get_tensor_name_map(arch_enum, blocks).mapping.items():
        sources[gname].append(hf)
    out = {}
    for g, base in bases.items():
        cands = sources.get(base, [])
        out[g] = next((c for p in _PREFER for c in cands if p.match(c)), base)
    return out


def _module(gname: str, roles: dict[str, str], source: GgufSource, alpha: float, arch: str) -> Module:
    for key in roles.values():
        if len(source.info(key).shape) != 2:
            raise InspectError(f"tensor {key!r} has shape {source.info(key).shape}: only 2-D LoRA tensors are read "
                               "(not per-expert stacks)")
    embd = gname.endswith("token_embd.weight")
    r = source.info(roles["B"]).shape[1] if "B" in roles else 1  # llama.cpp: rank = lora_b's ne[0]
    mod, _ = build_module(gname, roles, source, orient=EMBEDDING_ROWS if embd else PEFT, alpha=alpha or float(r))
    if arch in PERMUTE_ARCHS and gname.endswith(("attn_q.weight", "attn_k.weight")):
        mod.update = _PermutedRows(roles["A"], roles["B"], mod.rank, PEFT)
    return mod


def _notes(arch: str, alpha: float, modules: list[Module], names: dict[str, str], extras: list[str]) -> list[str]:
    notes = []
    mapped = [(g, n) for g, n in names.items() if n != g.removesuffix(".weight")]
    if mapped:
        notes.append(f"module names mapped from GGUF's to transformers' Llama-style paths ({len(mapped)} of "
                     f"{len(names)}, e.g. {mapped[0][0]} → {mapped[0][1]}) through gguf's {arch} tensor-name map")
    if alpha:
        ranks = sorted({m.rank for m in modules})
        notes.append(f"scale = α/r per tensor (llama.cpp's get_scale; adapter.lora.alpha = {alpha:g}), taken as the "
                     "truth: GGUF holds no rsLoRA and no per-module α, and convert_lora_to_gguf.py keeps only "
                     "lora_alpha, so PEFT scaled an adapter with use_rslora or an alpha_pattern otherwise"
                     + (f"; ranks differ per tensor ({', '.join(map(str, ranks))}): the source had a rank_pattern"
                        if len(ranks) > 1 else ""))
    else:
        notes.append("no adapter.lora.alpha (or 0): llama.cpp applies every tensor at scale 1")
    if arch in PERMUTE_ARCHS:
        notes.append(f"{arch}: Q/K rows are stored permuted per head (convert_hf_to_gguf.py · LlamaModel.permute); "
                     "spectra need no head counts; convert to another layout, merge and diff need --base")
    if extras:
        notes.append(f"{plural(len(extras), 'norm tensor')} ({extras[0]} …): llama.cpp skips {'it' if len(extras) == 1 else 'them'}")
    return notes


def _read(source: GgufSource, found: Found) -> Adapter:
    arch, alpha = _header(source)
    groups, rest = group_keys(source.keys(), {".lora_a": "A", ".lora_b": "B"})
    bad = next((k for k in rest if not k.endswith("_norm.weight")), None)
    if bad is not None:
        raise InspectError(f"tensor {bad!r}: not .lora_a, .lora_b or *_norm.weight (llama.cpp refuses the file)")
    if not groups:
        raise InspectError(f"{source.path}: a GGUF adapter with no .lora_a/.lora_b tensors")
    names = _hf_names(arch, list(groups))
    modules = []
    for gname in groups:
        mod = _module(gname, groups[gname], source, alpha, arch)
        mod.name = names[gname]
        modules.append(mod)
    if len({m.name for m in modules}) != len(modules):
        raise InspectError(f"{source.path}: two GGUF tensors map to one module name")
    notes = _notes(arch, alpha, modules, names, rest)
    if _ALORA in source.fields:
        notes.append(f"an activated LoRA ({_ALORA}): llama.cpp applies it only after those tokens; truncate and "
                     "rescale keep them, a conversion to another layout does not")
    return Adapter(path=found.shown, format=GgufFormat.GGUF, weights_path=source.path, source=source, modules=modules,
                   extras=sorted(rest), r=Counter(m.rank for m in modules).most_common(1)[0][0],
                   alpha=alpha or None, notes=notes)


def _heads(cfg: dict, where: str) -> tuple[int, int]:
    for heads, kv in HEAD_KEYS:
        nh = v.integer(cfg, heads, where, default=None, minimum=1)
        if nh is not None:
            return nh, v.integer(cfg, kv, where, default=None, minimum=1) or nh
    raise InspectError(f"{where}: no num_attention_heads: the Q/K rows of a llama GGUF cannot be un-permuted")


def _check_base(ad: Adapter, cfg: dict, where: str, arch: str) -> None:
    mt = v.string(cfg, "model_type", where)
    if isinstance(mt, str) and MODEL_TYPE_ARCH.get(mt, mt) != arch:
        raise InspectError(f"{where}: model_type {mt!r}, but {ad.path} is a {arch} adapter: another base model")
    hidden = v.integer(cfg, "hidden_size", where, default=None, minimum=1)
    q = next((m for m in ad.modules if isinstance(m.update, _PermutedRows)), None)
    if hidden is not None and q is not None and q.shape[1] != hidden:
        raise InspectError(f"{where}: hidden_size {hidden}, but {q.low_rank.b_key!r} has {q.shape[1]} inputs: "
                           "another base model")


def _write(path: Path, source: GgufSource, alpha: float, tensors: dict[str, np.ndarray]) -> None:
    """A GGUF adapter at ``path``: the source's metadata (α replaced) and ``tensors`` in numpy order."""
    gguf = require("gguf", "writing GGUF")
    arch = source.value("general.architecture", ("STRING",))
    w = gguf.GGUFWriter(str(path), arch=arch)
    try:
        for key, (val, kinds) in source.fields.items():
            if key not in ("general.architecture", "general.alignment", _ALPHA):
                w.add_key_value(key, val, kinds[0], kinds[1] if len(kinds) > 1 else None)
        w.add_float32(_ALPHA, alpha)
        for name, t in tensors.items():
            t = np.ascontiguousarray(t)
            if t.dtype == BF16:  # numpy has no bfloat16: its 16-bit words, typed BF16 (gguf 0.19)
                w.add_tensor(name, t.view(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


class GgufReadLayout(GgufLayout):
    """The GGUF layout, read as well as written: detection by the file's magic, reading, same-layout
    rewrites (``truncate``, ``rescale``) written back as GGUF with the source's metadata."""

    formats: tuple[Format, ...] = (GgufFormat.GGUF,)
    weight_suffixes = (".gguf",)

    def open(self, path: Path) -> "TensorSource | None":
        return GgufSource(path) if is_gguf(path) else None

    def matches(self, keys: list[str], found: Found) -> bool:
        return is_gguf(found.weights)  # the magic, not the keys: mlx-lm's keys also end in .lora_a

    def read(self, source: "TensorSource", found: Found) -> Adapter:
        if not isinstance(source, GgufSource):
            raise InspectError(f"{found.weights}: not a GGUF file (no 'GGUF' magic)")
        return _read(source, found)

    def with_base(self, ad: Adapter, base: Path | None) -> Adapter:
        """``ad`` with its permuted Q/K modules given their head counts from the base model's config.json
        (``--base``), so that their factors are the transformers-space ones; ``ad`` itself when no module is
        permuted. Refused in one line naming --base when one is and no base is given."""
        from ..convert.gguf_out import base_config

        permuted = [(m, m.update) for m in ad.modules if isinstance(m.update, _PermutedRows)]
        if not permuted:
            return ad
        arch = self._arch(ad)
        if base is None:
            raise InspectError(f"{ad.path}: a {arch} GGUF stores Q/K rows permuted per attention head and holds no "
                               "head counts: give --base (the base model's directory or config.json)")
        cfg = base_config(base)
        assert cfg is not None
        where = f"--base {base}"
        _check_base(ad, cfg, where, arch)
        n_head, n_kv = _heads(cfg, where)
        for m, u in permuted:
            heads = n_kv if u.b_key.endswith("attn_k.weight.lora_b") else n_head
            if m.shape[0] % (2 * heads):
                raise InspectError(f"{where}: {plural(heads, 'head')} {verb(heads, 'does')} not divide the "
                                   f"{plural(m.shape[0], 'row')} of {u.b_key!r} into "
                                   "pairs: another base model")
            m.update = replace(u, heads=heads)
        return ad

    @staticmethod
    def _arch(ad: Adapter) -> str:
        assert isinstance(ad.source, GgufSource)
        return str(ad.source.value("general.architecture", ("STRING",)))

    # ------------------------------------------------------------------ rewriting (truncate, rescale)
    def output_format(self, ad: Adapter, out: Path) -> Format:
        if out.suffix != ".gguf":
            raise InspectError(f"{out}: a GGUF adapter is written to a .gguf file; name OUT …​.gguf")
        return GgufFormat.GGUF

    def global_alpha(self, ad: Adapter) -> float | None:
        return ad.alpha

    def truncated(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        """Every scale is baked to 1 in ``tensors``; llama.cpp applies α/r per tensor, so α is the most common
        new rank and each other module's B is multiplied by its r/α."""
        alpha = float(Counter(ranks.values()).most_common(1)[0][0])
        for m in ad.modules:
            if m.name in ranks and ranks[m.name] != alpha:
                tensors[m.b_key] = scaled(tensors[m.b_key], ranks[m.name] / alpha)
        return Rewrite(out_fmt, tensors, {}, {_ALPHA: alpha})

    def rescaled(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], factor: float) -> Rewrite:
        if not ad.alpha:
            raise InspectError(f"{ad.path}: no adapter.lora.alpha (llama.cpp applies scale 1), so there is none to "
                               "scale", hint="bake the factor into B instead", option="bake")
        return Rewrite(out_fmt, tensors, {}, {_ALPHA: ad.alpha * factor})

    def baked(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray]) -> Rewrite:
        return Rewrite(out_fmt, tensors, {}, {_ALPHA: ad.alpha or 0.0})

    def tmp_suffix(self, ad: Adapter, out_fmt: Format) -> str:
        return ".gguf"

    def write(self, atomic: "AtomicOutput", ad: Adapter, rw: Rewrite) -> None:
        assert isinstance(ad.source, GgufSource) and rw.config is not None
        _write(atomic.tmp, ad.source, float(rw.config[_ALPHA]), rw.tensors)
