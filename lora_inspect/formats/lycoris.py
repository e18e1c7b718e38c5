"""LyCORIS files (KohakuBlueleaf/LyCORIS ``lycoris/modules``; kohya naming ``lora_unet_…``, ``lora_te1_…``,
``lora_transformer_…``, or LyCORIS's own ``lycoris_…``): LoCon (with Tucker ``lora_mid``), LoHa
(``hada_*``, Tucker ``hada_t1/t2``), LoKr (``lokr_*``, every full/low-rank/Tucker combination), ``full``
(``diff``), each with an optional ``dora_scale``; Diag-OFT, BOFT and (IA)³, whose ΔW needs the base weight
(``--base``: formats/lycoris_bind.py); GLoRA and T-LoRA are named, Norm and sparse-residual keys reported.
Flattened convs get their kernels from their names (lora_inspect/kernels.py). Formulas and traps:
docs/formats.md, "LyCORIS".

A file is read here when any key carries a LyCORIS-only suffix (or the ``lycoris_`` prefix); plain
``lora_down``/``lora_up`` files stay with the kohya layout. Scale: s = α/r (r = LyCORIS's ``lora_dim``:
``lora_down`` rows, ``hada_w1_b`` rows, LoKr ``lokr_w2_b``/``lokr_w1_b`` rows), α absent or 0 ⇒ s = 1,
LoKr with ``lokr_w1`` and ``lokr_w2`` both stored whole ⇒ s = 1 (LyCORIS forces α = r there).
A rewrite writes kohya-layout LoRA/LoCon (``lora_down``/``lora_up``/``alpha``) under the same names.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from ..adapter import Adapter, LowRankUpdate, Module
from ..arrays import encode, scaled
from ..errors import InspectError
from ..kernels import recover_kernels
from ..kinds import Kind
from ..orientation import PEFT
from ..units import plural, verb
from .kohya import KOHYA_PREFIXES, KohyaFormat, KohyaNaming, finish
from .layout import AlphaHome, Capabilities, Format, Found, Layout, Rewrite
from .lycoris_bind import adapter_with_base, base_module, base_notes
from .lycoris_updates import FullUpdate, LoConUpdate, LoHaUpdate, LoKrUpdate, numel
from .tensors import TensorSource

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

__all__ = ["LycorisLayout", "LYCORIS_SUFFIXES", "BASE_DEPENDENT", "ReadContext", "read_loha", "read_lokr"]

# key suffix → role (the role is the suffix without its dot)
_ROLES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "diff", "diff_b", "on_input", "weight", "oft_blocks", "oft_diag", "rescale",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight",
    "q_layer.weight", "p_layer.weight", "lambda_layer", "w_norm", "b_norm",
    "bias_indices", "bias_values", "bias_size",
)
_ORDER = sorted(_ROLES, key=len, reverse=True)
# suffixes only LyCORIS writes: one of them makes a file LyCORIS
LYCORIS_SUFFIXES = tuple("." + r for r in _ROLES if r not in ("lora_down.weight", "lora_up.weight", "alpha", "weight",
                                                              "rescale"))
# algorithms whose ΔW needs the base weight (docs/formats.md, "LyCORIS"): name, marker role
BASE_DEPENDENT = (("ia3", "on_input"), ("oft", "oft_blocks"), ("oft", "oft_diag"), ("glora", "a1.weight"),
                  ("tlora", "lambda_layer"))
_REPORTED = (("norm", "w_norm"), ("norm", "b_norm"), ("sparse", "bias_indices"))


def _group(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    mods: dict[str, dict[str, str]] = defaultdict(dict)
    rest = []
    for key in keys:
        role = next((r for r in _ORDER if key.endswith("." + r) and len(key) > len(r) + 1), None)
        if role is None:
            rest.append(key)
            continue
        mods[key[: -len(role) - 1]][role] = key
    return dict(mods), rest


def _algo(roles: dict[str, str], source: TensorSource) -> str:
    """LyCORIS's detection order (``lycoris/modules/__init__.py · get_module``)."""
    if "lora_up.weight" in roles or "lora_down.weight" in roles:
        return "locon"
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if "on_input" in roles:
        return "ia3"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "diff" in roles:
        return "full"
    if "oft_blocks" in roles:
        return "boft" if len(source.info(roles["oft_blocks"]).shape) == 4 else "oft"
    for algo, marker in BASE_DEPENDENT + _REPORTED:
        if marker in roles:
            return algo
    return "other"


class ReadContext:
    """One module being read: its name, key roles and the file (for one-line errors)."""

    def __init__(self, name: str, roles: dict[str, str], source: TensorSource) -> None:
        self.name, self.roles, self.source = name, roles, source
        self.algo = _algo(roles, source)

    def shape(self, role: str) -> tuple[int, ...]:
        return tuple(self.source.info(self.roles[role]).shape)

    def need(self, *roles: str) -> None:
        missing = [r for r in roles if r not in self.roles]
        if missing:
            have = ", ".join(sorted(self.roles))
            raise InspectError(f"{self.source.path}: LyCORIS {self.algo} module {self.name!r}: missing half — no "
                               f"{missing[0]!r} tensor "
                               f"beside {have} (incomplete save or renamed keys?)")

    def fail(self, what: str) -> InspectError:
        shapes = ", ".join(f"{r} {self.shape(r)}" for r in sorted(self.roles) if r not in ("alpha",))
        return InspectError(f"{self.source.path}: module {self.name!r}: {what} ({shapes})")

    def dims(self, role: str, ndims: tuple[int, ...]) -> tuple[int, ...]:
        sh = self.shape(role)
        if len(sh) not in ndims or 0 in sh:
            raise self.fail(f"{role} has shape {sh}, expected {' or '.join(f'{n}-D' for n in ndims)} and non-empty")
        return sh

    def numel(self) -> int:
        return numel([self.shape(r) for r in self.roles if r not in ("alpha", "dora_scale", "diff_b")])


def _locon(c: ReadContext) -> tuple[object, tuple[int, int], tuple[int, int] | None, int]:
    c.need("lora_down.weight", "lora_up.weight")
    down, up = c.dims("lora_down.weight", (2, 3, 4)), c.dims("lora_up.weight", (2, 4))
    r = down[0]
    if up[1] != r or any(d != 1 for d in up[2:]):
        raise c.fail("lora_up must be (out, r[, 1, 1]) with r = lora_down's rows")
    kernel = (down[2], down[3] if len(down) > 3 else 1) if len(down) > 2 else None
    if "lora_mid.weight" in c.roles:
        mid = c.dims("lora_mid.weight", (4,))
        if mid[:2] != (r, r) or any(d != 1 for d in down[2:]):
            raise c.fail("a Tucker LoCon needs lora_mid (r, r, kh, kw) and lora_down (r, in, 1, 1)")
        kernel = (mid[2], mid[3])
        shape = (up[0], down[1] * mid[2] * mid[3])
        return LoConUpdate(c.name, c.roles, r, min(r, *shape), _numel=c.numel()), shape, kernel, r
    shape = (up[0], math.prod(down[1:]))
    upd = LowRankUpdate(c.roles["lora_down.weight"], c.roles["lora_up.weight"], r, PEFT)
    return upd, shape, kernel, r


def read_loha(c: ReadContext) -> tuple[object, tuple[int, int], tuple[int, int] | None, int]:
    c.need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    tucker = "hada_t1" in c.roles or "hada_t2" in c.roles
    if tucker:
        c.need("hada_t1", "hada_t2")
        a1, b1, a2, b2 = (c.dims(r, (2,)) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        t1, t2 = c.dims("hada_t1", (4,)), c.dims("hada_t2", (4,))
        if t1[:2] != (a1[0], b1[0]) or t2[:2] != (a2[0], b2[0]) or a1[1] != a2[1] or b1[1] != b2[1] \
                or t1[2:] != t2[2:]:
            raise c.fail("Tucker LoHa factors do not multiply to one weight: need hada_wi_a (r, out), "
                         "hada_wi_b (r, in), hada_ti (r, r, kh, kw)")
        kernel: tuple[int, int] | None = (t1[2], t1[3])
        shape, widths = (a1[1], b1[1] * t1[2] * t1[3]), (a1[0], a2[0])
    else:
        a1, a2 = c.dims("hada_w1_a", (2,)), c.dims("hada_w2_a", (2,))
        b1, b2 = c.dims("hada_w1_b", (2, 4)), c.dims("hada_w2_b", (2, 4))
        n1, n2 = math.prod(b1[1:]), math.prod(b2[1:])
        if a1[1] != b1[0] or a2[1] != b2[0] or a1[0] != a2[0] or n1 != n2:
            raise c.fail("LoHa factors do not multiply to one weight: need hada_wi_a (out, r) @ hada_wi_b (r, in) "
                         "of the same (out, in)")
        kernel = (b1[2], b1[3]) if len(b1) == 4 else None
        shape, widths = (a1[0], n1), (a1[1], a2[1])
    dim = c.shape("hada_w1_b")[0]
    upd = LoHaUpdate(c.name, c.roles, dim, min(widths[0] * widths[1], *shape), widths, shape, _numel=c.numel())
    return upd, shape, kernel, dim


def _lokr_w1(c: ReadContext) -> tuple[int, int, int]:
    """(a, c, r₁) of W₁; r₁ = 0 when stored whole."""
    if "lokr_w1" in c.roles:
        a, cc = c.dims("lokr_w1", (2,))
        return a, cc, 0
    c.need("lokr_w1_a", "lokr_w1_b")
    (a, r1), (r1b, cc) = c.dims("lokr_w1_a", (2,)), c.dims("lokr_w1_b", (2,))
    if r1 != r1b:
        raise c.fail("lokr_w1_a (a, r) and lokr_w1_b (r, c) disagree on r")
    return a, cc, r1


def _lokr_w2(c: ReadContext) -> tuple[int, int, tuple[int, int] | None, int]:
    """(b, d·K, kernel, r₂) of W₂; r₂ = 0 when stored whole."""
    if "lokr_w2" in c.roles:
        w2 = c.dims("lokr_w2", (2, 4))
        return w2[0], math.prod(w2[1:]), ((w2[2], w2[3]) if len(w2) == 4 else None), 0
    c.need("lokr_w2_a", "lokr_w2_b")
    wa, wb = c.dims("lokr_w2_a", (2,)), c.dims("lokr_w2_b", (2, 4))
    if "lokr_t2" in c.roles:
        t2 = c.dims("lokr_t2", (4,))
        if len(wb) != 2 or t2[:2] != (wa[0], wb[0]):
            raise c.fail("Tucker LoKr needs lokr_w2_a (r, b), lokr_w2_b (r, d), lokr_t2 (r, r, kh, kw)")
        return wa[1], wb[1] * t2[2] * t2[3], (t2[2], t2[3]), wb[0]
    if wa[1] != wb[0]:
        raise c.fail("lokr_w2_a (b, r) and lokr_w2_b (r, d) disagree on r")
    return wa[0], math.prod(wb[1:]), ((wb[2], wb[3]) if len(wb) == 4 else None), wb[0]


def read_lokr(c: ReadContext) -> tuple[object, tuple[int, int], tuple[int, int] | None, int]:
    if "lokr_t1" in c.roles:
        raise c.fail("lokr_t1 is listed by LyCORIS but never created; this file's W₁ cannot be read")
    a, cc, r1 = _lokr_w1(c)
    b, dk, kernel, r2 = _lokr_w2(c)
    dim = r2 or r1  # LyCORIS: lokr_w2_b rows if W₂ is decomposed, else lokr_w1_b rows, else none (s = 1)
    rank = min(r1 or min(a, cc), a, cc) * min(r2 or min(b, dk), b, dk)
    return LoKrUpdate(c.name, c.roles, dim, rank, _numel=c.numel()), (a * b, cc * dk), kernel, dim


def _full(c: ReadContext) -> tuple[object, tuple[int, int], tuple[int, int] | None, int]:
    d = c.dims("diff", (2, 4))
    shape = (d[0], math.prod(d[1:]))
    return FullUpdate(c.name, c.roles, 0, min(shape), _numel=c.numel()), shape, ((d[2], d[3]) if len(d) == 4 else None), 0


_READERS = {"locon": _locon, "loha": read_loha, "lokr": read_lokr, "full": _full}


def _dora(c: ReadContext, shape: tuple[int, int], kernel: tuple[int, int] | None) -> str | None:
    """The ``dora_scale`` key after checking its axis: (out, 1[, 1, 1]) or (out,) row-wise, (1, in[, 1, 1])
    column-wise (legacy); anything else is refused."""
    if "dora_scale" not in c.roles:
        return None
    sh = c.shape("dora_scale")
    k = kernel[0] * kernel[1] if kernel else 1
    rows = sh in ((shape[0],), (shape[0], 1), (shape[0], 1, 1, 1))
    cols = len(sh) in (2, 4) and sh[0] == 1 and all(d == 1 for d in sh[2:]) and (
        sh[1] * k == shape[1] or (len(sh) == 4 and kernel is None and shape[1] % sh[1] == 0))  # flattened conv
    if not (rows or cols):
        raise c.fail(f"dora_scale has shape {sh}: neither (out, 1) = ({shape[0]}, 1) nor (1, in)")
    return c.roles["dora_scale"]


def _alpha(c: ReadContext, upd: object, dim: int) -> tuple[float, float, bool]:
    """(α, s, α stored) — s = α/r, α absent or 0 ⇒ s = 1; LoKr stored whole ⇒ s = 1; full ⇒ s = 1."""
    stored = "alpha" in c.roles
    alpha = c.source.scalar(c.roles["alpha"]) if stored else 0.0
    if not math.isfinite(alpha):
        raise InspectError(f"{c.source.path}: module {c.name!r}: alpha tensor {c.roles['alpha']!r} is {alpha}")
    if dim == 0 or (isinstance(upd, LoKrUpdate) and upd.full_full):
        return (alpha or float(dim)), 1.0, stored
    if alpha == 0:
        return float(dim), 1.0, stored
    return alpha, alpha / dim, stored


def _module(c: ReadContext, algo: str) -> Module:
    upd, shape, kernel, dim = _READERS[algo](c)
    alpha, scale, _ = _alpha(c, upd, dim)
    rank = upd.rank  # type: ignore[attr-defined]
    first = next(iter(upd.keys))  # type: ignore[attr-defined]
    return Module(
        name=c.name, kind=Kind.CONV if kernel else Kind.LINEAR, shape=shape, rank=rank, alpha=alpha, scale=scale,
        update=upd, source=c.source, kernel=kernel,  # type: ignore[arg-type]
        magnitude_key=_dora(c, shape, kernel), alpha_key=c.roles.get("alpha"), dtype=c.source.info(first).dtype,
    )


def _note_unread(counts: dict[str, list[int]]) -> list[str]:
    notes = []
    what = {"oft": "OFT (oft_diag)", "glora": "GLoRA", "tlora": "T-LoRA"}
    for algo, (n, params) in sorted(counts.items()):
        if algo in what:  # OFT, BOFT and (IA)³ are read (formats/lycoris_bind.py)
            notes.append(f"{plural(n, what[algo] + ' module')} ({params:,} parameters): {'its' if n == 1 else 'their'} ΔW "
                         "depends on the base weight in a way lora-inspect does not compute (it does for OFT, BOFT, "
                         "(IA)³); carried, not analysed")
        elif algo == "norm":
            notes.append(f"{plural(n, 'Norm module')} (w_norm/b_norm, {params:,} parameters): added to norm layers, no spectrum")
        else:
            notes.append(f"{plural(n, 'module')} with {algo} keys ({params:,} parameters) carried unchanged, not analysed")
    return notes


class LycorisFormat(Format):
    LYCORIS = "lycoris"


class LycorisLayout(KohyaNaming, Layout):
    name = "lycoris"
    formats: tuple[Format, ...] = (LycorisFormat.LYCORIS,)
    writes_as = "kohya"  # convert and merge write its modules as kohya LoRA/LoCon, under the same names
    caps = Capabilities(per_module_rank=True, per_module_alpha=True, dora=True, conv=True, embeddings=False,
                        alpha=AlphaHome.TENSORS)

    def matches(self, keys: list[str], found: Found) -> bool:
        if found.config is not None:
            return False  # a PEFT LoHa/LoKr directory: PEFT's rules
        return any(k.endswith(LYCORIS_SUFFIXES) for k in keys) or \
            any(k.startswith("lycoris_") and k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)

    def read(self, source: TensorSource, found: Found) -> Adapter:
        groups, rest = _group(source.keys())
        modules: list[Module] = []
        unread: dict[str, list[int]] = {}
        for name in sorted(groups):
            c = ReadContext(name, groups[name], source)
            algo = c.algo
            if algo in _READERS:
                modules.append(_module(c, algo))
                extra = [k for r, k in c.roles.items() if r in ("diff_b", "bias_indices", "bias_values", "bias_size")]
                rest.extend(extra)
                if "bias_indices" in c.roles:
                    unread.setdefault("sparse", [0, 0])[0] += 1
            elif (dependent := base_module(c)) is not None:  # OFT, BOFT, (IA)³: ΔW with --base
                modules.append(dependent)
            else:
                rest.extend(c.roles.values())
                entry = unread.setdefault(algo, [0, 0])
                entry[0] += 1
                entry[1] += c.numel()
        notes = _note_unread(unread) + base_notes(modules) + recover_kernels(modules, self.canonical_name)
        if not any(name.startswith(KOHYA_PREFIXES + ("lycoris_",)) for name in groups):
            notes.append("module names carry no kohya/LyCORIS prefix (lora_unet_, lora_te1_, lycoris_ …)")
        if not modules:
            raise InspectError(f"{source.path}: no LyCORIS module whose ΔW the file alone determines; "
                               + ("; ".join(notes) if notes else "no LoCon/LoHa/LoKr/full keys"))
        missing = sum(m.alpha_key is None and m.algo not in ("full",) and not m.update.needs_base for m in modules)
        if missing:
            notes.append(f"{plural(missing, 'module')} {verb(missing, 'has')} no .alpha tensor: α = r (scale 1) assumed, "
                         "as LyCORIS does")
        ad = finish(found.shown, LycorisFormat.LYCORIS, source, modules, rest, notes)
        return ad

    def with_base(self, ad: Adapter, base: Path | None) -> Adapter:
        """Flattened convs given the base weight's kernel, OFT/BOFT/(IA)³ bound to their base weights."""
        return adapter_with_base(ad, base)

    def output_format(self, ad: Adapter, out: object) -> Format:
        return KohyaFormat.KOHYA if not ad.use_dora else LycorisFormat.LYCORIS

    def truncated(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        for m in ad.modules:  # every kept module states α = k (s = 1): the scale is in the factors
            if m.name in ranks:
                tensors[f"{m.name}.alpha"] = np.array(float(ranks[m.name]), dtype=np.float32)
        return Rewrite(out_fmt, tensors, _metadata(ad), None)

    def rescaled(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], factor: float) -> Rewrite:
        """α × F where α sets the scale; baked into one factor where it does not (LoKr stored whole, full)."""
        for m in ad.modules:
            if _alpha_scales(m):  # α × F (α absent or 0 meant α = r: stored explicitly, scaled)
                key = m.alpha_key or f"{m.name}.alpha"
                st = m.source.info(m.alpha_key).dtype if m.alpha_key else "F32"
                tensors[key] = encode(np.array(m.alpha * factor, dtype=np.float64), st)
            else:
                key = m.update.bake_key
                tensors[key] = scaled(tensors[key], factor)
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)

    def baked(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray]) -> Rewrite:
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)


def _alpha_scales(m: Module) -> bool:
    upd = m.update
    if isinstance(upd, FullUpdate) or upd.needs_base:  # OFT's α is its constraint: no α scales ΔW
        return False
    return not (isinstance(upd, LoKrUpdate) and (upd.full_full or upd.dim == 0))


def _metadata(ad: Adapter) -> dict[str, str]:
    """The input's header metadata, with the network module now kohya LoRA/LoCon."""
    meta = dict(ad.metadata)
    if "ss_network_module" in meta:
        meta["ss_network_module"] = "networks.lora"
    meta["lora_inspect_converted_from"] = "lycoris"
    return meta
