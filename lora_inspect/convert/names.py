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
(docs/formats.md, "convert"). SDXL files written with SGM block names (``input_blocks``,
``middle_block``, ``output_blocks``) are refused with one line: their block-index arithmetic is
not implemented here.
"""

from __future__ import annotations

from ..errors import InspectError

__all__ = ["KOHYA_TO_COMPONENT", "COMPONENT_TO_KOHYA", "COMPONENTS", "kohya_to_dotted", "dotted_to_kohya", "split_component",
           "full_name"]

KOHYA_TO_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                      "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3", "lora_transformer_": "transformer"}
COMPONENT_TO_KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                      "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
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
_SGM = ("input_blocks", "middle_block", "output_blocks")


def split_component(name: str) -> tuple[str | None, str]:
    """``unet.down_blocks.0…`` → (``unet``, ``down_blocks.0…``); a name without a component → (None, name)."""
    head, dot, rest = name.partition(".")
    if dot and head in COMPONENTS:
        return head, rest
    return None, name


def full_name(component: str | None, path: str) -> str:
    return f"{component}.{path}" if component else path


def kohya_to_dotted(name: str) -> tuple[str, str]:
    """A kohya module name → (component, dotted path); an InspectError for names it cannot map."""
    prefix = next((p for p in sorted(KOHYA_TO_COMPONENT, key=len, reverse=True) if name.startswith(p)), None)
    if prefix is None:
        raise InspectError(f"module {name!r}: not a kohya name (expected a lora_unet_/lora_te*_ prefix)")
    rest = name[len(prefix):]
    if any(s in rest for s in _SGM):
        raise InspectError(f"module {name!r}: SDXL SGM block names (input_blocks/middle_block/output_blocks) are not "
                           "mapped to diffusers names here")
    toks = rest.split("_")
    out: list[str] = []
    i = 0
    while i < len(toks):
        for c in _COMPOUNDS:
            n = c.count("_") + 1
            if toks[i:i + n] == c.split("_"):
                out.append(c)
                i += n
                break
        else:
            out.append(toks[i])
            i += 1
    if any(not t for t in out):
        raise InspectError(f"module {name!r}: empty name part; cannot map it to a dotted module path")
    return KOHYA_TO_COMPONENT[prefix], ".".join(out)


def dotted_to_kohya(component: str | None, path: str) -> str:
    """(component, dotted path) → the kohya name; refuses a path that would not map back to itself."""
    comp = component or "text_encoder"
    name = COMPONENT_TO_KOHYA[comp] + path.replace(".", "_")
    try:
        back = kohya_to_dotted(name)[1]
    except InspectError:
        back = None
    if back != path:
        raise InspectError(f"module {full_name(component, path)!r}: its kohya name {name!r} would read back as "
                           f"{back!r}; this name cannot be mapped to kohya")
    return name
