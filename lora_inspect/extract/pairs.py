"""The two checkpoints of an extraction, paired tensor by tensor and each tensor given its role.

BASE and TUNED are read by :func:`lora_inspect.basecheckpoint.open_base_checkpoint` (Hugging Face
model directories, sharded or not; diffusers pipelines; single ``.safetensors`` files; pickled,
GGUF and quantised checkpoints refused in one line). They must hold the same tensor names with the
same shapes: the first difference is one line naming the tensor (exit 2, nothing written).

Roles (:class:`Role`), from the shape and the name:

- ``linear``: a 2-D ``….weight`` (GPT-2's ``Conv1D`` weights are stored (in, out): ΔW is transposed);
- ``conv``: a 3-D or 4-D ``….weight`` (Conv1d / Conv2d, ΔW flattened to (out, in·kh·kw));
- ``embedding``: a 2-D weight of a token or position embedding (``embed_tokens``, ``wte``,
  ``token_embedding`` …), ΔW as stored (num_embeddings, dim);
- ``head``: the output projection (``lm_head``, ``embed_out``): a linear layer that PEFT and mergekit
  treat like the embeddings;
- ``vector``: a 1-D tensor (a norm's scale, a bias);
- ``other``: anything else (integer buffers such as ``position_ids``, scalars).

Module names (:class:`Family`): a transformers model keeps its dotted path (``model.layers.0.mlp.up_proj``,
no pipeline component, PEFT naming); a diffusers pipeline gives ``(component, path)``; a single-file
Stable Diffusion checkpoint (``model.diffusion_model.…``, ``cond_stage_model.transformer.…``) is named
as sd-scripts names it — the kohya name ``lora_unet_`` + the path with ``_`` — and mapped to the
diffusers path by :func:`lora_inspect.convert.names.kohya_to_dotted`; a single-file Flux checkpoint (BFL
names ``double_blocks.N.img_attn.qkv``, bare or under ComfyUI's ``model.diffusion_model.``) keeps its
kohya/BFL name (sd-scripts ``networks/lora_flux.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..basecheckpoint import FLOAT_DTYPES, GPT2_CONV1D, LDM_PREFIXES, BaseCheckpoint, open_base_checkpoint
from ..errors import InspectError
from ..formats.tensors import TensorInfo
from ..kinds import Choice

__all__ = ["Role", "Family", "TensorPair", "CheckpointPair", "open_pair", "EMBEDDING_NAMES", "HEAD_NAMES"]


class Role(Choice):
    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"
    HEAD = "head"
    VECTOR = "vector"
    OTHER = "other"


class Family(Choice):
    """How the checkpoint names its modules, which fixes the default output layout."""

    TRANSFORMERS = "transformers"  # one model, dotted paths (PEFT)
    PIPELINE = "pipeline"  # a diffusers pipeline: component + diffusers path (kohya)
    STABLE_DIFFUSION = "stable-diffusion"  # a single-file SD1.x/2.x/SDXL checkpoint (kohya)
    FLUX = "flux"  # a single-file Flux checkpoint, BFL names (kohya)

    @property
    def image(self) -> bool:
        return self is not Family.TRANSFORMERS


EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "token_embedding", "position_embedding",
                   "embed_positions", "embed_in", "tok_embeddings", "shared", "position_embeddings",
                   "token_type_embeddings")
HEAD_NAMES = ("lm_head", "embed_out")
_FLUX_HEADS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
               "final_layer.")
# transformers ≥ 5 saves CLIPTextModel without its "text_model." level; sd-scripts, diffusers, ComfyUI and A1111
# name CLIP text-encoder modules under it (lora_te_text_model_encoder_layers_0_…)
_CLIP_FLAT = ("encoder.layers.", "embeddings.", "final_layer_norm.")
_COMPONENT = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.")


@dataclass(frozen=True)
class Side:
    """Where one side's tensor lives."""

    path: Path
    key: str
    info: TensorInfo


@dataclass(frozen=True)
class TensorPair:
    """One tensor of both checkpoints, its role, and the module it belongs to."""

    key: str  # the checkpoint-wide key (a pipeline component prefixed)
    base: Side
    tuned: Side
    role: Role
    component: str | None  # the pipeline component of the module (None: one model)
    path: str  # the module's dotted path ("" when the tensor names no module: a vector, an unmapped name)
    kohya_name: str = ""  # the sd-scripts name where the family names modules that way (Flux)
    transposed: bool = False  # GPT-2 Conv1D: stored (in, out)
    why_unnamed: str = ""  # a weight whose module has no name in the output's naming: why

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.info.shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """ΔW as a matrix: (out, in) — a conv flattened to (out, in·kh·kw), a Conv1D transposed."""
        s = self.shape
        n = 1
        for d in s[1:]:
            n *= d
        return (n, s[0]) if self.transposed else (s[0], n)

    @property
    def kernel(self) -> tuple[int, int] | None:
        s = self.shape
        if self.role != Role.CONV:
            return None
        return (s[2], s[3]) if len(s) == 4 else (s[2], 1)

    @property
    def numel(self) -> int:
        return self.base.info.numel

    @property
    def name(self) -> str:
        return f"{self.component}.{self.path}" if self.component and self.path else (self.path or self.key)


@dataclass
class CheckpointPair:
    base: BaseCheckpoint
    tuned: BaseCheckpoint
    family: Family
    pairs: list[TensorPair]
    model_type: str | None = None
    architectures: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[TensorPair]:
        return iter(self.pairs)

    @property
    def largest_bytes(self) -> int:
        """The largest tensor of either side, in bytes as stored (what the memory plan is measured against)."""
        return max([max(p.base.info.nbytes, p.tuned.info.nbytes) for p in self.pairs] + [0])


def _family(ck: BaseCheckpoint) -> Family:
    keys = list(ck.files)
    if any(_COMPONENT.match(k) for k in keys) and ck.config is None:
        return Family.PIPELINE
    if ck.config is None and ck.path.is_file():
        stems = [k.removeprefix("model.diffusion_model.") for k in keys]
        if any((s + ".").startswith(_FLUX_HEADS) for s in stems):
            return Family.FLUX
        if any(k.startswith(tuple(p for p, _ in LDM_PREFIXES)) for k in keys):
            return Family.STABLE_DIFFUSION
    return Family.TRANSFORMERS


def _role(stem: str, leaf: str, ndim: int, float_: bool) -> Role:
    if not float_ or leaf != "weight":
        return Role.VECTOR if float_ and ndim == 1 else Role.OTHER
    last = stem.rsplit(".", 1)[-1]
    if ndim == 1:
        return Role.VECTOR
    if ndim == 2:
        if last in EMBEDDING_NAMES:
            return Role.EMBEDDING
        return Role.HEAD if last in HEAD_NAMES else Role.LINEAR
    return Role.CONV if ndim in (3, 4) else Role.OTHER


def _kohya_name(key_stem: str) -> str | None:
    for ldm, pre in LDM_PREFIXES:
        if key_stem.startswith(ldm):
            return pre + key_stem[len(ldm):].replace(".", "_")
    return None


def _names(family: Family, stem: str) -> tuple[str | None, str, str, str]:
    """(component, path, kohya name, why unnamed) of the module whose weight is ``stem`` + ``.weight``."""
    from ..convert.names import kohya_to_dotted

    if family is Family.TRANSFORMERS:
        return None, stem, "", ""
    if family is Family.PIPELINE:
        comp, _, rest = stem.partition(".")
        if comp.startswith("text_encoder") and rest.startswith(_CLIP_FLAT):
            rest = "text_model." + rest
        return comp, rest, "", ""
    if family is Family.FLUX:
        bare = stem.removeprefix("model.diffusion_model.")
        if not (bare + ".").startswith(_FLUX_HEADS):  # img_in / txt_in are modules of their own
            return None, "", "", "not a Flux transformer module (a text encoder or VAE in the same file)"
        name = "lora_unet_" + bare.replace(".", "_")
        return "unet", kohya_to_dotted(name)[1], name, ""
    kohya = _kohya_name(stem)
    if kohya is None:
        return None, "", "", "outside the UNet and the CLIP text encoder (sd-scripts names no LoRA module here)"
    try:
        comp, path = kohya_to_dotted(kohya)
    except InspectError:
        return None, "", "", f"its sd-scripts name {kohya!r} has no diffusers module path"
    return comp, path, "", ""


def _side(ck: BaseCheckpoint, key: str) -> Side:
    p, file_key = ck.files[key]
    info = ck.source(p).tensors.get(file_key)
    if info is None:
        raise InspectError(f"{p}: no tensor named {file_key!r} (the index lists it in this file)")
    return Side(p, file_key, info)


def _same_names(base: BaseCheckpoint, tuned: BaseCheckpoint) -> None:
    only_base = [k for k in base.files if k not in tuned.files]
    only_tuned = [k for k in tuned.files if k not in base.files]
    if only_base:
        raise InspectError(f"{tuned.path}: no tensor {only_base[0]!r}, which BASE has "
                           f"({len(only_base)} such): BASE and TUNED must be the same architecture")
    if only_tuned:
        raise InspectError(f"{tuned.path}: tensor {only_tuned[0]!r} is not in BASE ({len(only_tuned)} such): "
                           "BASE and TUNED must be the same architecture")


def _pair(ck_b: BaseCheckpoint, ck_t: BaseCheckpoint, family: Family, gpt2: bool, key: str) -> TensorPair:
    b, t = _side(ck_b, key), _side(ck_t, key)
    if b.info.shape != t.info.shape:
        shape = lambda i: "×".join(map(str, i.shape)) or "scalar"
        raise InspectError(f"{t.path}: tensor {t.key!r} is {shape(t.info)}, in BASE {shape(b.info)}: "
                           "BASE and TUNED must be the same architecture")
    float_ = b.info.dtype in FLOAT_DTYPES and t.info.dtype in FLOAT_DTYPES
    if (b.info.dtype in FLOAT_DTYPES) != (t.info.dtype in FLOAT_DTYPES):
        odd = t if t.info.dtype not in FLOAT_DTYPES else b
        raise InspectError(f"{odd.path}: tensor {odd.key!r} is {odd.info.dtype} on one side and a float on the "
                           "other (a quantised checkpoint is not supported: use the unquantised one)")
    stem, _, leaf = key.rpartition(".")
    role = _role(stem, leaf, len(b.info.shape), float_)
    if role in (Role.VECTOR, Role.OTHER):
        return TensorPair(key, b, t, role, None, "")
    comp, path, kohya, why = _names(family, stem)
    transposed = gpt2 and role == Role.LINEAR and stem.endswith(GPT2_CONV1D)
    return TensorPair(key, b, t, role, comp, path, kohya, transposed, why)


def open_pair(base: str | Path, tuned: str | Path) -> CheckpointPair:
    """Open BASE and TUNED, check they match name for name and shape for shape, and pair every tensor."""
    ck_b, ck_t = open_base_checkpoint(base), open_base_checkpoint(tuned)
    fam_b, fam_t = _family(ck_b), _family(ck_t)
    if fam_b != fam_t:
        raise InspectError(f"{tuned}: a {fam_t} checkpoint, and BASE {base} a {fam_b} one: they must be the same kind")
    _same_names(ck_b, ck_t)
    cfg = ck_t.config or ck_b.config or {}
    mt = cfg.get("model_type")
    archs = cfg.get("architectures")
    gpt2 = mt == "gpt2"
    pairs = [_pair(ck_b, ck_t, fam_b, gpt2, k) for k in ck_b.files]
    arch = tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ()
    return CheckpointPair(ck_b, ck_t, fam_b, pairs, mt if isinstance(mt, str) else None, arch)


def raw(ck: BaseCheckpoint, side: Side) -> np.ndarray:
    """The tensor as stored (a read-only view of the memory map)."""
    return ck.source(side.path).raw(side.key)
