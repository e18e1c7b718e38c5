"""The canonical in-memory form of an adapter, the same for every layout (docs/formats.md, "convert").

Per module: its canonical name (component, dotted path: the source layout's ``canonical_name``), kind,
B (out × k) and A (k × in·kh·kw) in linear orientation, the true scale s (ΔW = s·B@A:
α/r, α/√r with rsLoRA, mlx-lm's absolute scale, AdaLoRA's α/(r + 1e-5) with E folded into A), the
conv kernel, a DoRA magnitude, and where it came from. Writers decide how to store s (an α per
module, a global α with the rest baked into B, or all of it baked into B).

Factors are float64 by default (``merge`` does arithmetic on them). ``convert`` reads them in their
stored floating dtype (``native=True``): a plain LoRA pair then holds the values of the file in its own
dtype (bf16 as :data:`lora_inspect.arrays.BF16` bits, on which numpy refuses arithmetic), so a conversion
that changes only names and layout copies bytes and never rounds. Arithmetic on factors (a baked scale, a
split, a padding) goes through :func:`times`, which works in float64; :func:`numbers` gives a factor's
values (bf16 widened to float32, exactly) where one is only looked at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..arrays import NUMPY_OF, decode, encode
from ..errors import InspectError
from ..formats import layout_of
from ..formats.layout import Layout, Naming
from ..kinds import Algo, Kind
from ..spectrum import all_finite
from .names import full_name

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter, Module

__all__ = ["CanonModule", "Canon", "from_adapter", "times", "numbers", "same_values"]

_NATIVE = ("F32", "F16", "BF16", "F64")


@dataclass
class CanonModule:
    component: str | None
    path: str
    kind: Kind
    b: np.ndarray  # (out, k) float64, or the stored dtype (from_adapter(native=True); bf16 as arrays.BF16)
    a: np.ndarray  # (k, in·kh·kw), same dtype as b
    scale: float
    kernel: tuple[int, int] | None = None
    conv_ndim: int = 4  # stored A dims for a conv (3 = Conv1d, 4 = Conv2d)
    magnitude: np.ndarray | None = None
    source_name: str = ""
    alpha: float | None = None  # the source's α (s = α/r or α/√r) where one was stored
    rslora: bool = False
    algo: Algo = Algo.LORA  # the source's update type: lora, locon (Tucker), loha, lokr, full

    @property
    def name(self) -> str:
        return full_name(self.component, self.path)

    @property
    def rank(self) -> int:
        return int(self.b.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.b.shape[0]), int(self.a.shape[1])

    def delta(self) -> np.ndarray:
        """Dense ΔW (tests and small modules only)."""
        return self.scale * (numbers(self.b).astype(np.float64) @ numbers(self.a).astype(np.float64))


def numbers(t: np.ndarray) -> np.ndarray:
    """A factor's values: stored bf16 bits widened to float32 (exact), any other array as it is."""
    return decode(t)


def same_values(x: np.ndarray, y: np.ndarray) -> bool:
    """Same shape and equal values (``torch.equal``: across dtypes, −0 = 0, NaN ≠ NaN)."""
    return x.shape == y.shape and bool(np.array_equal(decode(x), decode(y)))


def times(t: np.ndarray, f: float) -> np.ndarray:
    """``f·t`` computed in float64 (``t`` itself when f = 1, so stored factors stay untouched)."""
    return t if f == 1.0 else decode(t).astype(np.float64) * f


@dataclass
class Canon:
    """A whole adapter in canonical form."""

    modules: list[CanonModule]
    naming: Naming  # how the source named its modules (its layout's; a merge's modules are named as diffusers)
    base_model: str | None = None
    fan_in_fan_out: bool = False
    config: dict | None = None  # the source PEFT config (task_type, target_modules …), if any
    extras: list[str] = field(default_factory=list)  # full tensors of the source (modules_to_save …)
    notes: list[str] = field(default_factory=list)

    def components(self) -> set[str | None]:
        return {m.component for m in self.modules}


def _factors(m: "Module", native: bool) -> tuple[np.ndarray, np.ndarray]:
    """(B, A): for a plain pair read natively, in the stored dtype (no arithmetic on read; bf16 widened to
    float32 and narrowed back, both exact, to its :data:`~lora_inspect.arrays.BF16` bits); float64 otherwise."""
    from ..adapter import LowRankUpdate

    u = m.update
    if not (native and isinstance(u, LowRankUpdate) and u.e_key is None):
        return m.factors(np.dtype(np.float64))
    stored = {m.source.info(k).dtype for k in (u.a_key, u.b_key)}
    st = stored.pop() if len(stored) == 1 else None
    if st not in _NATIVE:
        return m.factors(np.dtype(np.float64))
    if st == "BF16":  # the update's own reading (a GGUF's Q/K rows un-permuted …), then its bits again
        b, a = m.factors(np.dtype(np.float32))
        return encode(b, "BF16"), encode(a, "BF16")
    return m.factors(NUMPY_OF[st])


def _module(ad: "Adapter", layout: Layout, m: "Module", native: bool) -> CanonModule:
    if m.bias_key is not None:
        raise InspectError(f"{ad.path}: module {m.name!r} has a LoRA bias (lora_bias): convert and merge do not carry "
                           "it yet")
    b, a = _factors(m, native)
    comp, path = layout.canonical_name(m)  # one model (PEFT, mlx-lm): GPT-2's "transformer.h.0…" is a path
    stored_a = m.source.tensors.get(m.a_key)  # LoHa/LoKr: no A is stored (a 4-D Conv2d LoRA is written)
    ndim = len(stored_a.shape) if m.kind == Kind.CONV and stored_a is not None else 4
    rs = bool(ad.use_rslora)
    return CanonModule(comp, path, m.kind, b, a, float(m.scale), m.kernel, ndim, m.magnitude(), m.name,
                       float(m.alpha), rs, m.algo)


def from_adapter(ad: "Adapter", native: bool = False, finite: bool = True) -> Canon:
    """Read every module's factors into the canonical form: float64, or with ``native`` the stored
    dtype where no arithmetic is needed to read them. ``finite`` refuses NaN/inf factors."""
    if ad.peft_type not in (None, "LORA", "ADALORA", "LOHA", "LOKR"):
        raise InspectError(f"{ad.path}: peft_type {ad.peft_type}: only LoRA adapters are converted")
    layout = layout_of(ad)
    mods = [_module(ad, layout, m, native) for m in ad.modules]
    for m in mods if finite else []:
        if not (all_finite(numbers(m.b)) and all_finite(numbers(m.a))):
            raise InspectError(f"{ad.path}: module {m.source_name!r} holds NaN or inf")
    seen: dict[str, str] = {}
    for m in mods:
        if m.name in seen:
            raise InspectError(f"{ad.path}: modules {seen[m.name]!r} and {m.source_name!r} map to the same name "
                               f"{m.name!r}")
        seen[m.name] = m.source_name
    cfg = layout.carried_config(ad)
    fifo = bool(cfg.get("fan_in_fan_out")) if isinstance(cfg, dict) else False
    notes = []
    if ad.peft_type == "ADALORA":
        notes.append("AdaLoRA: lora_E folded into A and s = α/(r + 1e-5) kept exactly; written as plain LoRA")
    return Canon(mods, layout.naming, ad.base_model, fifo, cfg, list(ad.extras), notes)
