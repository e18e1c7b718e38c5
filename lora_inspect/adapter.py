"""The in-memory model of an adapter, the same for every layout.

A :class:`Module` is one low-rank update ΔW = scale · B @ A in *linear orientation*:

- ``B`` is (out, r) and ``A`` is (r, in), so ``shape == (out, in)``;
- a k×k convolution is flattened: A is (r, in·kh·kw) and ΔW is (out, in·kh·kw);
- an embedding's ΔW has the embedding weight's orientation (num_embeddings, dim): PEFT stores
  ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r) and applies s·(B@A)ᵀ, so here
  B = Aᵀ_stored and A = Bᵀ_stored;
- GPT-2 ``Conv1D`` (``fan_in_fan_out``) keeps PEFT's (r, in) / (out, r) factors; the base weight is
  stored (in, out) and receives ΔWᵀ, which does not change the spectrum;
- mlx-lm stores ``lora_a`` (in, r) and ``lora_b`` (r, out): both are transposed here;
- AdaLoRA's ``lora_E`` (r, 1) is folded into A (``A ⊙ E``).

How the pair is stored is an :class:`~lora_inspect.orientation.Orientation` (one class per
orientation); what the update *is* is an :class:`Update`: :class:`LowRankUpdate` (B·A) here, and
LyCORIS's LoCon, LoHa (Hadamard product), LoKr (Kronecker product) and full-matrix updates in
:mod:`lora_inspect.formats.lycoris_updates` — one subclass each, with its keys, parameter count and
dense ΔW; :meth:`Module.factors` stays the low-rank route that the spectra use.

Tensor data stays on disk until :meth:`Module.factors` is called; everything else (names, shapes,
dtypes, sizes) comes from the file header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import InspectError
from .kinds import Algo, Kind
from .naming import natural_sorted
from .orientation import PEFT, Orientation, OrientName

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .formats.layout import Format, Layout
    from .formats.tensors import TensorInfo, TensorSource

# numpy is imported where tensor data is touched: header-only commands (info, check) stay light.

__all__ = ["require_mergeable", "Module", "Adapter", "Update", "LowRankUpdate", "module_type", "module_layer"]


class Update:
    """How a module's ΔW is stored: the seam where other update types (LoHa's Hadamard product,
    LoKr's Kronecker product; ``formats/lycoris_updates.py``) plug in as one class each. Every update
    knows its tensor keys, its rank and parameter count, and how to produce the dense ΔW (unscaled).

    The spectra (``analysis.compute_spectra``) and truncations (``rewrite.truncate``) dispatch on two
    methods: :meth:`singular_values` returns the exact spectrum directly (LoKr's products, a dense
    SVD) or None, meaning "use the low-rank factor route on :meth:`factors`"; :meth:`decomposition`
    returns what a truncation cuts (by default the QR/core-SVD of :meth:`factors`)."""

    rank: int
    algo: Algo = Algo.LORA
    # ΔW is a function of the base weight W (LyCORIS OFT, BOFT, (IA)³: formats/lycoris_base.py): no spectrum, factors
    # or dense ΔW until --base binds W to it
    needs_base: ClassVar[bool] = False

    @property
    def keys(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def params(self, shape: tuple[int, int]) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def dense(self, source: "TensorSource", dtype: "np.dtype | type") -> "np.ndarray":  # pragma: no cover
        raise NotImplementedError

    def factors(self, source: "TensorSource", dtype: "np.dtype | type") -> tuple["np.ndarray", "np.ndarray"]:
        """(B, A) with B@A = the unscaled ΔW exactly (the low-rank route)."""
        raise InspectError(f"{type(self).__name__}: no low-rank factor pair")  # pragma: no cover

    def singular_values(self, source: "TensorSource", dtype: "np.dtype | type", scale: float) -> Any:
        """The exact spectrum of scale·ΔW (numpy, descending) when it is not taken from :meth:`factors`;
        None for the factor route. Raises ValueError on NaN/inf."""
        return None

    def decomposition(self, source: "TensorSource", dtype: "np.dtype | type", scale: float) -> Any:
        """What a truncation cuts: an object with ``s`` (descending σ, numpy) and ``factors(keep, stored)``
        (``spectrum.Decomposition``'s interface). Raises ValueError on NaN/inf."""
        from .spectrum import all_finite, decompose

        b, a = self.factors(source, dtype)
        if not (all_finite(b) and all_finite(a)):
            raise ValueError("non-finite factors")
        return decompose(b, a, scale)

    @property
    def bake_key(self) -> str:
        """The stored tensor ΔW is linear in (a rescale without α multiplies it)."""
        raise NotImplementedError  # pragma: no cover

    def lora_keys(self) -> tuple[str, str]:
        """(A key, B key) that a LoRA rewrite of this module writes."""
        raise NotImplementedError  # pragma: no cover


@dataclass
class LowRankUpdate(Update):
    """ΔW = B @ A (before the module's scale) from a stored pair in some :class:`Orientation`;
    AdaLoRA's ``lora_E`` (r, 1) is folded into A (``A ⊙ E``)."""

    a_key: str
    b_key: str
    rank: int
    orient: Orientation = PEFT
    e_key: str | None = None

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.a_key, self.b_key, self.e_key) if k]

    def params(self, shape: tuple[int, int]) -> int:
        """r·(out + in)."""
        return self.rank * (shape[0] + shape[1])

    def factors(self, source: "TensorSource", dtype: "np.dtype | type") -> tuple[np.ndarray, np.ndarray]:
        b, a = self.orient.to_linear(source.get(self.a_key).astype(dtype), source.get(self.b_key).astype(dtype))
        if self.e_key is not None:
            a = a * source.get(self.e_key).astype(dtype).reshape(-1, 1)
        return b, a

    def dense(self, source: "TensorSource", dtype: "np.dtype | type") -> "np.ndarray":
        b, a = self.factors(source, dtype)
        return b @ a

    @property
    def bake_key(self) -> str:
        return self.b_key

    def lora_keys(self) -> tuple[str, str]:
        return self.a_key, self.b_key


@dataclass
class Module:
    """One adapted module: ΔW = scale · (its update), in linear orientation (out, in)."""

    name: str
    kind: Kind
    shape: tuple[int, int]  # ΔW (out, in), conv flattened to in·kh·kw; 0 where only the base weight knows it (OFT …)
    rank: int
    alpha: float
    scale: float
    update: Update
    source: "TensorSource" = field(repr=False)
    kernel: tuple[int, int] | None = None  # (kh, kw) for conv
    magnitude_key: str | None = None  # DoRA lora_magnitude_vector / mlx ".m"
    bias_key: str | None = None  # lora_B.bias (lora_bias=True)
    alpha_key: str | None = None  # kohya/diffusers per-module ".alpha" tensor
    dtype: str = "F32"

    @property
    def low_rank(self) -> LowRankUpdate:
        """The low-rank pair; an InspectError for other update types."""
        if not isinstance(self.update, LowRankUpdate):
            raise InspectError(f"module {self.name!r}: its update is not a low-rank B·A pair")
        return self.update

    @property
    def a_key(self) -> str:
        """A's key (for other update types: the key a LoRA rewrite writes A under)."""
        return self.update.lora_keys()[0]

    @property
    def b_key(self) -> str:
        """B's key (for other update types: the key a LoRA rewrite writes B under)."""
        return self.update.lora_keys()[1]

    @property
    def algo(self) -> Algo:
        """The update's algorithm: ``lora``, ``locon``, ``loha``, ``lokr``, ``full``."""
        return self.update.algo

    @property
    def e_key(self) -> str | None:
        return self.low_rank.e_key

    @property
    def orient(self) -> OrientName:
        return self.low_rank.orient.name

    @property
    def params(self) -> int:
        """Parameters in the update (low-rank: r·(out + in))."""
        return self.update.params(self.shape)

    @property
    def keys(self) -> list[str]:
        """Every tensor key that belongs to this module."""
        return self.update.keys + [k for k in (self.magnitude_key, self.bias_key, self.alpha_key) if k]

    @property
    def nbytes(self) -> int:
        """Bytes of this module's tensors as stored."""
        return sum(self.source.info(k).nbytes for k in self.keys)

    @property
    def is_dora(self) -> bool:
        return self.magnitude_key is not None

    def factors(self, dtype: "np.dtype | type | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Read (B, A) in linear orientation, *unscaled*: ΔW = self.scale · B @ A (float64 by default)."""
        import numpy as np

        return self.update.factors(self.source, dtype or np.float64)

    def delta(self, dtype: "np.dtype | type | None" = None) -> np.ndarray:
        """The dense ΔW (out, in) — for tests and small models only."""
        import numpy as np

        return self.scale * self.update.dense(self.source, dtype or np.float64)

    def magnitude(self) -> np.ndarray | None:
        if self.magnitude_key is None:
            return None
        return self.source.get(self.magnitude_key).astype("f8").reshape(-1)

    def bias(self) -> np.ndarray | None:
        if self.bias_key is None:
            return None
        return self.source.get(self.bias_key).astype("f8")


@dataclass
class Adapter:
    """A whole adapter: its layout, global settings, low-rank modules and full tensors."""

    path: Path  # what the user named (directory or file)
    # a member of the reading layout's own Format enum (its ``formats``; PEFT LoHa/LoKr report PEFT's), shown
    # in JSON as its value: "peft", "peft-safetensors", "peft-bin", "kohya", "lycoris", "mlx", "gguf" …
    format: "Format"
    weights_path: Path
    source: "TensorSource" = field(repr=False)
    modules: list[Module] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)  # keys of full (non-low-rank) tensors
    config: dict[str, Any] | None = None  # adapter_config.json as read
    config_path: Path | None = None
    peft_type: str | None = None
    r: int | None = None  # global rank (config), else the most common module rank
    alpha: float | None = None  # global alpha, None when unknown
    use_rslora: bool = False
    use_dora: bool = False
    base_model: str | None = None
    target_modules: Any = None
    notes: list[str] = field(default_factory=list)  # things the user should know (assumptions made)
    layout: "Layout | None" = field(default=None, repr=False)  # the reader that made it (and writes it back)
    _index: dict[str, Module] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # one order for every listing (tables, JSON, rewrites): layer order, layer 2 before layer 10
        self.modules = natural_sorted(self.modules, key=lambda m: m.name)

    @property
    def metadata(self) -> dict[str, str]:
        return self.source.metadata

    @property
    def tensors(self) -> dict[str, "TensorInfo"]:
        return self.source.tensors

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def extra_params(self) -> int:
        return sum(self.source.info(k).numel for k in self.extras)

    @property
    def extra_bytes(self) -> int:
        return sum(self.source.info(k).nbytes for k in self.extras)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.source.tensors.values())

    @property
    def file_bytes(self) -> int:
        return self.weights_path.stat().st_size

    def module(self, name: str) -> Module:
        """The module called ``name`` (a dict lookup: callers loop over modules)."""
        if self._index is None or len(self._index) != len(self.modules):
            self._index = {m.name: m for m in self.modules}
        return self._index[name]

    def dtypes(self) -> dict[str, int]:
        """Number of tensors per stored dtype."""
        out: dict[str, int] = {}
        for t in self.source.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + 1
        return dict(sorted(out.items()))


_NUM = re.compile(r"^\d+$")


def module_type(name: str) -> str:
    """The module's type for breakdowns: ``q_proj``, ``to_out.0``, ``attn1_to_q`` …

    PEFT names: the last path component (two when the last is an index, as in ``to_out.0``).
    kohya names (underscores only): the tokens after the last numeric token.
    """
    if "." in name:
        parts = name.split(".")
        if _NUM.match(parts[-1]) and len(parts) > 1:
            return ".".join(parts[-2:])
        return parts[-1]
    toks = name.split("_")
    idx = [i for i, t in enumerate(toks) if _NUM.match(t)]
    if idx and idx[-1] < len(toks) - 1:
        return "_".join(toks[idx[-1] + 1 :])
    return name


def module_layer(name: str) -> str:
    """The container a module lives in, for per-layer breakdowns (``model.layers.3``)."""
    t = module_type(name)
    rest = name[: len(name) - len(t)].rstrip("._")
    # for decoder LMs keep only "...layers.N" (drop self_attn / mlp)
    m = re.match(r"^(.*?(?:layers|h|blocks|layer)[._]\d+)", rest)
    return m.group(1) if m else (rest or "(root)")


def require_mergeable(ad: Adapter, where: object, who: str) -> None:
    """One line unless every module's update is W + s·ΔW alone (what ``verify`` applies): DoRA
    renormalises rows to its magnitude, and full tensors replace weights outright."""
    if ad.use_dora or any(m.is_dora for m in ad.modules):
        raise InspectError(f"{where}: DoRA adapters are not applied by {who} (W + ΔW would ignore the magnitude)")
    if ad.extras:
        raise InspectError(f"{where}: holds full tensors ({ad.extras[0]}…) that {who} cannot apply; "
                           "only low-rank modules")
    if not ad.modules:
        raise InspectError(f"{where}: no LoRA modules")
