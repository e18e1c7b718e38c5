"""The typed vocabularies every layer shares: what a module is (:class:`Kind`) and which update
type stores it (:class:`Algo`).

They are ``str``-valued enums (:class:`Choice`): a member *is* its string, so JSON output, f-strings,
``str()`` and comparisons with plain strings read exactly as the bare strings did, while mypy checks
every name that the code spells. A layout's format strings are the same kind of enum, one per layout
(:class:`lora_inspect.formats.layout.Format`), and so are the orientations
(:class:`lora_inspect.orientation.OrientName`).
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Choice", "Kind", "Algo"]


class Choice(str, Enum):
    """A ``str`` enum whose ``str()`` and ``format()`` are its value on every Python version (the
    behaviour of 3.11's ``StrEnum``; the project still supports 3.10). Subclass it with members; a
    subclass without members can be subclassed again (:class:`~lora_inspect.formats.layout.Format`)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class Kind(Choice):
    """The base layer a module adapts, which fixes how ΔW is laid out (see :mod:`lora_inspect.adapter`)."""

    LINEAR = "linear"
    CONV = "conv"  # a k×k (or k×1) convolution, flattened to (out, in·kh·kw)
    CONV_UNKNOWN = "conv?"  # a convolution whose kernel neither the file nor --base gives (ΔW flattened, kh·kw unknown)
    EMBEDDING = "embedding"  # ΔW (num_embeddings, dim)


class Algo(Choice):
    """The update type a module's ΔW is stored as (:class:`lora_inspect.adapter.Update`)."""

    LORA = "lora"  # B·A
    LOCON = "locon"  # LyCORIS LoCon with a Tucker core
    LOHA = "loha"  # Hadamard product of two low-rank products
    LOKR = "lokr"  # Kronecker product
    FULL = "full"  # the dense ΔW itself
    OFT = "oft"  # LyCORIS Diag-OFT: W′ = blockdiag(R)ᵀ·W, its ΔW needs the base weight (formats/lycoris_base.py)
    BOFT = "boft"  # LyCORIS butterfly OFT: a product of permuted block-diagonal rotations of W
    IA3 = "ia3"  # (IA)³: W scaled per output row (or input column)
