"""Convolution kernels that a file does not record (docs/formats.md, "LyCORIS", "Conv kernels").

A conv module is (out, in, kh, kw); :class:`~lora_inspect.adapter.Module` keeps ΔW flattened to
(out, in·kh·kw) and the kernel in ``Module.kernel``. LoCon, Tucker factors, LoKr's whole ``lokr_w2`` and
``diff`` are stored 4-D, so the file gives the kernel. LyCORIS's and PEFT's non-Tucker LoHa and LoKr store a
conv's factors flattened (``hada_w1_b (r, in·kh·kw)``, ``lokr_w2_b (r, d·kh·kw)``): the kernel is lost.
It comes back in one of two ways, else the module is ``conv?`` (:attr:`Kind.CONV_UNKNOWN`):

- **the layout's naming** (:func:`recover_kernels`): in a Stable Diffusion / SDXL UNet (component ``unet``
  or a bare diffusers UNet path; SGM names arrive here already mapped to diffusers paths) the resnets'
  ``conv1`` and ``conv2``, the ``downsamplers.0.conv`` / ``upsamplers.0.conv`` (SGM ``op`` and ``conv``),
  ``conv_in`` and ``conv_out`` are 3×3; ``conv_shortcut`` is 1×1; ``proj_in`` / ``proj_out`` are 1×1 convs
  in SD1.x and Linear layers in SD2.x and SDXL (``use_linear_projection``), so they are taken as 1×1 only
  when the file shows an SD1.x UNet and nothing of another. A kernel is taken only when it is consistent
  with the stored factors: the flattened width is a multiple of kh·kw, for LoKr W₂'s own width too
  (ΔW = kron(W₁, W₂) keeps W₂'s columns innermost), and a column-wise ``dora_scale (1, in)`` gives
  in·kh·kw = the width. A conv name that fails a check is ``conv?`` with the reason in a note.
- **the base weight** (:func:`apply_base_kernel`, ``rank --base`` and ``convert --base``): a 4-D base
  weight (out, in, kh, kw) of the same flattened shape gives the kernel of a flattened or ``conv?`` module.

Rewrites (truncate, convert, merge) write a conv with a known kernel 4-D (kohya: ``lora_down (r, in, kh,
kw)``, ``lora_up (out, r, 1, 1)``) and a ``conv?`` flattened, as stored. ``merge`` adds a flattened form
and a 4-D form of the same module (:func:`row_form`), as ComfyUI does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import InspectError
from .kinds import Algo, Kind
from .naming import names_line
from .units import plural, verb

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from .adapter import Module
    from .convert.canon import CanonModule

__all__ = ["named_kernel", "recover_kernels", "apply_base_kernel", "row_form", "is_flattened", "kernel_text",
           "PROJECTIONS", "SD1_CONTEXT"]

K3, K1 = (3, 3), (1, 1)
PROJECTIONS = ("proj_in", "proj_out")
SD1_CONTEXT = 768  # cross-attention context width of SD1.x (CLIP ViT-L); SD2.x has 1024, SDXL 2048
_TOP = {"conv_in": K3, "conv_out": K3}
_RESNET = {"conv1": K3, "conv2": K3, "conv_shortcut": K1}
_BLOCK = re.compile(r"^(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.(resnets|attentions|downsamplers|upsamplers)"
                    r"\.\d+\.(\w+)$")
_CONTEXT = re.compile(r"\.attn2\.to_[kv]$")
_SDXL = re.compile(r"(^add_embedding\.|\.transformer_blocks\.[1-9]\d*\.|^up_blocks\.0\.attentions\.)")
_FLAT_ALGOS = (Algo.LOHA, Algo.LOKR)

Named = tuple["str | None", str, "Module"]  # (component, diffusers path, module)


def kernel_text(kernel: tuple[int, int] | None) -> str:
    return "?" if kernel is None else f"{kernel[0]}×{kernel[1]}"


def named_kernel(component: str | None, path: str) -> tuple[int, int] | str | None:
    """The kernel a Stable Diffusion UNet module's path implies: (3, 3), (1, 1), ``"proj"`` (proj_in/proj_out:
    1×1 conv or Linear, by model) or None (not a conv of the UNet, or not a UNet path)."""
    if component not in (None, "unet"):
        return None
    if component is None and path.startswith("unet."):
        path = path[len("unet."):]
    if path in _TOP:
        return _TOP[path]
    m = _BLOCK.match(path)
    if m is None:
        return None
    kind, tail = m.groups()
    if kind == "resnets":
        return _RESNET.get(tail)
    if kind in ("downsamplers", "upsamplers"):
        return K3 if tail == "conv" else None
    return "proj" if tail in PROJECTIONS else None


def is_flattened(m: Module) -> bool:
    """Stored 2-D although it may be a conv: a non-Tucker LoHa, a LoKr without a 4-D factor, or ``conv?``."""
    if m.kind == Kind.CONV_UNKNOWN:
        return True
    return m.kernel is None and m.kind != Kind.EMBEDDING and m.algo in _FLAT_ALGOS


def _projection_convs(named: Sequence[Named]) -> bool | None:
    """Whether the UNet's proj_in/proj_out are 1×1 convs (SD1.x: True), Linear (SD2.x, SDXL: False), or
    None when the file shows neither or both: projections stored with their own shape (4-D or 2-D), the
    cross-attention context width (attn2.to_k/to_v in = 768 in SD1.x only), SDXL's marks."""
    conv = linear = False
    for comp, path, m in named:
        tail = path.rsplit(".", 1)[-1]
        if comp == "text_encoder_2" or (comp in (None, "unet") and _SDXL.search(path)):
            linear = True
        elif tail in PROJECTIONS and named_kernel(comp, path) == "proj" and not is_flattened(m):
            conv, linear = conv or m.kind == Kind.CONV, linear or m.kind == Kind.LINEAR
        elif _CONTEXT.search(path) and m.shape[1]:
            conv, linear = conv or m.shape[1] == SD1_CONTEXT, linear or m.shape[1] != SD1_CONTEXT
    return None if conv == linear else conv


def _misfit(m: Module, kernel: tuple[int, int]) -> str | None:
    """Why ``kernel`` does not fit the stored factors of ``m`` (None: it fits)."""
    k, width = kernel[0] * kernel[1], m.shape[1]
    if width % k:
        return f"its width {width} is not a multiple of {kernel_text(kernel)}"
    roles = getattr(m.update, "roles", {})
    w2 = roles.get("lokr_w2_b") or roles.get("lokr_w2")
    if m.algo == Algo.LOKR and w2 is not None and m.source.info(w2).shape[1] % k:
        return f"LoKr's W₂ width {m.source.info(w2).shape[1]} is not a multiple of {kernel_text(kernel)}"
    if m.magnitude_key is not None:
        sh = m.source.info(m.magnitude_key).shape
        if len(sh) >= 2 and sh[0] == 1 != m.shape[0] and sh[1] * k != width:
            return f"its column-wise dora_scale gives in = {sh[1]}, not {width // k}"
    return None


def _decide(comp: str | None, path: str, m: Module, proj: bool | None) -> str | None:
    """Give ``m`` its kernel from its name (or mark it ``conv?``); the reason when it stays unknown."""
    rule = named_kernel(comp, path)
    if rule is None:
        return None
    if rule == "proj":
        if proj is False:
            return None  # SD2.x / SDXL: a Linear layer
        if proj is None:
            m.kind = Kind.CONV_UNKNOWN
            return "proj_in/proj_out are 1×1 convs in SD1.x and Linear in SD2.x/SDXL; the file does not say which"
        rule = K1
    assert isinstance(rule, tuple)
    why = _misfit(m, rule)
    if why is not None:
        m.kind = Kind.CONV_UNKNOWN
        return f"named as a {kernel_text(rule)} conv but {why}"
    m.kind, m.kernel = Kind.CONV, rule
    return None


def recover_kernels(modules: Sequence[Module], canonical: Callable[[Module], tuple[str | None, str]]) -> list[str]:
    """Give the flattened convs of ``modules`` their kernels from their names (``canonical``: the layout's
    ``canonical_name``); mark the others that are named as convs ``conv?``. Returns the notes to show."""
    named: list[Named] = []
    for m in modules:
        try:
            comp, path = canonical(m)
        except InspectError:
            continue  # a name the layout cannot map (lycoris_…): nothing known about it
        named.append((comp, path, m))
    proj = _projection_convs(named)
    got: Counter[str] = Counter()
    unknown: list[tuple[str, str]] = []
    for comp, path, m in named:
        if m.update.needs_base:  # OFT/BOFT/(IA)³: the base weight gives shape and kernel
            if m.kind == Kind.LINEAR and isinstance(named_kernel(comp, path), tuple) \
                    and getattr(m.update, "conv_hint", None) is None:
                m.kind = Kind.CONV_UNKNOWN
            continue
        if not is_flattened(m) or m.kind == Kind.CONV_UNKNOWN:
            continue
        why = _decide(comp, path, m, proj)
        if why is not None:
            unknown.append((m.name, why))
        elif m.kernel is not None:
            got[kernel_text(m.kernel)] += 1
    return _notes(got, unknown)


def _notes(got: Counter[str], unknown: list[tuple[str, str]]) -> list[str]:
    notes = []
    if got:
        n = sum(got.values())
        kinds = ", ".join(f"{k} ×{v}" for k, v in sorted(got.items()))
        notes.append(f"{plural(n, 'conv')} {verb(n, 'stores')} LoHa/LoKr factors flattened (r, in·kh·kw): kernel from "
                     f"the UNet {'name' if n == 1 else 'names'} ({kinds}), written 4-D by truncate, convert and merge")
    if unknown:
        n, first = len(unknown), unknown[0]
        names = names_line([u[0] for u in unknown])
        notes.append(f"{plural(n, 'conv')} {verb(n, 'has')} an unknown kernel (conv?): {names} ({first[0]}: {first[1]}); "
                     "written flattened (r, in·kh·kw) as stored, which ComfyUI reads and other loaders may refuse; "
                     "--base (rank, convert) takes the kernel from the base weight")
    return notes


def apply_base_kernel(m: Module, base_shape: Sequence[int], where: Path | str, key: str) -> None:
    """A flattened or ``conv?`` module of the same flattened shape as a 4-D base weight (out, in, kh, kw) takes
    its kernel; a known kernel that differs from the base's is refused (adapter and base do not match)."""
    if len(base_shape) != 4 or m.kind == Kind.EMBEDDING:
        return
    kernel = (int(base_shape[2]), int(base_shape[3]))
    if m.kernel is not None and m.kernel != kernel:
        raise InspectError(f"{where}: module {m.name!r}: the adapter's kernel is {kernel_text(m.kernel)}, base weight "
                           f"{key!r} has {kernel_text(kernel)} (adapter and base do not match)")
    flat = (int(base_shape[0]), math.prod(int(d) for d in base_shape[1:]))
    if m.kernel is None and is_flattened(m) and tuple(m.shape) == flat:
        m.kind, m.kernel = Kind.CONV, kernel


def _addable(m: CanonModule, ref: CanonModule) -> bool:
    """``m`` is another form of ``ref``'s module with the same flattened ΔW: a flattened form (a LoHa/LoKr stored
    2-D, or ``conv?``) of the conv ``ref``; or, when no kernel is known, a 2-D form (linear or ``conv?``)."""
    if m.shape != ref.shape:
        return False
    if ref.kernel is not None:
        return m.kind == Kind.CONV_UNKNOWN or (m.kernel is None and m.algo in _FLAT_ALGOS)
    return {m.kind, ref.kind} <= {Kind.LINEAR, Kind.CONV_UNKNOWN}


def _form(m: CanonModule) -> str:
    return f"{m.kind} {kernel_text(m.kernel)}" if m.kind == Kind.CONV else str(m.kind)


def row_form(key: str, present: Sequence[tuple[int, CanonModule]], paths: Sequence[Path]) -> CanonModule:
    """The module whose kind and kernel the sum of one merge row takes: a conv with a known kernel when one
    is there (its flattened forms are added to it), else a module stored 2-D as linear, else the first; a row
    that cannot be added is refused in one line."""
    ref_i, ref = next(((i, m) for i, m in present if m.kernel is not None),
                      next(((i, m) for i, m in present if m.kind == Kind.LINEAR), present[0]))
    for i, m in present:
        if (m.shape, m.kind, m.kernel) != (ref.shape, ref.kind, ref.kernel) and not _addable(m, ref):
            raise InspectError(f"module {key!r}: {paths[ref_i]} has ΔW {ref.shape} ({_form(ref)}) but {paths[i]} "
                               f"has {m.shape} ({_form(m)}); they cannot be added")
    return ref
