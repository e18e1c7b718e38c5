"""Stable Diffusion UNet names: SGM (original / compvis / ``ldm``) blocks ↔ diffusers blocks.

sd-scripts trains SDXL on its own SGM-named UNet, so every SDXL kohya LoRA it writes is named
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; SD1.x/2.x files from sd-scripts use
diffusers names (``lora_unet_down_blocks_1_attentions_0_…``). The canonical form is the diffusers path.

The map (docs/formats.md, "SGM UNet names"), with ``layers_per_block`` = 2 as in SD1.x, SD2.x and SDXL,
mirrors ``diffusers · src/diffusers/loaders/lora_conversion_utils.py · _maybe_map_sgm_blocks_to_diffusers``
and ``_convert_unet_lora_key``:

- ``input_blocks.0.0`` → ``conv_in``; ``out.2`` → ``conv_out``; ``time_embed.0/2`` →
  ``time_embedding.linear_1/2``; ``label_emb.0.0/0.2`` → ``add_embedding.linear_1/2``.
- ``input_blocks.i.0`` → ``down_blocks.{(i−1)//3}.resnets.{(i−1)%3}``, ``input_blocks.i.1`` →
  ``….attentions.{(i−1)%3}``, ``input_blocks.{3j+3}.0.op`` → ``down_blocks.j.downsamplers.0.conv``.
- ``middle_block.0/1/2`` → ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``.
- ``output_blocks.i.0`` → ``up_blocks.{i//3}.resnets.{i%3}``, ``output_blocks.i.1`` → ``….attentions.{i%3}``,
  the upsampler ``conv`` of up block j sits in ``output_blocks.{3j+2}`` at position 2 when that block has
  attentions and at position 1 when it has none (SD1.x/2.x ``up_blocks.0``).
- Resnet inner names: ``in_layers.2`` → ``conv1``, ``out_layers.3`` → ``conv2``, ``emb_layers.1`` →
  ``time_emb_proj``, ``skip_connection`` → ``conv_shortcut``; attention inner names are the same in both.

Reading SGM names needs no layout: the module name itself tells an upsampler (``conv``) from an
attention block. Writing them does for one module only, the upsampler of ``up_blocks.0``: it has
attentions in SDXL (3 levels; ``output_blocks.2.2.conv``) but not in SD1.x/2.x (4 levels, nor the SDXL
refiner; ``output_blocks.2.1.conv``). :func:`up0_has_attention` decides from the modules present.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..errors import InspectError

__all__ = ["SGM_HEADS", "is_sgm", "sgm_to_diffusers", "diffusers_to_sgm", "up0_has_attention", "sdxl_family",
           "is_sgm_kohya"]

LPB = 2  # layers_per_block of SD1.x, SD2.x and SDXL: 3 SGM slots per level (2 layers + a down/upsampler)
SGM_HEADS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_TOP = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding.linear_1",
        "time_embed_2": "time_embedding.linear_2", "label_emb_0_0": "add_embedding.linear_1",
        "label_emb_0_2": "add_embedding.linear_2"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
           "skip_connection": "conv_shortcut"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_MID = re.compile(r"^middle_block_(\d+)_(.+)$")


def is_sgm(rest: str) -> bool:
    """A kohya UNet name (after ``lora_unet_``) in SGM form."""
    return rest in _TOP or rest.startswith(SGM_HEADS[:3])


def is_sgm_kohya(name: str) -> bool:
    return name.startswith("lora_unet_") and is_sgm(name[len("lora_unet_"):])


def _inner(name: str, kind: str, tail: str, join: Callable[[str], str]) -> str:
    if kind == "resnets":
        if tail not in _RESNET:
            raise InspectError(f"module {name!r}: {tail!r} is not a LoRA-able resnet layer (expected one of "
                               f"{', '.join(_RESNET)})")
        return _RESNET[tail]
    return join(tail)


def sgm_to_diffusers(name: str, rest: str, join: Callable[[str], str]) -> str:
    """An SGM kohya UNet name (``rest`` after ``lora_unet_``) → the diffusers dotted path.
    ``join`` turns the attention-block remainder (same names in both) into a dotted path."""
    if rest in _TOP:
        return _TOP[rest]
    mt = _MID.match(rest)
    if mt:
        i, tail = int(mt.group(1)), mt.group(2)
        if i > 2:
            raise InspectError(f"module {name!r}: middle_block has 3 parts (0, 1, 2), not {i}")
        kind, idx = ("attentions", 0) if i == 1 else ("resnets", i // 2)
        return f"mid_block.{kind}.{idx}.{_inner(name, kind, tail, join)}"
    mt = _BLOCK.match(rest)
    if not mt:
        raise InspectError(f"module {name!r}: not an SGM UNet block name this map knows")
    side, i, pos, tail = mt.group(1), int(mt.group(2)), int(mt.group(3)), mt.group(4)
    if side == "input_blocks":
        return _down(name, i, pos, tail, join)
    return _up(name, i, pos, tail, join)


def _down(name: str, i: int, pos: int, tail: str, join: Callable[[str], str]) -> str:
    level, slot = (i - 1) // (LPB + 1), (i - 1) % (LPB + 1)
    if i == 0:
        raise InspectError(f"module {name!r}: input_blocks.0 holds only conv_in (input_blocks_0_0)")
    if slot == LPB:
        if pos != 0 or tail != "op":
            raise InspectError(f"module {name!r}: input_blocks.{i} holds only the downsampler (input_blocks_{i}_0_op)")
        return f"down_blocks.{level}.downsamplers.0.conv"
    if pos not in (0, 1):
        raise InspectError(f"module {name!r}: input_blocks.{i} has a resnet (0) and an attention block (1), not {pos}")
    kind = "resnets" if pos == 0 else "attentions"
    return f"down_blocks.{level}.{kind}.{slot}.{_inner(name, kind, tail, join)}"


def _up(name: str, i: int, pos: int, tail: str, join: Callable[[str], str]) -> str:
    level, slot = i // (LPB + 1), i % (LPB + 1)
    upsampler = pos == 2 or (pos == 1 and tail == "conv")
    if upsampler:
        if slot != LPB or tail != "conv":
            raise InspectError(f"module {name!r}: only output_blocks.{3 * level + LPB} holds an upsampler (…_conv)")
        return f"up_blocks.{level}.upsamplers.0.conv"
    if pos not in (0, 1):
        raise InspectError(f"module {name!r}: output_blocks.{i} has a resnet (0), an attention block (1) and an "
                           f"upsampler (2), not {pos}")
    kind = "resnets" if pos == 0 else "attentions"
    return f"up_blocks.{level}.{kind}.{slot}.{_inner(name, kind, tail, join)}"


_D_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_D_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _tail_back(kind: str, tail: str) -> str | None:
    if kind == "resnets":
        return _RESNET_BACK.get(tail)
    return tail.replace(".", "_")


def diffusers_to_sgm(path: str, up0_attn: bool | None) -> str | None:
    """A diffusers UNet path → the SGM kohya name after ``lora_unet_``; None where SGM has no such module.
    ``up0_attn``: whether ``up_blocks.0`` has attentions (:func:`up0_has_attention`); only the upsampler of
    ``up_blocks.0`` needs it, and raises when it is None."""
    if path in _TOP_BACK:
        return _TOP_BACK[path]
    mt = _D_MID.match(path)
    if mt:
        kind, k, tail = mt.group(1), int(mt.group(2)), _tail_back(mt.group(1), mt.group(3))
        if tail is None or (kind == "attentions" and k != 0) or k > 1:
            return None
        return f"middle_block_{1 if kind == 'attentions' else 2 * k}_{tail}"
    mt = _D_BLOCK.match(path)
    if not mt:
        return None
    side, level, kind, k, rest = mt.group(1), int(mt.group(2)), mt.group(3), int(mt.group(4)), mt.group(5)
    if kind in ("downsamplers", "upsamplers"):
        if k != 0 or rest != "conv":
            return None
        if kind == "downsamplers":
            return f"input_blocks_{3 * level + 3}_0_op" if side == "down_blocks" else None
        if side != "up_blocks":
            return None
        if level == 0 and up0_attn is None:
            raise InspectError(f"module unet.{path}: its SGM name depends on whether up_blocks.0 has attention layers "
                               "(SDXL: output_blocks_2_2_conv; SD1.x/2.x: output_blocks_2_1_conv) and no module of "
                               "this adapter tells which")
        return f"output_blocks_{3 * level + LPB}_{2 if (level > 0 or up0_attn) else 1}_conv"
    tail = _tail_back(kind, rest)
    if tail is None or k >= LPB + (side == "up_blocks"):
        return None
    pos = 0 if kind == "resnets" else 1
    i = 3 * level + k + 1 if side == "down_blocks" else 3 * level + k
    return f"{'input_blocks' if side == 'down_blocks' else 'output_blocks'}_{i}_{pos}_{tail}"


_FOUR_LEVELS = re.compile(r"^(down_blocks\.3\.|up_blocks\.3\.|down_blocks\.0\.attentions\.|up_blocks\.2\.attentions\.)")
_UP0_ATTN = re.compile(r"^up_blocks\.0\.attentions\.")


def up0_has_attention(paths: Iterable[str]) -> bool | None:
    """Whether ``up_blocks.0`` has attentions, from the UNet paths present: True when one of them is there
    (SDXL); False when a module exists only in the 4-level layout (``down_blocks.3``, ``up_blocks.3``,
    ``down_blocks.0.attentions``, ``up_blocks.2.attentions``: SD1.x/2.x, SDXL refiner); None when no
    module tells. Both at once is refused."""
    seq = list(paths)
    yes = next((p for p in seq if _UP0_ATTN.match(p)), None)
    no = next((p for p in seq if _FOUR_LEVELS.match(p)), None)
    if yes and no:
        raise InspectError(f"UNet modules {yes!r} (SDXL: 3 levels) and {no!r} (SD1.x/2.x: 4 levels) belong to "
                           "different UNet layouts")
    return True if yes else (False if no else None)


_TB = re.compile(r"\.transformer_blocks\.([1-9]\d*)\.")


def sdxl_family(unet_paths: Iterable[str], components: Iterable[str | None]) -> bool:
    """Evidence of an SDXL-family UNet: a second text encoder, ``add_embedding`` (SDXL's text_time
    conditioning), more than one transformer block per attention (SD1.x/2.x have one), or attentions in
    ``up_blocks.0``."""
    paths = list(unet_paths)
    return ("text_encoder_2" in set(components) or any(p.startswith("add_embedding.") for p in paths)
            or any(_TB.search(p) or _UP0_ATTN.match(p) for p in paths))
