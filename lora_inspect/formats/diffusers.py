"""diffusers ``pytorch_lora_weights`` files (``save_lora_weights``, PEFT-backed diffusers ≥ 0.22).

``unet.`` / ``text_encoder.`` / ``transformer.`` + ``.lora_A.weight`` / ``.lora_B.weight`` (older
``.lora.down/.lora.up``); alphas from ``.alpha`` keys or a PEFT config in the ``lora_adapter_metadata``
header entry (per component as ``"<component>.<field>"``, or one config for all), else α = r.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import validate as v
from ..adapter import Adapter, Module
from ..peft_rules import compiled_patterns, lookup_compiled
from ..units import plural, verb
from .alphas import alphas_for_ranks, alphas_scaled
from .common import build_module, group_keys
from .kohya import check_lycoris, finish
from .layout import AlphaHome, Capabilities, Format, Found, Layout, Models, Naming, Rewrite, WriteOptions
from .peft_config import COMPONENTS, config_in_metadata, rescaled_config, truncated_config
from .tensors import TensorSource

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..convert.canon import Canon
    from ..convert.writers import Written

__all__ = ["DiffusersLayout", "DiffusersFormat", "PipelineNaming", "looks_like_diffusers", "DIFFUSERS_PREFIXES"]


class DiffusersFormat(Format):
    DIFFUSERS = "diffusers"

DIFFUSERS_PREFIXES = tuple(c + "." for c in COMPONENTS)
DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    "_lora.down.weight": "A",
    "_lora.up.weight": "B",
    ".lora_magnitude_vector": "m",
    ".alpha": "alpha",
}


def looks_like_diffusers(keys: list[str]) -> bool:
    return any(k.startswith(DIFFUSERS_PREFIXES) and (".lora" in k or "_lora." in k) for k in keys)


def _component_alpha(config: dict, name: str, where: str) -> tuple[float | None, bool]:
    """(α, rsLoRA) for module ``name`` from the metadata config: diffusers packs per-component configs
    as ``"<component>.<field>"``; a plain PEFT config applies to every component."""
    comp, _, inner = name.partition(".")
    cfg = {k[len(comp) + 1:]: x for k, x in config.items() if k.startswith(comp + ".")} or config
    alpha = v.number(cfg, "lora_alpha", where, default=None)
    if alpha is None:
        return None, False
    pattern = v.mapping(cfg, "alpha_pattern", where, values=v.is_number,
                        what=f"a finite number of magnitude ≤ {v.MAX_NUMBER}")
    alpha = lookup_compiled(compiled_patterns(pattern, f"{where}: alpha_pattern"), inner, alpha)
    return alpha, v.boolean(cfg, "use_rslora", where)


def _config_name(m: Module) -> str:
    """The name the config's patterns are matched against: without the component."""
    return m.name.partition(".")[2]


class PipelineNaming:
    """Module names that start with their pipeline component (``unet.``, ``text_encoder_2.``, ``transformer.``);
    a name without one is a path of one model."""

    naming = Naming.PIPELINE

    def canonical_name(self, m: Module) -> tuple[str | None, str]:
        from ..convert.names import split_component

        return split_component(m.name)


class DiffusersLayout(PipelineNaming, Layout):
    name = "diffusers"
    formats: tuple[Format, ...] = (DiffusersFormat.DIFFUSERS,)
    target: str | None = "diffusers"
    caps = Capabilities(per_module_rank=True, per_module_alpha=True, dora=True, conv=True, embeddings=False,
                        models=Models.PIPELINE, alpha=AlphaHome.TENSORS,
                        why=(("embedding", "embedding LoRA is not written to diffusers files"),))

    def matches(self, keys: list[str], found: Found) -> bool:
        return found.config is None and looks_like_diffusers(keys)

    def read(self, source: TensorSource, found: Found) -> Adapter:
        check_lycoris(source)
        config = config_in_metadata(source)
        where = f"{source.path}: lora_adapter_metadata"
        groups, rest = group_keys(source.keys(), DIFFUSERS_SUFFIXES)
        modules, notes, missing = [], [], 0
        for name in sorted(groups):
            roles = groups[name]
            alpha, rslora = None, False
            if config and "alpha" not in roles:
                alpha, rslora = _component_alpha(config, name, where)
            mod, known = build_module(name, roles, source, alpha=alpha, rslora=rslora)
            missing += not known
            modules.append(mod)
        if missing:
            notes.append(f"{plural(missing, 'module')} {verb(missing, 'has')} no alpha (.alpha key or lora_adapter_metadata): "
                         "α = r assumed")
        return finish(found.shown, DiffusersFormat.DIFFUSERS, source, modules, rest, notes, config)

    def convert_tensors(self, canon: "Canon", opts: WriteOptions) -> "Written":
        from .diffusers_out import write_diffusers

        return write_diffusers(canon, opts)

    def global_alpha(self, ad: Adapter) -> float | None:
        cfg = config_in_metadata(ad.source, for_rewrite=True)
        if cfg is not None and not any(m.alpha_key for m in ad.modules) and "lora_alpha" in cfg:
            return float(v.number(cfg, "lora_alpha", f"{ad.weights_path}: lora_adapter_metadata"))
        return super().global_alpha(ad)

    def truncated(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        alphas_for_ranks(ad, tensors, ranks)
        metadata = dict(ad.metadata)
        cfg = config_in_metadata(ad.source, for_rewrite=True)
        if cfg is not None:
            names = {_config_name(m): ranks[m.name] for m in ad.modules if m.name in ranks}
            gone = [_config_name(ad.module(n)) for n in dropped]
            metadata["lora_adapter_metadata"] = _json(truncated_config(cfg, names, gone))
        return Rewrite(out_fmt, tensors, metadata, None)

    def rescaled(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], factor: float) -> Rewrite:
        metadata = dict(ad.metadata)
        if any(m.alpha_key for m in ad.modules):
            alphas_scaled(ad, tensors, factor, lambda m: None)
            return Rewrite(out_fmt, tensors, metadata, None)
        cfg = config_in_metadata(ad.source, for_rewrite=True)
        if cfg is None:
            return super().rescaled(ad, out_fmt, tensors, factor)
        where = f"{ad.weights_path}: lora_adapter_metadata"
        metadata["lora_adapter_metadata"] = _json(rescaled_config(cfg, factor, where))
        return Rewrite(out_fmt, tensors, metadata, None)


def _json(cfg: dict) -> str:
    import json

    return json.dumps(cfg, sort_keys=True)
