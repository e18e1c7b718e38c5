"""Module names across layouts: one canonical name per module, and the kohya ↔ dotted key maps.

A canonical name is ``(component, path)``: ``path`` is the dotted module path inside one model
(``model.layers.0.self_attn.q_proj``, ``down_blocks.0.attentions.0.proj_in``), ``component`` the
pipeline part it belongs to (``unet``, ``text_encoder``, ``text_encoder_2``, ``transformer``) or
None for a single model (PEFT, mlx-lm).

kohya names (sd-scripts ``networks/lora.py``) are ``lora_<prefix>_`` + the dotted path with every
``.`` replaced by ``_``; going back, ``_`` is ambiguous, so tokens are re-joined by a table of the
multi-word identifiers that diffusers' own converter repairs (``src/diffusers/loaders/
lora_conversion_utils.py · _convert_unet_lora_key``, ``_convert_text_encoder_lora_key``) plus the
usual LLM projection names. A writer refuses a name whose kohya form does not map back to itself
(docs/formats.md, "convert"). UNet names in SGM form (``input_blocks``, ``middle_block``,
``output_blocks``: how sd-scripts names every SDXL LoRA) map to diffusers paths by
:mod:`lora_inspect.convert.sgm`; :func:`kohya_names` picks SGM or diffusers-style UNet names when writing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InspectError
from ..formats.layout import Naming
from .sgm import diffusers_to_sgm, is_sgm, is_sgm_kohya, sdxl_family, sgm_to_diffusers, up0_has_attention

if TYPE_CHECKING:  # pragma: no cover
    from .canon import Canon

__all__ = ["KOHYA_TO_COMPONENT", "COMPONENT_TO_KOHYA", "COMPONENTS", "kohya_to_dotted", "dotted_to_kohya",
           "split_component", "full_name", "kohya_names", "UNET_NAMES", "DOTTED_PREFIXES", "kohya_equivalent"]

KOHYA_TO_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                      "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3", "lora_transformer_": "transformer"}
COMPONENT_TO_KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                      "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
# ComfyUI's dotted prefixes for the same modules (ComfyUI ``comfy/lora.py · model_lora_keys_unet/_clip``;
# diffusers ``_convert_kohya_flux_lora_to_diffusers`` maps them to lora_unet_/lora_te_ the same way)
DOTTED_PREFIXES = {"diffusion_model.": "lora_unet_", "text_encoders.clip_l.transformer.": "lora_te1_"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")

# identifiers that contain "_" (longest first when they share a first token)
_COMPOUNDS = sorted({
    "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj", "qkv_proj", "c_attn", "c_proj", "c_fc", "embed_tokens", "lm_head", "text_model",
    "token_embedding", "position_embedding", "text_projection", "final_layer_norm", "proj_in", "proj_out",
    "transformer_blocks", "single_transformer_blocks", "down_blocks", "up_blocks", "mid_block", "time_emb_proj",
    "conv_shortcut", "conv_in", "conv_out", "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj",
    "add_v_proj", "to_add_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "proj_mlp",
    "ff_context", "norm1_context", "norm_out", "x_embedder", "context_embedder", "time_text_embed",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "self_attention", "block_sparse_moe", "shared_expert",
    "in_proj", "x_proj", "dt_proj", "word_embeddings", "lora_magnitude",
}, key=lambda s: -s.count("_"))


def split_component(name: str) -> tuple[str | None, str]:
    """``unet.down_blocks.0…`` → (``unet``, ``down_blocks.0…``); a name without a component → (None, name)."""
    head, dot, rest = name.partition(".")
    if dot and head in COMPONENTS:
        return head, rest
    return None, name


def full_name(component: str | None, path: str) -> str:
    return f"{component}.{path}" if component else path


def _by_first_token() -> dict[str, list[list[str]]]:
    """The compounds as token lists, indexed by their first token (longest first, as in _COMPOUNDS)."""
    table: dict[str, list[list[str]]] = {}
    for c in _COMPOUNDS:
        toks = c.split("_")
        table.setdefault(toks[0], []).append(toks)
    return table


_BY_FIRST = _by_first_token()


def _join(name: str, rest: str) -> str:
    toks = rest.split("_")
    out: list[str] = []
    i = 0
    while i < len(toks):
        for c in _BY_FIRST.get(toks[i], ()):
            if toks[i:i + len(c)] == c:
                out.append("_".join(c))
                i += len(c)
                break
        else:
            out.append(toks[i])
            i += 1
    if any(not t for t in out):
        raise InspectError(f"module {name!r}: empty name part; cannot map it to a dotted module path")
    return ".".join(out)


def kohya_equivalent(name: str) -> str:
    """A ComfyUI dotted name (``diffusion_model.double_blocks.0.img_attn.qkv``) → its kohya name
    (``lora_unet_double_blocks_0_img_attn_qkv``); any other name is returned as is."""
    for dotted, kohya in DOTTED_PREFIXES.items():
        if name.startswith(dotted):
            return kohya + name[len(dotted):].replace(".", "_")
    return name


def kohya_to_dotted(name: str) -> tuple[str, str]:
    """A kohya module name → (component, dotted path); an InspectError for names it cannot map.
    SGM UNet names become diffusers paths (:func:`lora_inspect.convert.sgm.sgm_to_diffusers`); ComfyUI's
    dotted names (:data:`DOTTED_PREFIXES`) map as their kohya equivalent."""
    name = kohya_equivalent(name)
    prefix = next((p for p in sorted(KOHYA_TO_COMPONENT, key=len, reverse=True) if name.startswith(p)), None)
    if prefix is None:
        raise InspectError(f"module {name!r}: not a kohya name (expected a lora_unet_/lora_te*_ prefix)")
    rest = name[len(prefix):]
    comp = KOHYA_TO_COMPONENT[prefix]
    if comp == "unet" and is_sgm(rest):
        return comp, sgm_to_diffusers(name, rest, lambda tail: _join(name, tail))
    return comp, _join(name, rest)


def dotted_to_kohya(component: str | None, path: str, *, sgm: bool = False, up0_attn: bool | None = None,
                    te_prefix: str | None = None) -> str:
    """(component, dotted path) → the kohya name; refuses a path that would not map back to itself.
    ``sgm``: UNet paths get SGM names (``up0_attn`` as in :func:`~lora_inspect.convert.sgm.diffusers_to_sgm`);
    ``te_prefix`` overrides the text encoder's prefix (``lora_te1_`` in SDXL files)."""
    comp = component or "text_encoder"
    prefix = te_prefix if (comp == "text_encoder" and te_prefix) else COMPONENT_TO_KOHYA[comp]
    rest = path.replace(".", "_")
    if sgm and comp == "unet":
        got = diffusers_to_sgm(path, up0_attn)
        if got is None:
            raise InspectError(f"module {full_name(component, path)!r}: no SGM UNet module corresponds to it; "
                               "write diffusers-style kohya names instead")
        rest = got
    name = prefix + rest
    try:
        back = kohya_to_dotted(name)[1]
    except InspectError:
        back = None
    if back != path:
        again = f"would read back as {back!r}" if back is not None else "would not read back as a module path"
        raise InspectError(f"module {full_name(component, path)!r}: its kohya name {name!r} {again}; this name "
                           "cannot be mapped to kohya")
    return name


UNET_NAMES = ("auto", "sgm", "diffusers")


def _source_style(canon: "Canon") -> str | None:
    if canon.naming != Naming.KOHYA:  # a kohya-named source (kohya, LyCORIS) keeps its UNet style
        return None
    styles = {is_sgm_kohya(kohya_equivalent(m.source_name)) for m in canon.modules if m.component == "unet"}
    return None if len(styles) != 1 else ("sgm" if styles.pop() else "diffusers")


_UP0_SLOT = {"lora_unet_output_blocks_2_1_conv": False, "lora_unet_output_blocks_2_2_conv": True}


def _up0(canon: "Canon") -> bool | None:
    """:func:`~lora_inspect.convert.sgm.up0_has_attention`, else the slot an SGM kohya source gave that upsampler."""
    up0 = up0_has_attention(m.path for m in canon.modules if m.component == "unet")
    if up0 is None and canon.naming == Naming.KOHYA:
        slots = (kohya_equivalent(m.source_name) for m in canon.modules)
        up0 = next((_UP0_SLOT[n] for n in slots if n in _UP0_SLOT), None)
    return up0


def _named(canon: "Canon", sgm: bool, te_prefix: str | None) -> list[str]:
    up0 = _up0(canon) if sgm else None
    return [dotted_to_kohya(m.component, m.path, sgm=sgm, up0_attn=up0, te_prefix=te_prefix) for m in canon.modules]


def _dit_pipeline(canon: "Canon") -> bool:
    """A transformer (Flux, SD3) pipeline: sd-scripts writes its CLIP-L as ``lora_te1_`` (``networks/lora_flux.py``,
    ``LORA_PREFIX_TEXT_ENCODER_CLIP``), as diffusers' Flux kohya converter and ComfyUI read it."""
    return "transformer" in canon.components() or any(
        m.component == "unet" and m.path.replace(".", "_").startswith(("double_blocks_", "single_blocks_"))
        for m in canon.modules)


def kohya_names(canon: "Canon", unet_names: str = "auto") -> tuple[list[str], list[str]]:
    """The kohya name of every module of ``canon`` (in order), and notes on the choices made.

    ``unet_names``: ``sgm`` (``input_blocks_…``: what sd-scripts writes for SDXL), ``diffusers``
    (``down_blocks_…``: what it writes for SD1.x/2.x), or ``auto``: a kohya source keeps its own style;
    otherwise SGM for an SDXL-family adapter (:func:`~lora_inspect.convert.sgm.sdxl_family`), diffusers-style
    names else; where SGM names cannot be given (a module without an SGM counterpart, an undecidable
    layout) ``auto`` falls back to diffusers-style names and says why, ``sgm`` refuses.
    Text encoders are ``lora_te1_``/``lora_te2_`` for SDXL and beside a Flux/SD3 transformer, ``lora_te_`` otherwise."""
    if unet_names not in UNET_NAMES:
        raise InspectError(f"unknown UNet naming {unet_names!r} (one of {', '.join(UNET_NAMES)})")
    unet = [m.path for m in canon.modules if m.component == "unet"]
    xl = sdxl_family(unet, canon.components())
    te1 = any(kohya_equivalent(m.source_name).startswith("lora_te1_") for m in canon.modules)
    te_prefix = "lora_te1_" if (xl or te1 or _dit_pipeline(canon)) else None
    if unet_names != "auto":
        return _named(canon, unet_names == "sgm", te_prefix), []
    src = _source_style(canon)
    style = src or ("sgm" if xl else "diffusers")
    why = "as in the source" if src else ("an SDXL adapter, as sd-scripts writes them" if xl else
                                          "as sd-scripts writes SD1.x/2.x; no SDXL module here")
    notes = [f"kohya UNet names: {'SGM (input_blocks_…)' if style == 'sgm' else 'diffusers-style'}, {why}"] \
        if unet else []
    if style == "sgm":
        try:
            return _named(canon, True, te_prefix), notes
        except InspectError as e:
            notes = [f"kohya UNet names: diffusers-style; SGM names were not possible: {e}"]
    return _named(canon, False, te_prefix), notes
