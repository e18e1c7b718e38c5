"""What a layout is: the plug-in interface every format implements, and the one home of everything
about its format.

A :class:`Layout` owns one on-disk format end to end. ``lora_inspect.formats.LAYOUTS`` tries the
layouts in order, first match wins (as PEFT's dispatchers do); everything else is derived from that
list: the files that mark an adapter directory (``ADAPTER_MARKERS``), the weight-file suffixes, the
``convert``/``merge`` targets and the CLI's ``--to`` choices (``TARGETS``). Nothing outside
``formats/`` compares format strings (``tests/test_no_format_strings.py``): behaviour is chosen by the
layout object (``ad.layout``) or by its typed fields.

How to add a layout — one new file in this package and one line in ``LAYOUTS`` (before any layout
whose detection would also accept its files), touching nothing else (examples: ``formats/xlabs.py``,
``formats/gguf_read.py``). What a layout declares:

1. **Identity.** Subclass :class:`Layout` (or :class:`DirectoryLayout` for a directory with a config):
   ``name`` (what ``detect_format`` reports), ``label`` (how messages call it; defaults to ``name``) and
   its own :class:`Format` enum for the ``format`` its adapters report in JSON, listed in ``formats``.
2. **Detection.** :meth:`Layout.matches` (key names and the config found beside them); a file that is
   not safetensors or a pickle also needs ``weight_suffixes`` and :meth:`Layout.open` (its TensorSource).
3. **Reading.** :meth:`Layout.read` returns an :class:`~lora_inspect.adapter.Adapter` (the helpers of
   :mod:`.common` pair the keys; a new update type is an :class:`~lora_inspect.adapter.Update`, a new
   stored orientation an :class:`~lora_inspect.orientation.Orientation`); :meth:`Layout.with_base` when
   the base model completes it (``--base``); :meth:`Layout.directory_notes` for notes on a directory.
4. **Naming.** ``naming`` (:class:`Naming`: one model, pipeline components, kohya names) and
   :meth:`Layout.canonical_name`: a module → its (pipeline component, dotted path), which is how
   ``convert``, ``merge`` and ``diff`` match modules across layouts (mixins: ``kohya.KohyaNaming``,
   ``diffusers.PipelineNaming``); ``key_prefix`` when every key carries one (PEFT's ``base_model.model.``);
   :meth:`Layout.carried_config` for a config a conversion carries (PEFT's task_type, modules_to_save).
5. **Capabilities.** ``caps`` (:class:`~.capabilities.Capabilities`): per-module rank and α, DoRA (on
   embeddings, all-or-none), conv, embeddings, full tensors, one model or a pipeline, where α lives, and
   the reason given for each refusal. A conversion or merge into the layout, or a rewrite written in it,
   that needs more is refused in one line from ``caps`` alone (:meth:`Layout.refusal`), before anything
   is written; ranks and scales it cannot store per module are padded or baked by its writer.
6. **Writing.** Same-layout rewrites (``truncate``, ``rescale``): :meth:`Layout.output_format`,
   :meth:`Layout.global_alpha`, :meth:`Layout.truncated`, :meth:`Layout.rescaled`, :meth:`Layout.baked` and,
   for directories or other containers, :meth:`Layout.write`, :meth:`Layout.tmp_suffix`,
   :meth:`Layout.weights_file`. As a ``convert``/``merge`` target: ``target`` (the ``--to`` name) and
   :meth:`Layout.convert_tensors` (canonical modules → tensors, config, per-module records, one file
   ending in ``file_suffix`` or a directory; :mod:`lora_inspect.convert.writers` has the shared pieces and
   :func:`~lora_inspect.convert.writers.dispatch` for an ordered list of per-module handlers, first match
   wins); another container overrides :meth:`Layout.write_converted`; ``merge_target = False`` keeps it
   out of ``merge --to``; :meth:`Layout.default_dtype` and :meth:`Layout.locate_base` adjust the options.
   A layout that is read only sets ``writes_as``: the target its adapters are written as (merge's default).
7. **Markers.** ``marker_files``: files whose presence makes a directory an adapter of this layout
   (``--force`` may replace such a directory); ``weight_files``, ``config_file`` and ``config_required``
   for a directory layout, found in ``LAYOUTS`` order.

Then add its builder to ``tests/layout_builders.py`` (a small adapter and its ΔW from the raw tensors):
``tests/test_layout_registry.py`` runs every command on every registered layout and fails for a layout
without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InspectError
from ..files import AtomicOutput, copy_file, dump_json, write_bin, write_safetensors, write_text
from ..kinds import Choice
from .capabilities import AlphaHome, Capabilities, Held, Models, refusal

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..adapter import Adapter, Module
    from ..convert.canon import Canon
    from ..convert.results import ModuleOut
    from ..convert.writers import Written
    from .tensors import TensorSource

__all__ = ["Capabilities", "AlphaHome", "Models", "Held", "refusal", "Format", "Naming", "Found", "Rewrite",
           "WriteOptions", "Converted", "Layout", "DirectoryLayout", "write_weights"]


class Format(Choice):
    """The ``format`` an adapter reports (a ``str``: JSON shows its value). Each layout subclasses it with
    its own members (``class KohyaFormat(Format): KOHYA = "kohya"``), so a new layout adds its format in
    its own file and mypy checks every member the code names."""


class Naming(Choice):
    """How a layout names modules, which is what a conversion keeps of the source's naming."""

    MODEL = "model"  # one model: the module name is its dotted path, no pipeline component (PEFT, mlx-lm)
    PIPELINE = "pipeline"  # "<component>.<path>" (diffusers: unet., text_encoder., transformer.)
    KOHYA = "kohya"  # kohya/BFL names (lora_unet_…, lora_te1_…): a kohya output keeps the source's UNet style


@dataclass
class Found:
    """What :func:`~lora_inspect.formats.load_adapter` located: the weights, the path the user named,
    and a config beside them (already validated as a JSON object) if any."""

    weights: Path
    shown: Path
    config: dict[str, Any] | None = None
    config_path: Path | None = None

    @property
    def is_dir(self) -> bool:
        return self.shown.is_dir()


@dataclass
class Rewrite:
    """What a rewrite writes: the output's format, tensors, header metadata and config."""

    fmt: Format
    tensors: dict[str, "np.ndarray"]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None


@dataclass
class WriteOptions:
    """What a conversion asks of the target's writer: the factor dtype (a storage dtype name, ``"F32"``,
    ``"BF16"`` …), the source's full tensors to carry, and the options only some targets read (kohya's UNet
    naming, GGUF's architecture and base model)."""

    dtype: str
    extras: dict[str, "np.ndarray"] = field(default_factory=dict)
    unet_names: str = "auto"
    arch: str | None = None
    base: Path | None = None


@dataclass
class Converted:
    """What a conversion wrote: per-module records, notes, worst relative ΔW error, worst error/tolerance."""

    records: list["ModuleOut"]
    notes: list[str]
    worst: float
    ratio: float


def write_weights(path: Path, tensors: dict[str, "np.ndarray"], metadata: dict[str, str] | None) -> None:
    """A weight file whose container follows its suffix (``.safetensors`` or a pickled ``.bin``)."""
    if path.suffix == ".safetensors":
        write_safetensors(path, tensors, metadata or None)
    else:
        write_bin(path, tensors)


class Layout:
    """Base class of every layout (module docstring: how to add one). Single-file layouts inherit the
    write side of rewrites."""

    # ------------------------------------------------------------------ identity and discovery
    name = ""
    label = ""  # how messages call it ("PEFT", "mlx-lm"); the name when not set
    formats: tuple[Format, ...] = ()  # the formats its reader gives Adapter.format
    marker_files: tuple[str, ...] = ()  # files whose presence makes a directory this layout's adapter
    weight_files: tuple[str, ...] = ()  # a directory adapter's weight files (first found is read)
    config_file: str | None = None  # the config read beside the weights
    config_required = False  # a directory with weight_files but no config_file is refused
    weight_suffixes: tuple[str, ...] = ()  # weight-file suffixes beyond .safetensors/.bin/.pt/.pth (see open)
    file_suffix = ".safetensors"  # what OUT must end in when convert writes this layout as one file

    # ------------------------------------------------------------------ capabilities, naming, targets
    caps = Capabilities()
    naming: ClassVar[Naming] = Naming.MODEL
    key_prefix = ""  # the prefix every module key carries (PEFT's "base_model.model."), "" for none
    target: str | None = None  # the convert/merge --to name; None: not written by convert
    writes_as: str | None = None  # a read-only layout: the target its adapters are written as
    merge_target = True  # offered as merge --to (False where a write needs more than the merged modules)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and "label" not in cls.__dict__:
            cls.label = cls.name

    @property
    def converts_to(self) -> str | None:
        """The convert target that writes this layout's adapters (a merge's default output)."""
        return self.target or self.writes_as

    # ------------------------------------------------------------------ reading
    def matches(self, keys: list[str], found: Found) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def open(self, path: Path) -> "TensorSource | None":
        """The tensors of a file this layout opens itself (a non-safetensors container); None: the default
        reader (safetensors, pickled ``.bin``) opens it."""
        return None

    def read(self, source: "TensorSource", found: Found) -> "Adapter":  # pragma: no cover - interface
        raise NotImplementedError

    def directory_notes(self, path: Path, subfolders: list[str]) -> list[str]:
        """Notes on a directory adapter read at ``path`` (``subfolders``: those holding a config)."""
        return []

    def canonical_name(self, m: "Module") -> tuple[str | None, str]:
        """(pipeline component, dotted module path) of module ``m``: one model by default."""
        return None, m.name

    def with_base(self, ad: "Adapter", base: Path | None) -> "Adapter":
        """``ad`` completed with what only its base model knows (``--base``: a GGUF's attention head counts, to
        undo its Q/K row permutation); ``ad`` itself by default. ``convert`` calls it on the source when
        ``--base`` is given; ``merge`` and ``diff`` call it on every input, with ``base`` None when no --base is
        given (a layout that needs the base then refuses in one line naming --base)."""
        return ad

    def carried_config(self, ad: "Adapter") -> dict | None:
        """The config a conversion carries to a PEFT output (task_type, modules_to_save …); None by default."""
        return None

    # ------------------------------------------------------------------ convert and merge targets
    def refusal(self, mods: Sequence[Held], extras: Sequence[str] = (), carry_extras: bool = False,
                models: bool = True) -> str | None:
        """Why this layout cannot hold ``mods`` (and full tensors ``extras``), from :attr:`caps` alone."""
        return refusal(self.caps, self.label, mods, extras, carry_extras, models)

    def convert_tensors(self, canon: "Canon", opts: WriteOptions) -> "Written":
        """Canonical modules → this layout's tensors, config and per-module records (targets implement it)."""
        raise InspectError(f"{self.label} is not written by convert")

    def write_converted(self, canon: "Canon", out: Path, opts: WriteOptions) -> Converted:
        """Write ``canon`` to ``out`` atomically, re-read it and compare every ΔW (a safetensors container
        here: :func:`lora_inspect.convert.checked.write_checked`)."""
        from ..convert.checked import write_checked

        return write_checked(self, canon, out, opts)

    def default_dtype(self, source: str) -> str:
        """The output dtype when none is asked for, given the source's (``fp32``, ``bf16``, ``fp16``)."""
        return source

    def locate_base(self, ad: "Adapter", base: Path | None) -> Path | None:
        """The base model a conversion to this layout reads (``--base``, or one the adapter names)."""
        return base

    # ------------------------------------------------------------------ rewriting
    def output_format(self, ad: "Adapter", out: Path) -> Format:
        """The format written to ``out`` (the input's, by default)."""
        return ad.format

    def global_alpha(self, ad: "Adapter") -> float | None:
        """The one α that a rescale to a new α replaces, None when there is none."""
        alphas = {m.alpha for m in ad.modules}
        return alphas.pop() if len(alphas) == 1 else None

    def truncated(self, ad: "Adapter", out_fmt: Format, tensors: dict[str, "np.ndarray"], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        """The output for new stored ranks (module name → rank) with every scale baked to 1 (the
        factors in ``tensors`` already carry it); ``dropped`` modules are gone from ``tensors``."""
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)

    def rescaled(self, ad: "Adapter", out_fmt: Format, tensors: dict[str, "np.ndarray"], factor: float) -> Rewrite:
        """The output with every α multiplied by ``factor`` (factors unchanged)."""
        raise InspectError(f"{ad.path}: no alpha is stored anywhere (α = r assumed), so there is none to scale",
                           hint="bake the factor into B instead", option="bake")

    def baked(self, ad: "Adapter", out_fmt: Format, tensors: dict[str, "np.ndarray"]) -> Rewrite:
        """The output when B was multiplied instead (config and metadata unchanged)."""
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)

    def copied_files(self, ad: "Adapter", out_fmt: Format) -> list[Path]:
        """Files carried over unchanged (a PEFT directory's README.md)."""
        return []

    def tmp_suffix(self, ad: "Adapter", out_fmt: Format) -> str:
        return ad.weights_path.suffix

    def write(self, atomic: AtomicOutput, ad: "Adapter", rw: Rewrite) -> None:
        """Write ``rw`` at ``atomic.tmp`` (a single weight file here; directory layouts override)."""
        write_weights(atomic.tmp, rw.tensors, rw.metadata)

    def weights_file(self, out: Path) -> Path:
        """The weight file inside a written output."""
        return out


class DirectoryLayout(Layout):
    """A layout written as a directory: a weight file plus ``adapter_config.json``."""

    def weights_name(self, ad: "Adapter") -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def tmp_suffix(self, ad: "Adapter", out_fmt: Format) -> str:
        return ""

    def write(self, atomic: AtomicOutput, ad: "Adapter", rw: Rewrite) -> None:
        target = atomic.mkdir()
        write_weights(target / self.weights_name(ad), rw.tensors, rw.metadata)
        if rw.config is not None:
            write_text(target / "adapter_config.json", dump_json(rw.config))
        for src in self.copied_files(ad, rw.fmt):
            copy_file(src, target / src.name)

    def weights_file(self, out: Path) -> Path:
        return next((out / n for n in self.weight_files if (out / n).is_file()), out)
