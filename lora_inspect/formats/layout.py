"""What a layout is: the plug-in interface every format implements.

A :class:`Layout` owns one on-disk format end to end: detection (from the keys and the config
found beside them), reading into an :class:`~lora_inspect.adapter.Adapter`, what the format can
express (:class:`Capabilities`), how α is stored, and the layout-specific half of a rewrite —
given new per-module ranks with the scale baked to 1 (``truncated``) or an α factor F
(``rescaled``), which tensors, config and header metadata to write, and how to write them.
``lora_inspect.formats.LAYOUTS`` tries the layouts in order, first match wins (as PEFT's
dispatchers do). Adding a layout is one new file and one line in that list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InspectError
from ..files import AtomicOutput, copy_file, dump_json, write_bin, write_safetensors, write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..adapter import Adapter
    from .tensors import TensorSource

__all__ = ["Capabilities", "Found", "Rewrite", "Layout", "write_weights"]


@dataclass(frozen=True)
class Capabilities:
    """What a layout can express (and so what a rewrite may produce in it)."""

    per_module_rank: bool = True
    per_module_alpha: bool = True
    dora: bool = False
    conv: bool = False
    embeddings: bool = False
    one_rank_only: bool = False  # mlx-lm: lora_parameters.rank for every module
    alpha: str = "config"  # where α lives: "config" | "tensors" | "header" | "scale" (absolute) | "none"


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
    """What a rewrite writes: the output's format string, tensors, header metadata and config."""

    fmt: str
    tensors: dict[str, "torch.Tensor"]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None


def write_weights(path: Path, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None) -> None:
    """A weight file whose container follows its suffix (``.safetensors`` or a pickled ``.bin``)."""
    if path.suffix == ".safetensors":
        write_safetensors(path, tensors, metadata or None)
    else:
        write_bin(path, tensors)


class Layout:
    """Base class. Subclasses set :attr:`name`, :attr:`formats` and :attr:`caps` and implement
    :meth:`matches` and :meth:`read`; single-file layouts inherit the write side."""

    name = ""
    formats: tuple[str, ...] = ()  # the JSON-visible format strings this layout produces
    caps = Capabilities()
    marker_files: tuple[str, ...] = ()  # files whose presence makes a directory this layout's adapter

    # ------------------------------------------------------------------ reading
    def matches(self, keys: list[str], found: Found) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, source: "TensorSource", found: Found) -> "Adapter":  # pragma: no cover - interface
        raise NotImplementedError

    # ------------------------------------------------------------------ rewriting
    def output_format(self, ad: "Adapter", out: Path) -> str:
        """The format written to ``out`` (the input's, by default)."""
        return ad.format

    def global_alpha(self, ad: "Adapter") -> float | None:
        """The one α that a rescale to a new α replaces, None when there is none."""
        alphas = {m.alpha for m in ad.modules}
        return alphas.pop() if len(alphas) == 1 else None

    def truncated(self, ad: "Adapter", out_fmt: str, tensors: dict[str, "torch.Tensor"], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        """The output for new stored ranks (module name → rank) with every scale baked to 1 (the
        factors in ``tensors`` already carry it); ``dropped`` modules are gone from ``tensors``."""
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)

    def rescaled(self, ad: "Adapter", out_fmt: str, tensors: dict[str, "torch.Tensor"], factor: float) -> Rewrite:
        """The output with every α multiplied by ``factor`` (factors unchanged)."""
        raise InspectError(f"{ad.path}: no alpha is stored anywhere (α = r assumed), so there is none to scale",
                           hint="bake the factor into B instead", option="bake")

    def baked(self, ad: "Adapter", out_fmt: str, tensors: dict[str, "torch.Tensor"]) -> Rewrite:
        """The output when B was multiplied instead (config and metadata unchanged)."""
        return Rewrite(out_fmt, tensors, dict(ad.metadata), None)

    def copied_files(self, ad: "Adapter", out_fmt: str) -> list[Path]:
        """Files carried over unchanged (a PEFT directory's README.md)."""
        return []

    def tmp_suffix(self, ad: "Adapter", out_fmt: str) -> str:
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

    def tmp_suffix(self, ad: "Adapter", out_fmt: str) -> str:
        return ""

    def write(self, atomic: AtomicOutput, ad: "Adapter", rw: Rewrite) -> None:
        target = atomic.mkdir()
        write_weights(target / self.weights_name(ad), rw.tensors, rw.metadata)
        if rw.config is not None:
            write_text(target / "adapter_config.json", dump_json(rw.config))
        for src in self.copied_files(ad, rw.fmt):
            copy_file(src, target / src.name)

    def weights_file(self, out: Path) -> Path:
        for name in ("adapter_model.safetensors", "adapter_model.bin", "adapters.safetensors"):
            if (out / name).is_file():
                return out / name
        return out
