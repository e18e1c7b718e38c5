"""Readers and writers for every adapter layout, behind one function: :func:`load_adapter`.

:func:`load_adapter` locates the weights (and a config beside them); the layout is then chosen
from :data:`LAYOUTS`, an ordered list of :class:`~lora_inspect.formats.layout.Layout` plug-ins
tried first-match-wins on the key names and the config (as PEFT's dispatchers). Only the header
is read; tensor data stays memory-mapped until a module's factors are asked for. Adding a layout
is one file in this package and one line in :data:`LAYOUTS`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..adapter import Adapter
from ..errors import InspectError
from ..validate import require_regular_file
from .diffusers import DiffusersLayout
from .diffusers_attn import DiffusersAttnProcsLayout
from .kohya import KohyaLayout
from .layout import Capabilities, Found, Layout
from .lycoris import LycorisLayout
from .mlx import MlxLayout
from .peft import PeftLayout, read_config
from .peft_lycoris import PeftLycorisLayout
from .tensors import TensorSource, open_tensors

__all__ = ["load_adapter", "detect_format", "LAYOUTS", "Layout", "Capabilities", "layout_named",
           "ADAPTER_MARKERS"]

# Tried in order, first match wins (as PEFT's dispatchers). A new layout: one file, one line here.
LAYOUTS: list[Layout] = [
    LycorisLayout(),  # any LyCORIS-only key (hada_, lokr_, lora_mid, dora_scale, diff …); plain LoCon stays kohya
    KohyaLayout(),
    MlxLayout(),
    DiffusersLayout(),  # only without a config beside the file: with one, PEFT reads it
    DiffusersAttnProcsLayout(),
    PeftLycorisLayout(),  # a config with peft_type LOHA/LOKR: PEFT's keys and scale rules
    PeftLayout(),
]

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# a directory holding one of these is an adapter (--force may replace it; nothing else)
ADAPTER_MARKERS: tuple[str, ...] = tuple(dict.fromkeys(f for layout in LAYOUTS for f in layout.marker_files))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# PeftModel.state_dict() keeps the adapter name: ….lora_A.default.weight, ….lora_embedding_A.default
_ADAPTER_NAMED = re.compile(r"\.lora_(?:A|B)\.[^.]+\.weight$|\.lora_embedding_(?:A|B)\.[^.]+$")


def layout_named(fmt: str) -> Layout:
    """The layout that produces the format string ``fmt`` (``peft-bin`` → the PEFT layout)."""
    for layout in LAYOUTS:
        if fmt in layout.formats:
            return layout
    raise InspectError(f"no layout writes format {fmt!r}")


def _layout_for(keys: list[str], found: Found) -> Layout | None:
    return next((layout for layout in LAYOUTS if layout.matches(keys, found)), None)


def _from_file(found: Found) -> Adapter:
    path = found.weights
    source = open_tensors(path)
    keys = source.keys()
    if not keys:
        raise InspectError(f"{path}: the file holds no tensors")
    layout = _layout_for(keys, found)
    if layout is not None:
        try:
            ad = layout.read(source, found)
        except InspectError as e:  # inner messages name the module; the user also needs the file
            raise e.located(found.shown) from e
        ad.layout = layout
        return ad
    named = next((k for k in keys if _ADAPTER_NAMED.search(k)), None)
    if named is not None:
        raise InspectError(
            f"{path}: keys carry a PEFT adapter name ({named!r}): this is PeftModel.state_dict(), not what "
            "save_pretrained writes (PEFT would load it as a silent no-op); save the adapter with "
            "model.save_pretrained(DIR) or peft.get_peft_model_state_dict(model)"
        )
    sample = ", ".join(repr(k) for k in keys[:3])
    raise InspectError(
        f"{path}: no LoRA layout recognised from its keys ({sample}…): expected PEFT (lora_A/lora_B), kohya "
        "(lora_down/lora_up), diffusers or mlx-lm (lora_a/lora_b) names"
    )


def detect_format(source: TensorSource) -> str | None:
    """The name of the first layout whose detection accepts ``source``'s keys (no config assumed)."""
    layout = _layout_for(source.keys(), Found(source.path, source.path))
    return None if layout is None else layout.name


def _named_adapter_dirs(p: Path) -> list[str]:
    return sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "adapter_config.json").is_file())


def _refuse_special(*paths: Path) -> None:
    """A file an adapter is known by (adapter_config.json …) that exists but is not a regular file (a
    FIFO, a directory, a dangling link) is named as such, not reported missing."""
    for q in paths:
        if os.path.lexists(q) and not q.is_file():
            require_regular_file(q)


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter directory or file (header only; tensors are read lazily)."""
    p = Path(path)
    if not p.exists():
        if os.path.lexists(p):
            raise InspectError(f"{p}: a symbolic link that leads nowhere (dangling, or a loop)")
        raise InspectError(f"{p}: no such file or directory")
    if p.is_file() and p.name in ("adapter_config.json",):
        p = p.parent
    if p.is_dir():
        return _from_directory(p)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise InspectError(f"{p}: not an adapter file (expected .safetensors or .bin, or a directory)")
    side = p.parent / "adapter_config.json"
    _refuse_special(side)
    if side.is_file():
        return _from_file(Found(p, p, read_config(side), side))
    return _from_file(Found(p, p))


def _from_directory(p: Path) -> Adapter:
    """An mlx-lm or PEFT directory by its marker files, else the one weight file in it."""
    cfg_path = p / "adapter_config.json"
    _refuse_special(cfg_path, p / "adapters.safetensors", *(p / n for n in PEFT_WEIGHTS))
    if (p / "adapters.safetensors").is_file():  # mlx-lm
        cfg = read_config(cfg_path) if cfg_path.is_file() else None
        return _from_file(Found(p / "adapters.safetensors", p, cfg, cfg_path if cfg is not None else None))
    for name in PEFT_WEIGHTS:
        if (p / name).is_file():
            if not cfg_path.is_file():
                raise InspectError(f"{p}: has {name} but no adapter_config.json (copy it from the training run)")
            ad = _from_file(Found(p / name, p, read_config(cfg_path), cfg_path))
            subs = _named_adapter_dirs(p)
            if subs:  # save_pretrained of several adapters: "default" here, the others in subfolders
                ad.notes.append(f"{len(subs)} more adapters in subfolders ({', '.join(subs[:5])}"
                                f"{' …' if len(subs) > 5 else ''}): only the top-level one is read here")
            return ad
    if cfg_path.is_file():
        raise InspectError(f"{p}: has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")
    weights = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if len(weights) == 1:
        return _from_file(Found(weights[0], weights[0]))
    if weights:
        raise InspectError(f"{p}: {len(weights)} weight files here; name the one to read")
    subs = _named_adapter_dirs(p)
    if subs:  # save_pretrained of a PeftModel with several adapters: one subfolder per named adapter
        raise InspectError(
            f"{p}: no adapter at the top level, but adapters in subfolders: {', '.join(subs[:5])}"
            + (" …" if len(subs) > 5 else "") + f"; name one (e.g. {p / subs[0]})"
        )
    raise InspectError(f"{p}: no adapter here (no adapter_config.json, adapters.safetensors or .safetensors file)")
