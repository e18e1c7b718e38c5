"""Readers and writers for every adapter layout, behind one function: :func:`load_adapter`.

:func:`load_adapter` locates the weights (and a config beside them); the layout is then chosen
from :data:`LAYOUTS`, an ordered list of :class:`~lora_inspect.formats.layout.Layout` plug-ins
tried first-match-wins on the key names and the config (as PEFT's dispatchers). Only the header
is read; tensor data stays memory-mapped until a module's factors are asked for. Everything else
about the formats is derived from that one list: the marker files of an adapter directory
(:data:`ADAPTER_MARKERS`), the weight-file suffixes, and the ``convert``/``merge`` targets
(:data:`TARGETS`, :data:`MERGE_TARGETS`, :func:`layout_for_target`). Adding a layout is one file in
this package and one line in :data:`LAYOUTS` (:mod:`.layout`: how to add a layout).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..adapter import Adapter
from ..errors import InspectError
from ..files import check_output_path
from ..validate import require_regular_file
from .diffusers import DiffusersLayout
from .diffusers_attn import DiffusersAttnProcsLayout
from .gguf_read import GgufReadLayout
from .kohya import KohyaLayout
from .layout import Capabilities, Format, Found, Held, Layout
from .lycoris import LycorisLayout
from .mlx import MlxLayout
from .peft import PeftLayout, read_config
from .peft_lycoris import PeftLycorisLayout
from .tensors import TensorSource, open_tensors
from .xlabs import XLabsLayout

__all__ = ["open_source", "check_output", "load_adapter", "detect_format", "LAYOUTS", "Layout", "Capabilities", "layout_named", "layout_of",
           "layout_for_target", "writer_of", "refuse_inexpressible", "ADAPTER_MARKERS", "WEIGHT_SUFFIXES", "TARGETS",
           "MERGE_TARGETS"]

# Tried in order, first match wins (as PEFT's dispatchers). A new layout: one file, one line here.
LAYOUTS: list[Layout] = [
    GgufReadLayout(),  # a GGUF file, by its magic (its keys end in .lora_a as mlx-lm's do); also convert --to gguf
    LycorisLayout(),  # any LyCORIS-only key (hada_, lokr_, lora_mid, dora_scale, diff …); plain LoCon stays kohya
    XLabsLayout(),  # [diffusion_model.]double_blocks.N.processor.…: before kohya (diffusion_model.) and attn-procs
    KohyaLayout(),
    MlxLayout(),
    DiffusersLayout(),  # only without a config beside the file: with one, PEFT reads it
    DiffusersAttnProcsLayout(),
    PeftLycorisLayout(),  # a config with peft_type LOHA/LOKR: PEFT's keys and scale rules
    PeftLayout(),
]

# a directory holding one of these is an adapter (--force may replace it; nothing else)
ADAPTER_MARKERS: tuple[str, ...] = tuple(dict.fromkeys(f for layout in LAYOUTS for f in layout.marker_files))
WEIGHT_SUFFIXES: tuple[str, ...] = tuple(dict.fromkeys(
    (".safetensors", ".bin", ".pt", ".pth") + tuple(s for layout in LAYOUTS for s in layout.weight_suffixes)))
# the layouts found in a directory by their weight files (mlx-lm's adapters.safetensors, PEFT's adapter_model.*),
# and the configs found beside weights (adapter_config.json)
_DIRECTORY_LAYOUTS = [layout for layout in LAYOUTS if layout.weight_files]
_CONFIG_FILES: tuple[str, ...] = tuple(dict.fromkeys(layout.config_file for layout in LAYOUTS if layout.config_file))
# convert's --to choices (merge's: those a merge can write), in registry order
TARGETS: tuple[str, ...] = tuple(dict.fromkeys(layout.target for layout in LAYOUTS if layout.target))
MERGE_TARGETS: tuple[str, ...] = tuple(t for t in TARGETS if any(
    layout.target == t and layout.merge_target for layout in LAYOUTS))
# PeftModel.state_dict() keeps the adapter name: ….lora_A.default.weight, ….lora_embedding_A.default
_ADAPTER_NAMED = re.compile(r"\.lora_(?:A|B)\.[^.]+\.weight$|\.lora_embedding_(?:A|B)\.[^.]+$")


def layout_named(fmt: str) -> Layout:
    """The layout that produces the format ``fmt`` (``peft-bin`` → the PEFT layout)."""
    for layout in LAYOUTS:
        if fmt in layout.formats:
            return layout
    raise InspectError(f"no layout writes format {str(fmt)!r}")


def layout_of(ad: Adapter) -> Layout:
    """The layout that read ``ad`` (it writes the adapter's rewrites)."""
    return ad.layout if ad.layout is not None else layout_named(ad.format)


def refuse_inexpressible(ad: Adapter, out_fmt: Format) -> None:
    """A rewrite of ``ad`` written as ``out_fmt`` (its layout's ``output_format``) is refused in one line, before
    anything is computed or written, when the layout of that format cannot hold the adapter's modules (its
    ``caps``: DoRA, conv, embeddings); ranks and scales are the rewrite's to adapt (padded, baked)."""
    layout = layout_of(ad)
    out = layout if out_fmt == ad.format or out_fmt in layout.formats else layout_named(out_fmt)
    why = out.refusal([Held(m.name, m.kind, m.is_dora) for m in ad.modules], models=False)
    if why is not None:
        raise InspectError(f"{ad.path}: {why}")


def writer_of(ad: Adapter) -> Layout:
    """The layout that writes ``ad``'s conversions and merges (its own, or the target it is written as)."""
    layout = layout_of(ad)
    return layout_for_target(layout.converts_to) if layout.converts_to else layout


def layout_for_target(target: str) -> Layout:
    """The layout that ``convert --to TARGET`` writes (first in :data:`LAYOUTS`)."""
    for layout in LAYOUTS:
        if layout.target == target:
            return layout
    raise InspectError(f"unknown target layout {target!r} (one of {', '.join(TARGETS)})")


def _layout_for(keys: list[str], found: Found) -> Layout | None:
    return next((layout for layout in LAYOUTS if layout.matches(keys, found)), None)


def check_output(ad: Adapter, out: Path, force: bool) -> None:
    """Refuse OUT in one line unless it is free, or ``force`` and OUT is a file or an adapter directory (one
    holding a file of :data:`ADAPTER_MARKERS`); never the input itself (:func:`files.check_output_path`)."""
    check_output_path(ad.path, ad.weights_path, out, force, ADAPTER_MARKERS)


def open_source(path: Path) -> TensorSource:
    """The tensors of any weight file: a container a layout opens itself (GGUF), else safetensors or a
    pickle (:func:`~lora_inspect.formats.tensors.open_tensors`). Only the header is read."""
    opened = (layout.open(path) for layout in LAYOUTS)
    source = next((s for s in opened if s is not None), None)
    return source if source is not None else open_tensors(path)


def _from_file(found: Found) -> Adapter:
    path = found.weights
    source = open_source(path)
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
    return sorted(d.name for d in p.iterdir() if d.is_dir() and any((d / c).is_file() for c in _CONFIG_FILES))


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
    if p.is_file() and p.name in _CONFIG_FILES:
        p = p.parent
    if p.is_dir():
        return _from_directory(p)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise InspectError(f"{p}: not an adapter file (expected .safetensors or .bin, or a directory)")
    sides = [p.parent / c for c in _CONFIG_FILES]
    _refuse_special(*sides)
    side = next((s for s in sides if s.is_file()), None)
    if side is not None:
        return _from_file(Found(p, p, read_config(side), side))
    return _from_file(Found(p, p))


def _directory_adapter(p: Path, layout: Layout, name: str) -> Adapter:
    """The adapter of directory ``p`` whose weight file ``name`` is one of ``layout``'s, with its config."""
    cfg_path = p / layout.config_file if layout.config_file else None
    if cfg_path is not None and cfg_path.is_file():
        ad = _from_file(Found(p / name, p, read_config(cfg_path), cfg_path))
    elif layout.config_required:
        raise InspectError(f"{p}: has {name} but no {layout.config_file} (copy it from the training run)")
    else:
        ad = _from_file(Found(p / name, p))
    ad.notes.extend(layout.directory_notes(p, _named_adapter_dirs(p)))
    return ad


def _from_directory(p: Path) -> Adapter:
    """A directory adapter by its layout's weight files (LAYOUTS order: mlx-lm, PEFT), else the one weight
    file in it."""
    _refuse_special(*(p / c for c in _CONFIG_FILES), *(p / n for lo in _DIRECTORY_LAYOUTS for n in lo.weight_files))
    for layout in _DIRECTORY_LAYOUTS:
        name = next((n for n in layout.weight_files if (p / n).is_file()), None)
        if name is not None:
            return _directory_adapter(p, layout, name)
    for layout in _DIRECTORY_LAYOUTS:
        if layout.config_required and layout.config_file and (p / layout.config_file).is_file():
            raise InspectError(f"{p}: has {layout.config_file} but no {' or '.join(layout.weight_files)}")
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
    known = dict.fromkeys(_CONFIG_FILES + tuple(n for layout in _DIRECTORY_LAYOUTS for n in layout.weight_files))
    raise InspectError(f"{p}: no adapter here (no {', '.join(known)} or .safetensors file)")
