"""XLabs Flux LoRAs (XLabs-AI/x-flux): converted as the BFL Flux weights they adapt; a rewrite keeps XLabs' keys.

Keys: the state dicts of x-flux's attention processors (``src/flux/modules/layers.py ·
DoubleStreamBlockLoraProcessor``, ``SingleStreamBlockLoraProcessor``), optionally under ComfyUI's
``diffusion_model.``: ``double_blocks.N.processor.{qkv_lora1,proj_lora1,qkv_lora2,proj_lora2}.{down,up}.weight``
and ``single_blocks.N.processor.{qkv_lora,proj_lora}.{down,up}.weight``; ``down`` is (r, in), ``up`` (out, r).

- **Scale 1, no α.** ``LoRALinearLayer.forward`` returns up(down(x)) and multiplies by network_alpha/rank
  only when a network_alpha is given; x-flux's loader (``src/flux/xflux_pipeline.py ·
  XFluxPipeline.update_model_with_lora``) builds the processors without one (its ``lora_weight`` is a
  strength chosen at load time, not stored), and diffusers loads these files with ``alphas=None``
  (``loaders/lora_pipeline.py · FluxLoraLoaderMixin.lora_state_dict``: "xlabs doesn't use `alpha`").
  So ΔW = up·down.
- **Which weight each adds to** (the processors' ``forward``; diffusers'
  ``loaders/lora_conversion_utils.py · _convert_xlabs_flux_lora_to_diffusers`` maps them the same way):
  ``qkv_lora1`` → ``img_attn.qkv`` (diffusers ``attn.to_q/to_k/to_v``: up cut into three equal row blocks, down
  shared), ``proj_lora1`` → ``img_attn.proj`` (``attn.to_out.0``), ``qkv_lora2`` → ``txt_attn.qkv``
  (``attn.add_q/k/v_proj``), ``proj_lora2`` → ``txt_attn.proj`` (``attn.to_add_out``); in single blocks
  ``proj_lora`` → ``linear2`` (``proj_out``) and ``qkv_lora`` → the first 3h output rows of ``linear1``
  (``qkv, mlp = split(linear1(x), [3h, mlp])``, then ``qkv + qkv_lora(x)``; diffusers ``attn.to_q/to_k/to_v``).

Modules keep XLabs' names (``double_blocks.0.processor.qkv_lora1``, without ComfyUI's prefix) and the
adapter its own format, ``xlabs``; :meth:`XLabsLayout.canonical_name` gives each the name of the BFL weight as
a kohya file has it (``unet``, ``double.blocks.0.img.attn.qkv``) with kohya's naming, so ``convert`` and
``merge`` treat them as a kohya Flux file's modules: split to diffusers names, written as kohya. A single-block
``qkv_lora`` is a LoRA on ``linear1`` whose up has zero rows for the MLP part (of height proj_lora's input − h,
else :data:`MLP_RATIO`·h): exactly what x-flux adds to ``linear1``'s output. Every module must be 2-D, a qkv's
up must have 3·in rows, and nothing else may be in the file; each refusal is one line naming the key.

Rewrites (``truncate``, ``rescale --bake``) write the same keys: one rank for every module (x-flux builds every
processor with the rank of the first ``.down.weight``, ``util.py · get_lora_rank``, and loads strictly), no
module dropped; ``rescale`` without ``--bake`` is refused, there being no α to scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..adapter import Adapter, LowRankUpdate, Module
from ..errors import InspectError
from ..orientation import PEFT, Orientation, Shapes
from ..units import plural
from .common import build_module
from .kohya import KohyaNaming, finish
from .layout import AlphaHome, Capabilities, Format, Found, Layout
from .tensors import TensorSource

__all__ = ["XLabsLayout", "XLabsFormat", "looks_like_xlabs", "xlabs_module", "bfl_weight", "MLP_RATIO"]

MLP_RATIO = 4  # BFL Flux.1 mlp_ratio = 4.0 (x-flux: proj_lora's input 15360 = 3072 + 4·3072)
_DETECT = re.compile(r"^(?:diffusion_model\.)?(?:double|single)_blocks\.\d+\.processor\.")
_KEY = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)\.(down|up)\.weight$")
_TARGETS = {"double_blocks": {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
                              "qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj"},
            "single_blocks": {"qkv_lora": "linear1", "proj_lora": "linear2"}}
_GRAMMAR = ("expected double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight or "
            "single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight")


class XLabsFormat(Format):
    XLABS = "xlabs"


def looks_like_xlabs(keys: list[str]) -> bool:
    """Any key under a Flux block's ``processor.`` (x-flux's processor state dicts)."""
    return any(_DETECT.match(k) for k in keys)


def xlabs_module(key: str) -> str | None:
    """An XLabs key → its module (``double_blocks.0.processor.qkv_lora1``, prefix dropped); None if it is not one."""
    mt = _KEY.match(key)
    if mt is None or mt.group(3) not in _TARGETS[mt.group(1)]:
        return None
    return f"{mt.group(1)}.{int(mt.group(2))}.processor.{mt.group(3)}"


def bfl_weight(module: str) -> str:
    """An XLabs module → the BFL weight it adds to (``double_blocks.0.img_attn.qkv``)."""
    blocks, n, _, proc = module.split(".")
    return f"{blocks}.{n}.{_TARGETS[blocks][proc]}"


def _is_linear1(module: str) -> bool:
    return module.startswith("single_blocks.") and module.endswith(".qkv_lora")


@dataclass(frozen=True)
class _Rows(Orientation):
    """XLabs' pair (down (r, in), up (out, r)) on the first ``out`` rows of a weight ``pad`` rows taller:
    linear up = [up; 0]. A rewrite stores the first ``out`` rows back (the rest must be zero)."""

    pad: int = 0
    name = PEFT.name  # stored as PEFT's linear pair; only the rows differ

    def shapes(self, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> Shapes:
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InspectError(f"module {module!r}: XLabs factors must be 2-D, found {a_shape} (down) and "
                               f"{b_shape} (up)")
        sh = PEFT.shapes(module, a_shape, b_shape)
        return replace(sh, out=sh.out + self.pad)

    def to_linear(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.pad:
            return b, a
        return np.concatenate([b, np.zeros((self.pad, b.shape[1]), dtype=b.dtype)]), a

    def to_stored(self, b_lin: np.ndarray, a_lin: np.ndarray, a_shape: tuple[int, ...],
                  b_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        rows = b_shape[0]
        if self.pad and bool(b_lin[rows:].any()):
            raise InspectError(f"an XLabs qkv_lora covers the first {plural(rows, 'row')} of linear1 only; the rewritten "
                               "update reaches the MLP rows")
        return a_lin, b_lin[:rows]


@dataclass
class _XLabsUpdate(LowRankUpdate):
    """ΔW = [up; 0]·down: the parameters stored are r·(out − pad + in)."""

    pad: int = 0

    def params(self, shape: tuple[int, int]) -> int:
        return self.rank * (shape[0] - self.pad + shape[1])

    def decomposition(self, source: TensorSource, dtype: np.dtype | type, scale: float) -> Any:
        """As :class:`LowRankUpdate`'s; NaN/inf refused naming the XLabs key (``truncate`` adds file and module)."""
        from ..spectrum import all_finite

        bad = next((k for k in (self.a_key, self.b_key) if not all_finite(source.get(k))), None)
        if bad is not None:
            raise InspectError(f"{bad!r} holds NaN or inf: refusing to rewrite a corrupt adapter")
        return super().decomposition(source, dtype, scale)


def _group(source: TensorSource) -> dict[str, dict[str, str]]:
    """{module: {"A": down key, "B": up key}}; one line for any key that is not XLabs'."""
    groups: dict[str, dict[str, str]] = {}
    for key in source.tensors:
        name = xlabs_module(key)
        if name is None:
            raise InspectError(f"{key!r}: not an XLabs Flux LoRA key ({_GRAMMAR})")
        role = "A" if key.endswith(".down.weight") else "B"
        roles = groups.setdefault(name, {})
        if role in roles:
            raise InspectError(f"{key!r} and {roles[role]!r}: two {'down' if role == 'A' else 'up'} tensors for "
                               f"the same module ({name})")
        roles[role] = key
    return groups


def _build(name: str, roles: dict[str, str], source: TensorSource, pad: int) -> Module:
    mod, _ = build_module(name, roles, source, orient=_Rows(pad))
    mod.update = _XLabsUpdate(roles["A"], roles["B"], mod.rank, _Rows(pad), pad=pad)
    if ".processor.qkv_lora" in name and mod.shape[0] - pad != 3 * mod.shape[1]:
        raise InspectError(f"{roles['B']!r}: up has {plural(mod.shape[0] - pad, 'row')}, not 3 × {mod.shape[1]} (q, k, v of a "
                           f"Flux block whose input width is {mod.shape[1]})")
    return mod


def _mlp_rows(qkv: Module, proj: Module | None) -> int | None:
    """The height of linear1's MLP part: proj_lora's (linear2's) input − h; None when there is no proj_lora."""
    if proj is None:
        return None
    h = qkv.shape[1]
    if proj.shape[0] != h or proj.shape[1] <= h:
        raise InspectError(f"{proj.a_key!r}: proj_lora is {proj.shape[0]}×{proj.shape[1]}, but the block's "
                           f"qkv_lora has input width {h}: expected {h} × ({h} + the MLP width)")
    return proj.shape[1] - h


class XLabsLayout(KohyaNaming, Layout):
    name = "xlabs"
    label = "XLabs"
    formats: tuple[Format, ...] = (XLabsFormat.XLABS,)
    caps = Capabilities(per_module_rank=False, per_module_alpha=False, dora=False, conv=False, embeddings=False,
                        alpha=AlphaHome.NONE)
    writes_as = "kohya"  # not a convert target: convert and merge write its modules as a kohya Flux file

    def matches(self, keys: list[str], found: Found) -> bool:
        return looks_like_xlabs(keys)

    def read(self, source: TensorSource, found: Found) -> Adapter:
        groups = _group(source)
        mods = {name: _build(name, roles, source, 0) for name, roles in groups.items()}
        assumed = []
        for name in [n for n in mods if _is_linear1(n)]:
            rows = _mlp_rows(mods[name], mods.get(name.removesuffix("qkv_lora") + "proj_lora"))
            if rows is None:
                rows = MLP_RATIO * mods[name].shape[1]
                assumed.append(name)
            mods[name] = _build(name, groups[name], source, rows)
        notes = ["XLabs Flux LoRA (no alpha: scale 1), converted as the kohya Flux modules it adapts: qkv_lora1 → "
                 "img_attn.qkv, proj_lora1 → img_attn.proj, qkv_lora2/proj_lora2 → txt_attn.qkv/proj; single blocks "
                 "qkv_lora → linear1, proj_lora → linear2"]
        if any(_is_linear1(n) for n in mods):
            notes.append("single-block qkv_lora adds to linear1's q/k/v rows only: read as linear1 with zero MLP "
                         "rows of up (its shape is linear1's)")
        if assumed:
            notes.append(f"MLP width of {', '.join(assumed[:3])}{' …' if len(assumed) > 3 else ''} taken as "
                         f"{MLP_RATIO}·hidden (no proj_lora in that block; Flux.1's mlp_ratio)")
        return finish(found.shown, XLabsFormat.XLABS, source, list(mods.values()), [], notes)

    def canonical_name(self, m: Module) -> tuple[str | None, str]:
        """The BFL weight's name as a kohya Flux file has it: (``unet``, ``double.blocks.0.img.attn.qkv``)."""
        from ..convert.names import kohya_to_dotted

        return kohya_to_dotted("lora_unet_" + bfl_weight(m.name).replace(".", "_"))
