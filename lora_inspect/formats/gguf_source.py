"""The GGUF container as a :class:`~lora_inspect.formats.tensors.TensorSource` (read through ``gguf.GGUFReader``).

The fixed header (magic, version, counts) is checked by hand before the reader sees the file, so a
hostile count or a big-endian file is one line; the rest is parsed by ``gguf.GGUFReader`` over a
memory map of a file opened with :func:`lora_inspect.validate.open_regular` (a FIFO never blocks),
and any failure of the reader (a truncated file, a duplicated key) is one line naming the file.
Tensor data stays mapped: :meth:`GgufSource.raw` copies one tensor out of the map when it is asked for (BF16 as
the :data:`~lora_inspect.arrays.BF16` marker), :meth:`~lora_inspect.formats.tensors.TensorSource.get` gives its numbers (BF16 widened to float32).

Shapes: GGUF stores ggml's ``ne`` (fastest dimension first); ``GGUFReader`` reports ``ne`` as
``ReaderTensor.shape`` and gives ``data`` in numpy order, the reverse. :class:`TensorInfo` holds the numpy
order, as for safetensors: llama.cpp's ``lora_a`` of ne ``[in, r]`` is (r, in) here. Only F32, F16 and
BF16 tensors are read; a quantised tensor is refused in one line (its values need ggml's dequantisation).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from .. import validate as v
from ..arrays import BF16
from ..errors import InspectError
from ..optional import require
from .tensors import TensorInfo, TensorSource

__all__ = ["GgufSource", "is_gguf", "MAGIC"]

MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # what gguf.GGUFReader 0.19 reads (llama.cpp writes 3)
_MAX_KV = 65_536  # metadata entries (an adapter has fewer than 20)
_FLOATS = ("F32", "F16", "BF16")  # GGMLQuantizationType names read (their safetensors dtype names are the same)


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a regular file starting with the GGUF magic (False on any error: the default
    reader then says what the file is)."""
    try:
        with v.open_regular(path) as f:
            return f.read(4) == MAGIC
    except (InspectError, OSError):
        return False


def _preflight(path: Path) -> None:
    """The fixed 24-byte header: magic, a version GGUFReader reads, little-endian, sane counts."""
    try:
        with v.open_regular(path) as f:
            head = f.read(24)
    except OSError as e:
        raise InspectError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(head) < 24 or head[:4] != MAGIC:
        raise InspectError(f"{path}: not a GGUF file (no 'GGUF' magic and 24-byte header)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    if version & 0xFFFF == 0 and version:
        raise InspectError(f"{path}: a big-endian GGUF file (convert_lora_to_gguf.py --bigendian): not read here")
    if version not in _VERSIONS:
        raise InspectError(f"{path}: GGUF version {version}; versions {', '.join(map(str, _VERSIONS))} are read")
    if n_tensors > v.MAX_TENSORS:
        raise InspectError(f"{path}: GGUF header claims {n_tensors} tensors (limit {v.MAX_TENSORS}; corrupt file?)")
    if n_kv > _MAX_KV:
        raise InspectError(f"{path}: GGUF header claims {n_kv} metadata entries (limit {_MAX_KV}; corrupt file?)")


def _reader(path: Path) -> Any:
    gguf = require("gguf", "reading a GGUF adapter")
    _preflight(path)
    try:
        with v.open_regular(path) as f:
            return gguf.GGUFReader(f)  # np.memmap takes the open file (it keeps its own map)
    except InspectError:
        raise
    except Exception as e:  # ValueError, KeyError (a duplicated key), IndexError … from a malformed file
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise InspectError(f"{path}: not a readable GGUF file ({detail})") from e


def _name(path: Path, name: str, what: str) -> str:
    if len(name) > v.MAX_NAME_LENGTH or not name.isprintable():
        raise InspectError(f"{path}: GGUF {what} {name[:60]!r} is not a printable name of at most "
                           f"{v.MAX_NAME_LENGTH} characters")
    return name


def _info(path: Path, t: Any) -> TensorInfo:
    """One tensor's header facts, in numpy order; a type that is not F32/F16/BF16 refused in one line."""
    name = _name(path, str(t.name), "tensor name")
    kind = t.tensor_type.name
    if kind not in _FLOATS:
        what = "quantised" if kind.startswith(("Q", "IQ", "TQ", "MXFP")) else "not a float type read here"
        raise InspectError(f"{path}: tensor {name!r} is {kind} ({what}): only F32, F16 and BF16 GGUF adapters are "
                           "read; convert the adapter again with --outtype f32 or f16")
    shape = tuple(int(d) for d in reversed(t.shape))
    return TensorInfo(name, kind, shape, int(t.n_bytes), int(t.data_offset))


class GgufSource(TensorSource):
    """A GGUF file: header facts now, a tensor's data (copied from the memory map) when asked for.
    ``fields`` holds the metadata as the reader typed it: ``{key: (value, [GGUFValueType …])}``."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = _reader(path)
        self.fields: dict[str, tuple[Any, list[Any]]] = {}
        for key, f in self.reader.fields.items():
            if not key.startswith("GGUF."):  # the reader's own entries: version and counts
                self.fields[_name(path, key, "metadata key")] = (f.contents(), list(f.types))
        self.metadata: dict[str, str] = {}  # no safetensors-style string metadata
        self._tensors = {}
        self.tensors = {}
        for t in self.reader.tensors:
            info = _info(path, t)
            self.tensors[info.key], self._tensors[info.key] = info, t

    def value(self, key: str, types: tuple[str, ...]) -> Any:
        """A metadata value whose GGUF type is one of ``types`` (``"STRING"``, ``"FLOAT32"`` …); None when
        absent; one line when it has another type."""
        if key not in self.fields:
            return None
        val, kinds = self.fields[key]
        got = "[" + ", ".join(k.name for k in kinds) + "]" if len(kinds) > 1 else kinds[0].name
        if got not in types:
            raise InspectError(f"{self.path}: GGUF {key} is {got}, expected {' or '.join(types)}")
        return val

    def raw(self, key: str) -> np.ndarray:
        """The tensor as stored, copied from the map: F32/F16 arrays, BF16 as the marker dtype."""
        info = self.tensors.get(key)
        if info is None:
            raise InspectError(f"{self.path}: no tensor named {key!r}")
        data = self._tensors[key].data
        try:
            if info.dtype == "BF16":  # GGUFReader gives BF16 as raw bytes (rows × 2·cols uint8)
                return np.array(data, copy=True).view(BF16).reshape(info.shape)
            return np.array(data, copy=True).reshape(info.shape)
        except ValueError as e:
            raise InspectError(f"{self.path}: tensor {key!r}: its data does not fit shape {info.shape} ({e})") from e
