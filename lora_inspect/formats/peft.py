"""PEFT adapters: ``save_pretrained`` directories and bare safetensors/.bin files with PEFT keys.

Key conventions (peft 0.21, ``get_peft_model_state_dict``): ``base_model.model.<module>.<suffix>`` with
the adapter name removed. Scale and pattern rules are PEFT's (:mod:`lora_inspect.peft_rules`,
docs/formats.md): s = α/r or α/√r (rsLoRA); r and α per module via ``rank_pattern`` /
``alpha_pattern``; AdaLoRA s = α/(r + 1e-5). Every config value is validated where it enters
(:mod:`lora_inspect.validate`). Formats: ``peft`` (directory), ``peft-safetensors``, ``peft-bin``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import validate as v
from ..adapter import Adapter, Module
from ..errors import InspectError
from ..orientation import EMBEDDING, PEFT
from ..peft_rules import PEFT_DEFAULT_ALPHA, PEFT_PREFIX, CompiledPatterns, compiled_patterns, lookup_compiled
from ..units import noun, plural, verb
from .capabilities import AlphaHome, Capabilities, Models
from .common import build_module, group_keys
from .diffusers import looks_like_diffusers
from .layout import DirectoryLayout, Format, Found, Rewrite, WriteOptions, write_weights
from .peft_config import config_in_metadata, metadata_alpha, rescaled_config, truncated_config
from .tensors import TensorSource

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..convert.canon import Canon
    from ..convert.writers import Written
    from ..files import AtomicOutput

__all__ = ["PeftLayout", "PeftFormat", "read_config", "PEFT_PREFIX", "PEFT_SUFFIXES", "looks_like_peft", "peft_format"]


class PeftFormat(Format):
    DIR = "peft"  # a save_pretrained directory
    SAFETENSORS = "peft-safetensors"  # one file with PEFT keys (config beside it, in its header, or none)
    BIN = "peft-bin"

PEFT_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
    ".lora_A": "A",  # AdaLoRA (parameters, no .weight)
    ".lora_B": "B",
    ".lora_E": "E",
}
LOW_RANK_TYPES = {"LORA", "ADALORA"}


def looks_like_peft(keys: list[str]) -> bool:
    return any(k.endswith((".lora_A.weight", ".lora_embedding_A", ".lora_A")) for k in keys)


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json (any BOM-marked Unicode encoding; size and depth limited)."""
    return v.read_json_object(path)


@dataclass
class _Settings:
    """The config values the reader uses, each validated."""

    peft_type: str | None
    adalora: bool
    rslora: bool
    r: int | None
    alpha: float | None
    rank_pattern: CompiledPatterns
    alpha_pattern: CompiledPatterns
    use_dora: bool
    base_model: str | None
    target_modules: Any


def _settings(cfg: dict, where: str, found: Found, source: TensorSource, notes: list[str]) -> _Settings:
    peft_type = v.string(cfg, "peft_type", where)
    adalora = str(peft_type or "").upper() == "ADALORA" or any(k.endswith(".lora_E") for k in source.tensors)
    r = v.integer(cfg, "r", where, default=None, minimum=1)
    if adalora:
        r = v.integer(cfg, "init_r", where, default=r, minimum=1)
    alpha = v.number(cfg, "lora_alpha", where, default=None)
    if alpha is None and found.config_path is not None:  # PEFT builds LoraConfig(**json): its default applies
        alpha = PEFT_DEFAULT_ALPHA
        notes.append(f"{found.config_path.name} has no lora_alpha: PEFT's default {PEFT_DEFAULT_ALPHA} applies")
    if alpha is None:
        alpha = metadata_alpha(source, notes)
    rank_pattern = {} if adalora else v.mapping(cfg, "rank_pattern", where, values=v.is_count,
                                                what="a positive integer")
    alpha_pattern = v.mapping(cfg, "alpha_pattern", where, values=v.is_number,
                              what=f"a finite number of magnitude ≤ {v.MAX_NUMBER}")
    return _Settings(
        peft_type="ADALORA" if adalora else (peft_type.upper() if peft_type else None),
        adalora=adalora,
        rslora=v.boolean(cfg, "use_rslora", where),
        r=r,
        alpha=alpha,
        rank_pattern=compiled_patterns(rank_pattern, f"{where}: rank_pattern"),
        alpha_pattern=compiled_patterns(alpha_pattern, f"{where}: alpha_pattern"),
        use_dora=v.boolean(cfg, "use_dora", where),
        base_model=v.string(cfg, "base_model_name_or_path", where),
        target_modules=v.string_list(cfg, "target_modules", where),
    )


def _check_rank(name: str, mod: Module, s: _Settings, cfg: dict, where: str) -> None:
    if s.r is None or s.adalora:
        return
    want = lookup_compiled(s.rank_pattern, name, s.r)
    if want == mod.rank:
        return
    targets = cfg.get("target_parameters")
    if targets and mod.rank % want == 0:
        # peft ParamWrapper: lora_A (r·experts, in), lora_B (out, r·experts) — a valid adapter, not ours
        shown = ", ".join(map(str, targets)) if isinstance(targets, list) else str(targets)
        raise InspectError(
            f"{where}: module {name!r}: stored rank {mod.rank} = r {want} × {mod.rank // want} experts — adapters on "
            f"target_parameters ({shown}: MoE expert weights) are not supported"
        )
    raise InspectError(
        f"{where}: module {name!r}: stored rank {mod.rank} but the config gives r={want}"
        + (" (rank_pattern)" if want != s.r else "")
        + " — PEFT would refuse to load it with a size mismatch"
    )


def read_peft(source: TensorSource, found: Found, fmt: PeftFormat) -> Adapter:
    """Build an Adapter from PEFT-keyed tensors and (optionally) the adapter_config.json."""
    notes: list[str] = []
    config, where = found.config, str(found.config_path or found.shown)
    if config is not None:
        peft_type = str(v.string(config, "peft_type", where, default="LORA")).upper()
        if peft_type not in LOW_RANK_TYPES:
            raise InspectError(
                f"{where}: peft_type {peft_type} is not a low-rank LoRA adapter (lora-inspect reads LORA and ADALORA)"
            )
    else:  # bare file: the metadata may carry a PEFT config (diffusers' lora_adapter_metadata)
        config = config_in_metadata(source)
        if config is not None:
            notes.append("config read from the safetensors header (lora_adapter_metadata)")
            where = f"{source.path}: lora_adapter_metadata"
    cfg = config or {}
    s = _settings(cfg, where, found, source, notes)
    groups, rest = group_keys(source.keys(), PEFT_SUFFIXES)
    if not groups:
        raise InspectError(
            f"{source.path}: no LoRA factor pairs found (expected keys ending in .lora_A.weight / .lora_B.weight)"
        )
    modules, unknown_alpha, prefixed = [], False, 0
    for raw_name in sorted(groups):
        roles = groups[raw_name]
        name = raw_name[len(PEFT_PREFIX):] if raw_name.startswith(PEFT_PREFIX) else raw_name
        prefixed += raw_name.startswith(PEFT_PREFIX)
        orient = EMBEDDING if roles.get("A", "").endswith("lora_embedding_A") else PEFT
        # AdaLoRA: scaling = α if α > 0 else r
        alpha = (s.alpha or None) if s.adalora else lookup_compiled(s.alpha_pattern, name, s.alpha)
        mod, known = build_module(name, roles, source, orient=orient, alpha=alpha, rslora=s.rslora, adalora=s.adalora)
        unknown_alpha |= not known
        _check_rank(name, mod, s, cfg, where)
        modules.append(mod)
    _prefix_notes(notes, unknown_alpha, prefixed, len(groups), found.config is not None)
    ranks = Counter(m.rank for m in modules)
    return Adapter(
        path=found.shown, format=fmt, weights_path=source.path, source=source, modules=modules, extras=sorted(rest),
        config=config, config_path=found.config_path,
        peft_type=s.peft_type or ("LORA" if config is not None else None),
        r=int(s.r) if s.r is not None else ranks.most_common(1)[0][0],
        alpha=float(s.alpha) if s.alpha is not None else None, use_rslora=s.rslora,
        use_dora=s.use_dora or any(m.is_dora for m in modules), base_model=s.base_model,
        target_modules=s.target_modules, notes=notes,
    )


def _prefix_notes(notes: list[str], unknown_alpha: bool, prefixed: int, total: int, has_config: bool) -> None:
    if unknown_alpha:
        notes.append("alpha unknown (no config, no header entry): assumed α = r, scale 1")
    if prefixed and prefixed < total:
        notes.append(f"{plural(total - prefixed, 'module')} {verb(total - prefixed, 'lacks')} the {PEFT_PREFIX!r} prefix "
                     f"the {'other has' if prefixed == 1 else 'others have'}")
    elif not prefixed and has_config:
        notes.append(f"keys lack the {PEFT_PREFIX!r} prefix: PEFT would load this adapter as a silent no-op")


def peft_format(source: TensorSource, found: Found) -> PeftFormat:
    """The format of a PEFT adapter: a directory, or a bare .safetensors / .bin file."""
    if found.is_dir:
        return PeftFormat.DIR
    return PeftFormat.SAFETENSORS if source.path.suffix == ".safetensors" else PeftFormat.BIN


class PeftLayout(DirectoryLayout):
    """PEFT: a ``save_pretrained`` directory, or one file with PEFT keys (config beside it, in the
    ``lora_adapter_metadata`` header entry, or none)."""

    name = "peft"
    label = "PEFT"
    formats: tuple[Format, ...] = tuple(PeftFormat)
    marker_files = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    weight_files = ("adapter_model.safetensors", "adapter_model.bin")
    config_file = "adapter_config.json"
    config_required = True
    key_prefix = PEFT_PREFIX
    target: str | None = "peft"
    caps = Capabilities(per_module_rank=True, per_module_alpha=True, dora=True, conv=True, embeddings=True,
                        full_tensors=True, models=Models.ONE, alpha=AlphaHome.CONFIG)

    def matches(self, keys: list[str], found: Found) -> bool:
        # diffusers-keyed files with a PEFT config beside them are read as PEFT
        return looks_like_peft(keys) or looks_like_diffusers(keys)

    def read(self, source: TensorSource, found: Found) -> Adapter:
        return read_peft(source, found, peft_format(source, found))

    def directory_notes(self, path: Path, subfolders: list[str]) -> list[str]:
        if not subfolders:
            return []
        # save_pretrained of several adapters: "default" here, the others in subfolders
        return [f"{plural(len(subfolders), 'more adapter')} in {noun(len(subfolders), 'subfolder')} ({', '.join(subfolders[:5])}"
                f"{' …' if len(subfolders) > 5 else ''}): only the top-level one is read here"]

    def carried_config(self, ad: Adapter) -> dict | None:
        return ad.config

    def convert_tensors(self, canon: "Canon", opts: WriteOptions) -> "Written":
        from .peft_out import write_peft

        return write_peft(canon, opts)

    # ------------------------------------------------------------------ rewriting
    def output_format(self, ad: Adapter, out: Path) -> Format:
        """A bare PEFT file whose config lives beside it becomes a PEFT directory (the config must
        travel with the new ranks); a directory is never written under a weight-file name."""
        if ad.format == PeftFormat.DIR or ad.config_path is not None:
            if out.suffix in (".safetensors", ".bin"):
                where = ad.config_path if ad.format != PeftFormat.DIR else ad.path
                raise InspectError(
                    f"{out}: the output is a PEFT directory (its config lives in {where}), so OUT must not end in "
                    f"{out.suffix}; name a directory"
                )
            return PeftFormat.DIR
        return ad.format

    def global_alpha(self, ad: Adapter) -> float | None:
        if ad.config is not None:
            a = ad.config.get("lora_alpha")
            return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None
        return ad.alpha

    def truncated(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        metadata = dict(ad.metadata)
        if out_fmt == PeftFormat.DIR:
            if ad.config is None:
                raise InspectError(f"{ad.path}: PEFT directory without a config")
            return Rewrite(out_fmt, tensors, metadata, truncated_config(ad.config, ranks, dropped))
        meta_cfg = config_in_metadata(ad.source, for_rewrite=True)
        if meta_cfg is not None:
            metadata["lora_adapter_metadata"] = _json(truncated_config(meta_cfg, ranks, dropped))
        elif any(k in metadata for k in ("lora_alpha", "alpha")):
            if len(set(ranks.values())) != 1:
                raise InspectError(f"{ad.path}: its alpha lives in the header as one number; per-module ranks need "
                                   "a uniform rank (or a PEFT directory)")
            for key in ("lora_alpha", "alpha"):
                if key in metadata:
                    metadata[key] = str(next(iter(ranks.values())))
        return Rewrite(out_fmt, tensors, metadata, None)

    def rescaled(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], factor: float) -> Rewrite:
        metadata = dict(ad.metadata)
        if ad.config_path is not None and ad.config is not None:  # the config file travels with the output
            return Rewrite(out_fmt, tensors, metadata, rescaled_config(ad.config, factor, str(ad.config_path)))
        meta_cfg = config_in_metadata(ad.source, for_rewrite=True)
        if meta_cfg is not None:  # a single file: the config lives in its header
            where = f"{ad.weights_path}: lora_adapter_metadata"
            metadata["lora_adapter_metadata"] = _json(rescaled_config(meta_cfg, factor, where))
            return Rewrite(out_fmt, tensors, metadata, None)
        keys = [k for k in ("lora_alpha", "alpha") if k in metadata]
        if not keys:
            return super().rescaled(ad, out_fmt, tensors, factor)
        for key in keys:
            metadata[key] = repr(float(metadata[key]) * factor)
        return Rewrite(out_fmt, tensors, metadata, None)

    def baked(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray]) -> Rewrite:
        if out_fmt == PeftFormat.DIR and ad.config is None:
            raise InspectError(f"{ad.path}: PEFT directory without a config")
        return Rewrite(out_fmt, tensors, dict(ad.metadata), ad.config if out_fmt == PeftFormat.DIR else None)

    def copied_files(self, ad: Adapter, out_fmt: Format) -> list[Path]:
        if out_fmt == PeftFormat.DIR and ad.format == PeftFormat.DIR and (ad.path / "README.md").is_file():
            return [ad.path / "README.md"]
        return []

    def weights_name(self, ad: Adapter) -> str:
        return ad.weights_path.name if ad.format == PeftFormat.DIR else "adapter_model" + ad.weights_path.suffix

    def tmp_suffix(self, ad: Adapter, out_fmt: Format) -> str:
        return "" if out_fmt == PeftFormat.DIR else ad.weights_path.suffix

    def write(self, atomic: "AtomicOutput", ad: Adapter, rw: Rewrite) -> None:
        if rw.fmt == PeftFormat.DIR:
            super().write(atomic, ad, rw)
        else:
            write_weights(atomic.tmp, rw.tensors, rw.metadata)

    def weights_file(self, out: Path) -> Path:
        return super().weights_file(out) if out.is_dir() else out


def _json(cfg: dict) -> str:
    import json

    return json.dumps(cfg, sort_keys=True)
