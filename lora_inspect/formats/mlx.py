"""mlx-lm adapter directories: ``adapters.safetensors`` + ``adapter_config.json``.

mlx-lm (``mlx_lm/tuner/lora.py``) stores ``lora_a`` (in, r) and ``lora_b`` (r, out) — PEFT's factors
transposed — and applies ``scale · (x @ lora_a) @ lora_b`` with an *absolute* scale (default 20, no
division by r). DoRA adds ``.m``. One rank for all modules (``lora_parameters.rank``).
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import validate as v
from ..adapter import Adapter
from ..errors import InspectError
from ..orientation import MLX
from .common import build_module, group_keys
from .layout import AlphaHome, Capabilities, DirectoryLayout, Format, Found, Models, Rewrite, WriteOptions

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..convert.canon import Canon
    from ..convert.writers import Written
    from .tensors import TensorSource

__all__ = ["MlxLayout", "MlxFormat", "looks_like_mlx", "MLX_DEFAULT_SCALE"]


class MlxFormat(Format):
    MLX = "mlx"

MLX_SUFFIXES = {".lora_a": "A", ".lora_b": "B", ".m": "m"}
MLX_DEFAULT_SCALE = 20.0
WEIGHTS = "adapters.safetensors"


def looks_like_mlx(keys: list[str]) -> bool:
    return any(k.endswith(".lora_a") for k in keys)


def _params(cfg: dict, where: str, notes: list[str]) -> tuple[str, float, int | None]:
    ftt = v.string(cfg, "fine_tune_type", where, default="lora")
    if ftt == "full":
        raise InspectError(f"{where}: fine_tune_type is 'full': this is a full fine-tune, not an adapter")
    params = v.mapping(cfg, "lora_parameters", where)
    lp_where = f"{where}: lora_parameters"
    scale = v.number(params, "scale", lp_where, default=None)
    if scale is None:
        scale = MLX_DEFAULT_SCALE
        notes.append(f"no lora_parameters.scale: mlx-lm's default {MLX_DEFAULT_SCALE:g} assumed")
    return ftt, float(scale), v.integer(params, "rank", lp_where, default=None, minimum=1)


class MlxLayout(DirectoryLayout):
    name = "mlx"
    label = "mlx-lm"
    formats: tuple[Format, ...] = (MlxFormat.MLX,)
    marker_files = (WEIGHTS,)
    weight_files = (WEIGHTS,)
    config_file = "adapter_config.json"
    target: str | None = "mlx"
    caps = Capabilities(per_module_rank=False, per_module_alpha=False, dora=True, dora_all_or_none=True, conv=False,
                        embeddings=False, models=Models.ONE, alpha=AlphaHome.SCALE,
                        why=(("conv", "{kind} LoRA (mlx-lm adapts Linear layers here)"),
                             ("embedding", "{kind} LoRA (mlx-lm adapts Linear layers here)"),
                             ("dora_partial", "it has no DoRA magnitude while other modules do (mlx-lm's "
                                              "fine_tune_type dora applies to every adapted layer)")))

    def matches(self, keys: list[str], found: Found) -> bool:
        return looks_like_mlx(keys)

    def read(self, source: "TensorSource", found: Found) -> Adapter:
        notes: list[str] = []
        where = str(found.config_path or found.shown)
        ftt, scale, want = _params(found.config or {}, where, notes)
        groups, rest = group_keys(source.keys(), MLX_SUFFIXES)
        if not groups:
            raise InspectError(f"{source.path}: no lora_a/lora_b pairs found")
        modules = []
        for name in sorted(groups):
            # mlx's scale is absolute: express it as PEFT's α = scale·r so that α/r = scale
            r = source.info(groups[name]["A"]).shape[-1] if "A" in groups[name] else 0
            mod, _ = build_module(name, groups[name], source, orient=MLX, alpha=scale * max(r, 1))
            mod.scale = scale
            modules.append(mod)
        ranks = Counter(m.rank for m in modules)
        if want is not None and set(ranks) != {want}:
            raise InspectError(f"{where}: lora_parameters.rank is {want} but the tensors have ranks {sorted(ranks)}")
        return Adapter(
            path=found.shown, format=MlxFormat.MLX, weights_path=source.path, source=source, modules=modules,
            extras=sorted(rest), config=found.config, config_path=found.config_path,
            r=ranks.most_common(1)[0][0], alpha=None, use_dora=ftt == "dora" or any(m.is_dora for m in modules),
            base_model=v.string(found.config or {}, "model", where), notes=notes,
        )

    # ------------------------------------------------------------------ rewriting
    def convert_tensors(self, canon: "Canon", opts: WriteOptions) -> "Written":
        from .mlx_out import write_mlx

        return write_mlx(canon, opts, self.caps)

    def output_format(self, ad: Adapter, out: Path) -> Format:
        if out.suffix in (".safetensors", ".bin"):
            raise InspectError(f"{out}: an mlx-lm adapter is a directory, so OUT must not end in {out.suffix}; "
                               "name a directory")
        return MlxFormat.MLX

    def global_alpha(self, ad: Adapter) -> float | None:
        raise InspectError(f"{ad.path}: mlx-lm adapters have an absolute scale, not an alpha",
                           hint="give a factor instead", option="factor")

    def _config(self, ad: Adapter, **lp_changes: float | int) -> dict:
        config: dict[str, Any] = copy.deepcopy(ad.config) if ad.config is not None else {"fine_tune_type": "lora"}
        lp: dict[str, Any] = dict(config.get("lora_parameters") or {})
        lp.update(lp_changes)
        config["lora_parameters"] = lp
        return config

    def truncated(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        # mlx-lm's scale is absolute: the old one is baked into the factors
        return Rewrite(out_fmt, tensors, dict(ad.metadata), self._config(ad, rank=int(max(ranks.values())), scale=1.0))

    def rescaled(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], factor: float) -> Rewrite:
        return Rewrite(out_fmt, tensors, dict(ad.metadata), self._config(ad, scale=float(ad.modules[0].scale * factor)))

    def baked(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray]) -> Rewrite:
        return Rewrite(out_fmt, tensors, dict(ad.metadata), ad.config)

    def weights_name(self, ad: Adapter) -> str:
        return WEIGHTS
