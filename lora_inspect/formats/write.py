"""Writers for every adapter layout, atomic and byte-deterministic.

One entry point, :func:`write_adapter`, writes a finished set of tensors (plus a config and header
metadata) in the *input's* layout:

- ``peft`` directory: ``adapter_config.json`` (sorted keys, as PEFT's ``save_pretrained`` writes it),
  ``adapter_model.safetensors`` (or ``adapter_model.bin`` when the input was pickled) and the input's
  ``README.md`` when there is one;
- ``peft-safetensors`` / ``kohya`` / ``diffusers``: one ``.safetensors`` file (``peft-bin``: one ``.bin``);
- ``mlx``: ``adapters.safetensors`` + ``adapter_config.json``.

Determinism: the safetensors container is written here rather than by ``safetensors.torch.save_file``,
whose header metadata order follows a Rust ``HashMap`` and changes from run to run. Header keys are
sorted, tensors are laid out by (element size descending, key) — the order the safetensors library
uses, which keeps every tensor aligned — and the header is padded with spaces to a multiple of 8
(the format spec: https://github.com/huggingface/safetensors#format). No timestamps anywhere.

Atomicity: everything is written under a temporary name beside OUT (same filesystem), checked by
the caller, and only then renamed onto OUT (:class:`AtomicOutput`). Nothing is left behind on failure.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import InspectError
from .tensors import TORCH_TO_ST

__all__ = [
    "write_safetensors",
    "write_adapter",
    "AtomicOutput",
    "check_output_path",
    "dump_json",
    "output_weights_name",
]


def dump_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline (PEFT writes sorted keys too)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file deterministically; returns the bytes written."""
    items = []
    for key, t in tensors.items():
        if t.dtype not in TORCH_TO_ST:
            raise InspectError(f"{path}: cannot store tensor {key!r} of dtype {t.dtype}")
        items.append((key, t.detach().to("cpu").contiguous()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for key, t in items:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InspectError(f"{path}: header metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def _write_bin(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # torch.save is deterministic for the same dict in the same order (checked with torch 2.13)
    torch.save({k: tensors[k].contiguous() for k in sorted(tensors)}, str(path))


def output_weights_name(fmt: str, input_weights: Path) -> str:
    if fmt == "peft":
        return input_weights.name  # adapter_model.safetensors or adapter_model.bin
    if fmt == "mlx":
        return "adapters.safetensors"
    return ""


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    if path.suffix == ".safetensors":
        write_safetensors(path, tensors, metadata)
    else:
        _write_bin(path, tensors)


def write_adapter(
    target: Path,
    *,
    fmt: str,
    input_weights: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    config: dict | None,
    copy_files: Iterable[Path] = (),
) -> None:
    """Write an adapter at ``target`` (a temporary path; see :class:`AtomicOutput`) in layout ``fmt``.

    Directory layouts (``peft``, ``mlx``) create ``target`` as a directory; file layouts write one
    file whose kind follows ``input_weights``' suffix.
    """
    if fmt in ("peft", "mlx"):
        target.mkdir()
        _write_weights(target / output_weights_name(fmt, input_weights), tensors, metadata)
        if config is not None:
            (target / "adapter_config.json").write_text(dump_json(config), encoding="utf-8")
        for src in copy_files:
            shutil.copyfile(src, target / src.name)
    else:
        _write_weights(target, tensors, metadata)


def _looks_like_adapter_dir(d: Path) -> bool:
    return any((d / n).is_file() for n in ("adapter_config.json", "adapters.safetensors", "adapter_model.safetensors"))


def check_output_path(inp: Path, weights: Path, out: Path, force: bool) -> None:
    """Refuse OUT when it is the input, lies inside it, contains it, or exists without ``--force``."""
    ri, rw, ro = inp.resolve(), weights.resolve(), out.resolve()
    if ro == ri or ro == rw:
        raise InspectError(f"{out}: OUT is the input itself; write to a new path")
    if ri.is_dir() and ri in ro.parents:
        raise InspectError(f"{out}: OUT lies inside the input directory {inp}; write elsewhere")
    if ro in ri.parents or ro in rw.parents:
        raise InspectError(f"{out}: OUT contains the input {inp}; replacing it would destroy the input")
    if out.exists() or out.is_symlink():
        if out.exists() and out.samefile(weights):
            raise InspectError(f"{out}: OUT is the input file (same file on disk); write to a new path")
        if not force:
            raise InspectError(f"{out}: already exists (pass --force to replace it)")
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not _looks_like_adapter_dir(out):
            # --force replaces an earlier output, never an unrelated folder full of someone's files
            raise InspectError(f"{out}: exists and is not an adapter directory; --force only replaces adapters")
    if not out.parent.exists():
        raise InspectError(f"{out.parent}: no such directory for OUT")


class AtomicOutput:
    """A temporary path beside OUT; :meth:`commit` renames it onto OUT, :meth:`discard` removes it.

    Use as a context manager: leaving the block without :meth:`commit` (an error, a failed
    self-check) removes everything that was written.
    """

    def __init__(self, out: Path, suffix: str = ""):
        self.out = out
        self.tmp = out.parent / f".{out.name}.lora-inspect-tmp-{os.getpid()}{suffix}"
        self._committed = False

    def __enter__(self) -> "AtomicOutput":
        _remove(self.tmp)
        return self

    def __exit__(self, *exc) -> None:
        if not self._committed:
            _remove(self.tmp)

    def commit(self) -> None:
        trash = None
        if self.out.exists() or self.out.is_symlink():
            if self.out.is_dir() and not self.out.is_symlink():
                trash = self.out.parent / f".{self.out.name}.lora-inspect-old-{os.getpid()}"
                _remove(trash)
                os.rename(self.out, trash)
            elif self.tmp.is_dir():
                self.out.unlink()
        os.replace(self.tmp, self.out)  # atomic for a file over a file; a dir onto a free name
        self._committed = True
        if trash is not None:
            _remove(trash)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
