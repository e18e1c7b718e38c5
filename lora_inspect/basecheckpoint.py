"""Base checkpoints: the weights W of a base model, read only for the modules an adapter adapts.

Not to be confused with :mod:`lora_inspect.basemodels`, which describes a base model by a few
numbers from its ``config.json`` or a preset (for ``footprint`` and ``check --base``, no weights).

What is read (``docs/metrics.md``, "Base-aware metrics"):

- a Hugging Face model directory: ``config.json`` with ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json`` (``weight_map``), or this project's training base
  (``format`` = ``lora-inspect/model/1``, e.g. ``samples/planted/base``, same key names);
- a diffusers pipeline directory (``model_index.json``; ``unet/``, ``text_encoder/``,
  ``text_encoder_2/``, ``transformer/`` each a model directory as above);
- a single ``.safetensors`` file.

Headers go through the project's validated reader (:mod:`lora_inspect.formats.tensors`); tensor data
is memory-mapped and only the adapted modules' weights are read. Refused with one line: ``.bin``
/ ``.pt`` bases (a pickle is read whole into memory, never memory-mapped: convert it to
safetensors), GGUF files, and quantised bases (``quantization_config`` in ``config.json``, or an
integer-typed / packed weight such as bitsandbytes' ``.SCB`` / ``.absmax`` or GPTQ/AWQ ``.qweight``).

Names: a PEFT module ``X`` (``base_model.model.`` already stripped) reads ``X.weight``; when the
checkpoint lacks a leading component (``transformer.``, ``model.``) the shortest suffix that exists
is used. kohya names (``lora_unet_…``, ``lora_te1_…``) are matched by rebuilding kohya's name from
every base key (``prefix + key.replace(".", "_")``, as sd-scripts names its modules).
Orientation: W is returned as a 2-D (out, in) matrix matching :attr:`Module.shape` — a conv weight
flattened to (out, in·kh·kw), an embedding as stored (num_embeddings, dim), a GPT-2 ``Conv1D``
weight (stored (in, out)) transposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import validate
from .errors import InspectError
from .formats.tensors import SafetensorsSource, TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import DTypeLike

    from .adapter import Adapter, Module

__all__ = ["BaseCheckpoint", "BaseTensor", "open_base_checkpoint", "QUANTISED_MARKERS", "LDM_PREFIXES", "GPT2_CONV1D",
           "FLOAT_DTYPES"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
PICKLE_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")
# diffusers pipeline component → the name prefixes that address it (PEFT-style names / kohya names)
COMPONENTS = {
    "unet": ("unet.", "lora_unet_"),
    "transformer": ("transformer.", "lora_transformer_"),
    "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_"),
    "text_encoder_2": ("text_encoder_2.", "lora_te2_"),
}
# key suffixes that betray a quantised checkpoint (bitsandbytes int8 / 4-bit, GPTQ, AWQ, HQQ)
QUANTISED_MARKERS = (".SCB", ".weight_format", ".absmax", ".quant_map", ".quant_state", ".qweight", ".qzeros",
                     ".scales", ".g_idx", ".W_q")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "attn.q_attn")


@dataclass(frozen=True)
class BaseTensor:
    """Where one base weight lives: the file, its key and header entry (the cache key of its basis)."""

    path: Path
    key: str  # the key inside the file
    info: TensorInfo
    transposed: bool  # stored (in, out): GPT-2 Conv1D
    name: str = ""  # the checkpoint-wide key (a diffusers component prefixed: ``unet.conv_in.weight``)

    @property
    def cache_key(self) -> tuple:
        st = self.path.stat()
        return (str(self.path.resolve()), self.key, self.info.offset, self.info.nbytes, st.st_mtime_ns, self.transposed)


@dataclass
class BaseCheckpoint:
    """A base model's weights: key → file, sources opened (headers parsed) only when first needed."""

    path: Path
    files: dict[str, tuple[Path, str]]  # base key (component prefix included) → (safetensors file, key in it)
    config: dict[str, Any] | None = None
    model_type: str | None = None
    _sources: dict[Path, SafetensorsSource] = field(default_factory=dict, repr=False)
    _kohya: dict[str, str] | None = field(default=None, repr=False)

    def source(self, p: Path) -> SafetensorsSource:
        if p not in self._sources:
            self._sources[p] = SafetensorsSource(p)
        return self._sources[p]

    def _kohya_names(self) -> dict[str, str]:
        """kohya module name → base key, built once from every key (sd-scripts: prefix + name with '_')."""
        if self._kohya is None:
            out: dict[str, str] = {}
            for key in self.files:
                if not key.endswith(".weight"):
                    continue
                stem = key[: -len(".weight")]
                for comp, prefixes in COMPONENTS.items():
                    if stem.startswith(comp + "."):
                        for pre in prefixes[1:]:
                            out[pre + stem[len(comp) + 1:].replace(".", "_")] = key
                        break
                else:
                    for ldm, pre in LDM_PREFIXES:
                        if stem.startswith(ldm):
                            out[pre + stem[len(ldm):].replace(".", "_")] = key
            self._kohya = out
        return self._kohya

    def key_for(self, name: str) -> str | None:
        """The base key holding module ``name``'s weight, or None."""
        if name.startswith(("lora_unet_", "lora_te", "lora_transformer_")):
            return self._kohya_names().get(name)
        parts = name.split(".")
        for i in range(len(parts)):  # X.weight, then without leading components (model., transformer.)
            key = ".".join(parts[i:]) + ".weight"
            if key in self.files:
                return key
        for i in range(len(parts)):  # a PEFT-wrapped base (base_layer)
            key = ".".join(parts[i:]) + ".base_layer.weight"
            if key in self.files:
                return key
        return None

    def locate(self, module: Module, fan_in_fan_out: bool = False) -> BaseTensor:
        """The base tensor of ``module``, checked: it exists, is a float tensor, and its shape is the
        module's (out, in) (conv flattened; Conv1D transposed)."""
        key = self.key_for(module.name)
        if key is None:
            raise InspectError(f"{self.path}: the base has no weight for module {module.name!r} "
                               "(adapter and base do not match)")
        p, file_key = self.files[key]
        info = self.source(p).tensors.get(file_key)
        if info is None:
            raise InspectError(f"{p}: no tensor named {file_key!r} (the index lists it in this file)")
        if info.dtype not in FLOAT_DTYPES:
            raise InspectError(f"{p}: tensor {file_key!r} is {info.dtype}: a quantised base is not supported "
                               "(use the unquantised checkpoint)")
        transposed = self._conv1d(module, fan_in_fan_out)
        shape = _flat_shape(info.shape)
        if transposed and shape is not None:
            shape = (shape[1], shape[0])
        if shape != tuple(module.shape):
            raise InspectError(f"{p}: module {module.name!r}: base weight {file_key!r} has shape "
                               f"{'×'.join(map(str, info.shape))}, the adapter's update is "
                               f"{'×'.join(map(str, module.shape))} (adapter and base do not match)")
        return BaseTensor(p, file_key, info, transposed, key)

    def _conv1d(self, module: Module, fan_in_fan_out: bool) -> bool:
        if module.kind != "linear":
            return False
        if fan_in_fan_out:
            return True
        return self.model_type == "gpt2" and module.name.endswith(GPT2_CONV1D)

    def weight(self, bt: BaseTensor, dtype: DTypeLike | None = None) -> np.ndarray:
        """W as a 2-D (out, in) matrix (memory-mapped read, converted to ``dtype``; default float32).
        Read-only when the stored dtype is already ``dtype`` (a view of the memory map): copy before
        writing into it."""
        w = self.source(bt.path).get(bt.key)
        w = w.reshape(w.shape[0], -1) if w.ndim != 2 else w
        if bt.transposed:
            w = w.T
        return w.astype(dtype or np.float32, copy=False)

    def check(self, adapter: Adapter, modules: list[Module] | None = None) -> list[BaseTensor]:
        """The base tensor of each of ``modules`` (default: all the adapter's), in order; the first
        mismatch (a missing weight, a non-float dtype, another shape) is one line naming the module."""
        ff = (adapter.config or {}).get("fan_in_fan_out", False) is True
        return [self.locate(m, ff) for m in (adapter.modules if modules is None else modules)]


LDM_PREFIXES = (  # single-file Stable Diffusion checkpoints (original layout) → kohya prefixes
    ("model.diffusion_model.", "lora_unet_"),
    ("cond_stage_model.transformer.", "lora_te_"),
    ("conditioner.embedders.0.transformer.", "lora_te1_"),
)


def _flat_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) < 2:
        return None
    n = 1
    for d in shape[1:]:
        n *= d
    return (shape[0], n)


def _refuse_file(p: Path) -> None:
    suffix = p.suffix.lower()
    if suffix == ".gguf":
        raise InspectError(f"{p}: GGUF bases are not supported (quantised llama.cpp weights); "
                           "use the Hugging Face safetensors checkpoint")
    if suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise InspectError(f"{p}: pickled bases are not read (a pickle is loaded whole, never memory-mapped); "
                           "convert the checkpoint to .safetensors")


def _read_config(d: Path) -> dict[str, Any] | None:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = validate.read_json_object(cfg_path)
    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        what = validate.show_value(method) if method is not None else "a quantization_config"
        raise InspectError(f"{cfg_path}: quantised base ({what}: bitsandbytes/GPTQ/AWQ weights are not supported); "
                           "use the unquantised checkpoint")
    return cfg


def _model_dir_files(d: Path, prefix: str = "") -> dict[str, tuple[Path, str]]:
    """key → file for one model directory (sharded with an index, or one safetensors file)."""
    index = d / INDEX_NAME
    if index.is_file():
        doc = validate.read_json_object(index)
        wmap = validate.mapping(doc, "weight_map", str(index), values=lambda v: isinstance(v, str),
                                 what="file names")
        out: dict[str, tuple[Path, str]] = {}
        root = d.resolve()
        for key, fname in wmap.items():
            p = (d / fname)
            if root not in p.resolve().parents or not fname.endswith(".safetensors"):
                raise InspectError(f"{index}: weight_map[{key!r}] = {fname!r} is not a .safetensors file "
                                   f"inside {d}")
            out[prefix + key] = (p, key)
        return out
    for name in SINGLE_NAMES:
        if (d / name).is_file():
            return _file_keys(d / name, prefix)
    shards = sorted(d.glob("*.safetensors"))
    if len(shards) == 1:
        return _file_keys(shards[0], prefix)
    for name in PICKLE_NAMES:
        if (d / name).is_file():
            _refuse_file(d / name)
    if list(d.glob("*.gguf")):
        _refuse_file(next(d.glob("*.gguf")))
    why = f"{len(shards)} .safetensors files but no {INDEX_NAME}" if shards else "no .safetensors weights"
    raise InspectError(f"{d}: not a base checkpoint ({why})")


def _file_keys(p: Path, prefix: str = "") -> dict[str, tuple[Path, str]]:
    return {prefix + k: (p, k) for k in SafetensorsSource(p).tensors}


def _check_quantised_keys(path: Path, files: dict[str, tuple[Path, str]]) -> None:
    for key, (p, file_key) in files.items():
        if key.endswith(QUANTISED_MARKERS):
            raise InspectError(f"{p}: tensor {file_key!r} belongs to a quantised checkpoint "
                               "(bitsandbytes/GPTQ/AWQ weights are not supported); use the unquantised checkpoint")


def open_base_checkpoint(spec: str | Path) -> BaseCheckpoint:
    """A base checkpoint from a directory or a ``.safetensors`` file (see the module docstring).
    Headers are read now (the index, or the single file's header); shards when first needed."""
    p = Path(spec)
    if not p.exists():
        raise InspectError(f"{p}: no such file or directory (base checkpoint)")
    if p.is_file():
        _refuse_file(p)
        validate.require_regular_file(p)
        files = _file_keys(p)
        _check_quantised_keys(p, files)
        return BaseCheckpoint(p, files)
    if (p / "model_index.json").is_file():  # a diffusers pipeline
        files = {}
        for comp in COMPONENTS:
            if (p / comp).is_dir():
                _read_config(p / comp)
                files.update(_model_dir_files(p / comp, comp + "."))
        if not files:
            raise InspectError(f"{p}: a diffusers pipeline without unet/, transformer/ or text_encoder/ weights")
        _check_quantised_keys(p, files)
        return BaseCheckpoint(p, files)
    cfg = _read_config(p)
    files = _model_dir_files(p)
    _check_quantised_keys(p, files)
    mt = cfg.get("model_type") if cfg else None
    return BaseCheckpoint(p, files, cfg, mt if isinstance(mt, str) else None)
