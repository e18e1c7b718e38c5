"""``check --applied diffusers`` with diffusers' own code: the adapter's tensors go through the pipeline's
``lora_state_dict`` (which dispatches to diffusers' converters: ``_convert_non_diffusers_lora_to_diffusers`` for
kohya SD/SDXL files, ``_convert_kohya_flux_lora_to_diffusers`` for kohya Flux, …), then through the renaming its
loaders do (``load_lora_adapter`` in ``diffusers/loaders/peft.py``: the component prefix filtered off,
``convert_unet_state_dict_to_peft``; text encoders: ``_load_lora_into_text_encoder`` in
``diffusers/loaders/lora_base.py``), and the LoRA scale PEFT gives each module (``get_peft_kwargs`` in
``diffusers/utils/peft_utils.py``, then ``peft.tuners.lora.model.LoraModel._create_and_replace``: rank and α by
``get_pattern_key``). Nothing is loaded into a model.

Each tensor is tagged with the keys it came from (a ``torch.Tensor`` subclass whose ``__torch_function__``
carries the union of its inputs' tags into every output: scaling, splitting a fused qkv, concatenation), so
every converted tensor names its source keys, and every source key that reaches no loaded module is named:

- dropped by the converter (``dora_scale`` filtered out, SGM keys discarded when a file mixes SGM and diffusers
  names, text-encoder keys Flux's converter leaves aside);
- left unconverted: under no component the pipeline loads (``load_lora_weights`` keeps only ``unet.``,
  ``text_encoder.``, … keys: diffusers#9291, a kohya Flux LoRA that loaded with no effect and no error);
- converted to a module the base does not have (``--base``: PEFT ignores it with a warning).

A converter or loader error (``The following keys have not been correctly renamed``, ``Incompatible keys
detected``, ``Invalid LoRA checkpoint``) refuses the whole adapter. A module whose keys all load but at another
strength than the file's (‖ΔW‖²_F of what PEFT applies, from the converted factors and PEFT's scale, against the
file's), or without its DoRA magnitude, is **altered**. Imports of torch and diffusers stay inside functions.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import validate
from ..errors import InspectError
from ..optional import require

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..basecheckpoint import BaseCheckpoint

__all__ = ["Converted", "LoadedModule", "BaseNames", "diffusers_version", "convert_like_diffusers",
           "base_module_names"]

BaseNames = dict[str, dict[str, tuple[int, ...]]]  # component → module path → its weight's shape

TAG = "_lora_inspect_keys"  # the attribute a traced tensor keeps its source keys in
_ROLES = (".lora_A", ".lora_B", ".lora_magnitude_vector", ".lokr_", ".lora_embedding_")
_TE_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")  # lora_base.py: the TE rank dict
_FLUX_MARKS = ("double_blocks", "single_blocks", "single_transformer_blocks", "lora_transformer_", "transformer.")
_ALL_LORA = ("StableDiffusionLoraLoaderMixin", "StableDiffusionXLLoraLoaderMixin")  # all keys must say "lora"


def diffusers_version() -> str | None:
    """diffusers' version when it and peft (its LoRA backend) import, else None."""
    try:
        mod = importlib.import_module("diffusers")
        importlib.import_module("peft")
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "?"))


@functools.lru_cache(maxsize=1)
def _traced_type() -> Any:
    import torch

    class Traced(torch.Tensor):
        """A tensor that carries the source keys of every tensor it was computed from."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tags = frozenset().union(*(getattr(t, TAG, frozenset()) for t in _tensors((args, kwargs))))
            out = super().__torch_function__(func, types, args, kwargs)
            if tags:
                for t in _tensors(out):
                    if isinstance(t, Traced):
                        setattr(t, TAG, getattr(t, TAG, frozenset()) | tags)
            return out

    return Traced


def _tensors(x: Any) -> Iterator[Any]:
    import torch

    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _traced_state_dict(ad: "Adapter") -> dict[str, Any]:
    """Every tensor of the adapter's file as a torch tensor tagged with its own key (bf16 read as float32)."""
    import torch

    traced = _traced_type()
    out = {}
    for key in ad.source.tensors:
        t = torch.from_numpy(np.array(ad.source.get(key))).as_subclass(traced)
        setattr(t, TAG, frozenset({key}))
        out[key] = t
    return out


@dataclass
class LoadedModule:
    """One module as diffusers' loader holds it after conversion: its tensors by role (``lora_A.weight`` …)."""

    component: str
    name: str  # the module path inside the component, as PEFT looks it up
    tensors: dict[str, Any] = field(default_factory=dict)
    scale: float | None = None  # PEFT's α/r (α/√r with rsLoRA); None: not a plain LoRA pair
    rank_error: str = ""  # the rank PEFT builds the layer with differs from the tensors' (the load fails)

    @property
    def full_name(self) -> str:
        return f"{self.component}.{self.name}"

    @functools.cached_property
    def sources(self) -> frozenset[str]:
        """The source keys its tensors were made from (read once the loader's renaming is done)."""
        return frozenset().union(*(getattr(t, TAG, frozenset()) for t in self.tensors.values()))

    def energy(self) -> float | None:
        """‖s·B·A‖²_F in float64 = s²·Σ (BᵀB ⊙ AAᵀ) (no dense product)."""
        a, b = self.tensors.get("lora_A.weight"), self.tensors.get("lora_B.weight")
        if a is None or b is None or self.scale is None or b.ndim < 2 or b.shape[1] != a.shape[0]:
            return None
        a64 = a.detach().double().reshape(a.shape[0], -1).numpy()
        b64 = b.detach().double().reshape(b.shape[0], b.shape[1]).numpy()
        return float(self.scale ** 2 * np.sum((b64.T @ b64) * (a64 @ a64.T)))


@dataclass
class Converted:
    """What diffusers' loader makes of an adapter: the modules each component loads, the converted keys no
    component loads (with their source keys), or why the whole load fails."""

    pipeline: str  # the loader mixin whose lora_state_dict ran
    how: str  # how the pipeline was chosen (for the report)
    modules: list[LoadedModule] = field(default_factory=list)
    stray: dict[str, frozenset[str]] = field(default_factory=dict)  # converted key of no component → source keys
    odd: dict[str, frozenset[str]] = field(default_factory=dict)  # a component's key of no LoRA role → source keys
    refused: str | None = None


def _one_line(e: BaseException) -> str:
    """The error as one line (diffusers puts the offending keys on the lines after the first)."""
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _mixin_of(cls: type) -> type | None:
    return next((c for c in cls.__mro__ if c.__name__.endswith("LoraLoaderMixin") and "lora_state_dict" in vars(c)),
                None)


def _pipeline(ad: "Adapter", base: "BaseCheckpoint | None") -> tuple[type | None, str]:
    """The loader mixin of the base's pipeline (``model_index.json`` ``_class_name``), else one guessed from the
    keys: Flux for Flux/transformer names, else SDXL (it loads unet, text_encoder and text_encoder_2)."""
    lora_pipeline = require("diffusers.loaders.lora_pipeline", "check --applied diffusers")

    index = base.path / "model_index.json" if base is not None and base.path.is_dir() else None
    name = None
    if index is not None and index.is_file():
        name = validate.string(validate.read_json_object(index), "_class_name", str(index))
    if name is not None:
        try:
            cls = getattr(importlib.import_module("diffusers"), name, None)
        except Exception:  # a pipeline module that does not import here (a missing optional dependency)
            cls = None
        mixin = _mixin_of(cls) if isinstance(cls, type) else None
        return mixin, f"{name}'s loader" if mixin is not None else f"{name}: no diffusers pipeline with a LoRA loader"
    flux = any(mark in k for k in ad.source.tensors for mark in _FLUX_MARKS)
    mixin = lora_pipeline.FluxLoraLoaderMixin if flux else lora_pipeline.StableDiffusionXLLoraLoaderMixin
    return mixin, f"{mixin.__name__}, guessed from the keys"


def _unet_config(base: "BaseCheckpoint | None") -> tuple[Any, str]:
    """What SDXL's ``load_lora_weights`` passes as ``unet_config`` (only ``layers_per_block`` is read, by
    ``_maybe_map_sgm_blocks_to_diffusers``): the base's ``unet/config.json``, else SD/SDXL's 2."""
    cfg = base.path / "unet" / "config.json" if base is not None and base.path.is_dir() else None
    if cfg is not None and cfg.is_file():
        n = validate.integer(validate.read_json_object(cfg), "layers_per_block", str(cfg), default=2, minimum=1)
        return SimpleNamespace(layers_per_block=n), ""
    return SimpleNamespace(layers_per_block=2), "; SGM block names mapped with layers_per_block = 2 (SD/SDXL)"


def _lora_state_dict(mixin: type, sd: dict[str, Any], base: "BaseCheckpoint | None") -> tuple[dict, dict | None, str]:
    """``mixin.lora_state_dict`` as the pipeline's ``load_lora_weights`` calls it."""
    import inspect

    kwargs: dict[str, Any] = {}
    note = ""
    if mixin.__name__ == "StableDiffusionXLLoraLoaderMixin":
        kwargs["unet_config"], note = _unet_config(base)
        if not any(p in k for k in sd for p in ("input_blocks", "middle_block", "output_blocks")):
            note = ""
    if "return_alphas" in inspect.signature(mixin.lora_state_dict).parameters:  # type: ignore[attr-defined]
        kwargs["return_alphas"] = True
    got = mixin.lora_state_dict(dict(sd), **kwargs)  # type: ignore[attr-defined]
    state, alphas = (got[0], got[1] if len(got) > 1 else None) if isinstance(got, tuple) else (got, None)
    return dict(state), alphas, note


@functools.lru_cache(maxsize=1)
def _flat_clip() -> bool:
    """transformers ≥ 5 builds ``CLIPTextModel`` without ``text_model``; diffusers then strips ``text_model.``
    from the LoRA keys (lora_base.py ``_load_lora_into_text_encoder``), and the checkpoint's keys load flat."""
    import torch

    try:
        tf = require("transformers", "check --applied diffusers")
    except InspectError:  # no transformers: no CLIP to load into; the names are compared as written
        return False
    CLIPTextConfig, CLIPTextModel = tf.CLIPTextConfig, tf.CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         max_position_embeddings=4, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.device("meta"):
        return not hasattr(CLIPTextModel(cfg), "text_model")


def _component_state(conv: dict[str, Any], comp: str) -> dict[str, Any]:
    """The keys ``comp``'s loader keeps, renamed as it renames them."""
    du = require("diffusers.utils", "check --applied diffusers")
    convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft = (
        du.convert_state_dict_to_diffusers, du.convert_state_dict_to_peft, du.convert_unet_state_dict_to_peft)

    part = {k[len(comp) + 1:]: v for k, v in conv.items() if k.startswith(comp + ".")}
    if not part:
        return part
    if comp.startswith("text_encoder"):
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        return {k.removeprefix("text_model."): v for k, v in part.items()} if _flat_clip() else part
    return part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)


def _lora_config(comp: str, part: dict[str, Any], alphas: dict | None, meta: dict | None) -> dict[str, Any]:
    """The LoraConfig arguments diffusers builds for ``comp`` (the file's LoRA metadata when it has some)."""
    get_peft_kwargs = require("diffusers.utils.peft_utils", "check --applied diffusers").get_peft_kwargs

    own = {k[len(comp) + 1:]: v for k, v in (meta or {}).items() if k.startswith(comp + ".")}
    if own:
        return own
    te = comp.startswith("text_encoder")
    if not te and any(".lokr_" in k for k in part):  # load_lora_adapter builds a LoKr config instead: no LoRA scale
        return {}
    if te:
        rank = {k: v.shape[1] for k, v in part.items() if k.endswith(".lora_B.weight")
                and k.removesuffix(".lora_B.weight").endswith(_TE_TARGETS)}
    else:
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
    comp_alphas = {k[len(comp) + 1:]: v for k, v in (alphas or {}).items() if k.startswith(comp + ".")} or None
    return dict(get_peft_kwargs(rank, comp_alphas, part, is_unet=not te))


def _scale(cfg: dict[str, Any], name: str, m: LoadedModule) -> None:
    """PEFT's scale for module ``name`` (``LoraModel._create_and_replace``, ``LoraLayer.update_layer``)."""
    get_pattern_key = require("peft.utils.other", "check --applied diffusers").get_pattern_key

    if not cfg:
        return
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(list(ranks), name), cfg.get("r", 8))
    alpha = alphas.get(get_pattern_key(list(alphas), name), cfg.get("lora_alpha", 8))
    b = m.tensors.get("lora_B.weight")
    if b is not None and b.ndim >= 2 and b.shape[1] != r:
        m.rank_error = f"PEFT builds {m.full_name} at rank {r}, the tensors have rank {b.shape[1]} (the load fails)"
    if "lora_magnitude_vector" in m.tensors or not r:
        return
    m.scale = float(alpha) / (float(r) ** 0.5 if cfg.get("use_rslora") else float(r))


def _group(comp: str, part: dict[str, Any]) -> tuple[list[LoadedModule], dict[str, Any]]:
    """Modules by name (what precedes ``.lora_A`` …), and the keys that name no LoRA role (unexpected keys)."""
    mods: dict[str, LoadedModule] = {}
    odd = {}
    for key, t in part.items():
        cut = min((key.find(r) for r in _ROLES if r in key), default=-1)
        if cut <= 0:
            odd[f"{comp}.{key}"] = t
            continue
        name = key[:cut]
        mods.setdefault(name, LoadedModule(comp, name)).tensors[key[cut + 1:]] = t
    return list(mods.values()), odd


def _metadata(ad: "Adapter") -> dict | None:
    raw = (ad.source.metadata or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    doc = validate.parse_json(raw, f"{ad.source.path}: metadata lora_adapter_metadata")
    if not isinstance(doc, dict):
        raise InspectError(f"{ad.source.path}: metadata lora_adapter_metadata is not a JSON object")
    return doc


def convert_like_diffusers(ad: "Adapter", base: "BaseCheckpoint | None") -> Converted:
    """Run diffusers' own conversion and loader renaming on ``ad``'s tensors (module docstring); diffusers'
    own log lines are held back (the report names what they would say)."""
    dlog = require("diffusers.utils.logging", "check --applied diffusers")

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return _convert(ad, base)
    finally:
        dlog.set_verbosity(level)


def _convert(ad: "Adapter", base: "BaseCheckpoint | None") -> Converted:
    mixin, how = _pipeline(ad, base)
    if mixin is None:
        return Converted("-", how, refused=f"{how}: load_lora_weights does not exist")
    out = Converted(mixin.__name__, how)
    try:
        conv, alphas, note = _lora_state_dict(mixin, _traced_state_dict(ad), base)
    except Exception as e:  # diffusers' converters raise ValueError, KeyError, IndexError … on what they cannot read
        out.refused = f"diffusers' conversion fails: {_one_line(e)}"
        return out
    out.how += note
    need_all = mixin.__name__ in _ALL_LORA
    if conv and not (all if need_all else any)("lora" in k for k in conv):
        out.refused = "Invalid LoRA checkpoint: a key without 'lora' after conversion (load_lora_weights raises)"
        return out
    comps = list(getattr(mixin, "_lora_loadable_modules", []))
    meta = _metadata(ad)
    for comp in comps:
        try:  # the loader's renaming and LoraConfig raise on what they cannot read (the load fails)
            part = _component_state(conv, comp)
            cfg = _lora_config(comp, part, alphas, meta) if part else {}
        except Exception as e:
            out.refused = f"diffusers' loader fails on {comp}: {_one_line(e)}"
            return out
        if not part:
            continue
        mods, odd = _group(comp, part)
        for m in mods:
            _scale(cfg, m.name, m)
        out.modules += mods
        out.odd.update({k: getattr(t, TAG, frozenset()) for k, t in odd.items()})
    for key, t in conv.items():
        if not any(key.startswith(c + ".") for c in comps):
            out.stray[key] = getattr(t, TAG, frozenset())
    return out


def base_module_names(base: "BaseCheckpoint") -> BaseNames:
    """Component → module path (``X`` of ``comp.X.weight``, as the loaded model names it: text encoders flat
    when transformers builds them flat) → the weight's shape."""
    out: BaseNames = {}
    for key, (p, file_key) in base.files.items():
        if not key.endswith(".weight") or "." not in key:
            continue
        comp, path = key[: -len(".weight")].split(".", 1)
        if comp.startswith("text_encoder") and _flat_clip():
            path = path.removeprefix("text_model.")
        out.setdefault(comp, {})[path] = tuple(base.source(p).tensors[file_key].shape)
    return out
