"""kohya / sd-scripts files (``networks/lora.py``).

``lora_unet_…`` / ``lora_te[12]_…`` + ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight``
(out, r[, 1, 1]), ``.alpha`` (scalar); ΔW = (α/r)·up@down, a missing or zero alpha meaning α = r.

ComfyUI's dotted form of a Flux file is read here too: ``diffusion_model.double_blocks.0.img_attn.qkv`` +
``.lora_down.weight``/``.lora_up.weight`` or PEFT-style ``.lora_A.weight``/``.lora_B.weight``, ``.alpha``
(``text_encoders.clip_l.transformer.…`` for CLIP-L): the same modules and the same rule (s = α/r, α = r
without ``.alpha``), as ComfyUI ``comfy/lora.py · load_lora`` applies them and diffusers'
``_convert_kohya_flux_lora_to_diffusers`` maps them (``diffusion_model.`` → ``lora_unet_``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, Module
from ..errors import InspectError
from ..units import plural, verb
from .alphas import alphas_for_ranks, alphas_scaled
from .common import build_module, group_keys
from .layout import AlphaHome, Capabilities, Format, Found, Layout, Naming, Rewrite, WriteOptions
from .tensors import TensorSource

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..convert.canon import Canon
    from ..convert.writers import Written

__all__ = ["KohyaLayout", "KohyaFormat", "KohyaNaming", "KOHYA_PREFIXES", "check_lycoris", "finish"]


class KohyaFormat(Format):
    KOHYA = "kohya"

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
COMFY_FLUX = ("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")
COMFY_SUFFIXES = {**KOHYA_SUFFIXES, ".lora_A.weight": "A", ".lora_B.weight": "B"}
LYCORIS_MARKERS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_diag", ".oft_blocks", ".a1.weight")


def check_lycoris(source: TensorSource, config_path: Path | None = None) -> None:
    """Refuse a LyCORIS tensor in a file read as LoRA pairs. LyCORIS files are read by the LyCORIS layout
    (:mod:`.lycoris`), which steps aside when a PEFT ``adapter_config.json`` lies beside the file (that
    makes it a PEFT LoHa/LoKr): the case that ends here, named with the config (``config_path``)."""
    for k in source.tensors:
        if any(m in k for m in LYCORIS_MARKERS):
            why = (f"LyCORIS files are read without a PEFT config, and {config_path} lies beside this one: "
                   "move the file away from it" if config_path is not None else
                   "the LyCORIS layout reads such tensors only under its key names (….hada_w1_a, ….lokr_w1 …)")
            raise InspectError(f"{source.path}: {k!r} is a LyCORIS (LoHa/LoKr/OFT) tensor; {why}")


def finish(path: Path, fmt: Format, source: TensorSource, modules: list[Module], rest: list[str], notes: list[str],
           config: dict[str, Any] | None = None) -> Adapter:
    """An Adapter for the Stable Diffusion layouts (no global config: rank and α from the modules)."""
    if not modules:
        raise InspectError(f"{source.path}: no LoRA factor pairs found")
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(m.alpha for m in modules)
    return Adapter(
        path=path,
        format=fmt,
        weights_path=source.path,
        source=source,
        modules=modules,
        extras=sorted(rest),
        config=config,
        r=ranks.most_common(1)[0][0],
        alpha=alphas.most_common(1)[0][0] if len(alphas) == 1 else None,
        use_dora=any(m.is_dora for m in modules),
        base_model=source.metadata.get("ss_sd_model_name") or source.metadata.get("ss_base_model_version"),
        notes=notes,
    )


def _kohya_alpha_key(m: Module) -> str | None:
    suf = next((s for s in (".lora_down.weight", ".lora_A.weight") if m.a_key.endswith(s)), None)
    return m.a_key[: -len(suf)] + ".alpha" if suf else None


def _comfy_flux(keys: list[str]) -> bool:
    """ComfyUI's dotted Flux names (``diffusion_model.double_blocks.…``); XLabs' ``….processor.qkv_lora1.down``
    files share the prefix but not the module names, and are read by :mod:`.xlabs` (tried before this layout)."""
    return any(k.startswith(COMFY_FLUX) for k in keys)


class KohyaNaming:
    """kohya module names (``lora_unet_…``, ``lora_te1_…``, ComfyUI's ``diffusion_model.…``): the canonical
    (component, path) by :func:`lora_inspect.convert.names.kohya_to_dotted`. LyCORIS files use them too."""

    naming = Naming.KOHYA

    def canonical_name(self, m: Module) -> tuple[str | None, str]:
        from ..convert.names import kohya_to_dotted

        return kohya_to_dotted(m.name)


class KohyaLayout(KohyaNaming, Layout):
    name = "kohya"
    formats: tuple[Format, ...] = (KohyaFormat.KOHYA,)
    target: str | None = "kohya"
    caps = Capabilities(per_module_rank=True, per_module_alpha=True, dora=False, conv=True, embeddings=False,
                        alpha=AlphaHome.TENSORS,
                        why=(("dora", "DoRA magnitudes (kohya's dora_scale axis is ambiguous)"),
                             ("embedding", "embedding LoRA has no kohya form")))

    def matches(self, keys: list[str], found: Found) -> bool:
        return any(k.startswith(KOHYA_PREFIXES) for k in keys) or _comfy_flux(keys)

    def read(self, source: TensorSource, found: Found) -> Adapter:
        check_lycoris(source, found.config_path)
        keys = source.keys()
        comfy = _comfy_flux(keys)
        groups, rest = group_keys(keys, COMFY_SUFFIXES if comfy else KOHYA_SUFFIXES)
        modules, notes, missing = [], [], 0
        for name in sorted(groups):
            mod, known = build_module(name, groups[name], source)
            missing += not known
            modules.append(mod)
        if missing:
            notes.append(f"{plural(missing, 'module')} {verb(missing, 'has')} no .alpha tensor: α = r (scale 1) assumed, "
                         "as kohya does")
        if comfy:
            notes.append("ComfyUI dotted Flux names (diffusion_model.…): read as the kohya names lora_unet_…")
        return finish(found.shown, KohyaFormat.KOHYA, source, modules, rest, notes)

    def convert_tensors(self, canon: "Canon", opts: WriteOptions) -> "Written":
        from .kohya_out import write_kohya

        return write_kohya(canon, opts)

    def truncated(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        alphas_for_ranks(ad, tensors, ranks)
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)

    def rescaled(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], factor: float) -> Rewrite:
        alphas_scaled(ad, tensors, factor, _kohya_alpha_key)  # α = r implied: store it explicitly, scaled
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)
