"""Tensor containers: a validated, lazy view of a safetensors file, and a safe ``.bin`` reader.

The safetensors header is parsed and checked by hand before the library opens the file, so a
truncated or hostile file gives one line naming the problem rather than a Rust panic or a huge
allocation. Tensor data is memory-mapped (``mmap``) and viewed as numpy arrays only when asked for:
no torch, no copy (bf16 aside, which :func:`lora_inspect.arrays.decode` widens to float32).
``.bin`` files are read by :mod:`lora_inspect.formats.bin_source`.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from .. import validate
from ..errors import InspectError
from ..units import noun, plural
from ..validate import MAX_NAME_LENGTH

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["TensorInfo", "TensorSource", "SafetensorsSource", "open_tensors", "first_line", "name_ok", "DTYPE_SIZES"]

# safetensors dtype names → bytes per element
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# header-only work (info, check) never imports numpy: struct reads a one-element tensor
_SCALAR_FORMATS = {
    "F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B",
    "U16": "<H", "U32": "<I", "U64": "<Q", "BOOL": "<?",
}
# what analysis reads (the F8 formats have no numpy dtype)
_READABLE = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64")


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_MAX_DIMS = 16  # torch allows 64; no LoRA factor has more than 4
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class TensorInfo:
    key: str
    dtype: str  # safetensors name: "F32", "BF16", …
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # start of the data, relative to the end of the header (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorSource:
    """A named collection of tensors with header facts available without reading data."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def raw(self, key: str) -> np.ndarray:  # pragma: no cover - interface
        """The tensor as stored (bf16 as :data:`lora_inspect.arrays.BF16` bits): for copying it unchanged."""
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        """The tensor's numbers as a numpy array (bf16 widened to float32; read-only for a memory map)."""
        from ..arrays import decode

        return decode(self.raw(key))

    def release(self, keys: list[str]) -> None:
        """The data of these tensors is no longer needed (a memory-mapped source drops its pages)."""

    def _known(self, key: str) -> TensorInfo:
        info = self.tensors.get(key)
        if info is None:
            raise InspectError(f"{self.path}: no tensor named {key!r}")
        if info.dtype not in _READABLE:
            raise InspectError(f"{self.path}: tensor {key!r} has dtype {info.dtype}, which cannot be analysed")
        return info

    def keys(self) -> list[str]:
        return list(self.tensors)

    def scalar(self, key: str) -> float:
        """The value of a one-element tensor (a kohya/diffusers ``.alpha``). NaN and ±inf are returned
        as they are (a float, never an exception): the caller names the module and refuses them."""
        t = self.get(key)
        if t.size != 1:
            raise InspectError(f"{self.path}: tensor {key!r} must hold one value, found shape {tuple(t.shape)}")
        try:
            return float(t.reshape(-1)[0])
        except Exception as e:  # complex or otherwise unconvertible
            raise InspectError(f"{self.path}: tensor {key!r}: cannot read its value ({e.__class__.__name__})") from e


def name_ok(path: Path, key: str, what: str = "tensor name") -> None:
    if len(key) > MAX_NAME_LENGTH:
        raise InspectError(f"{path}: {what} of {len(key)} characters (limit {MAX_NAME_LENGTH}): {key[:40]!r}…")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InspectError(f"{path}: {what} {key[:60]!r} is not valid Unicode (lone surrogate)") from e


# what a file that is no safetensors file often is, by its first bytes
_MAGIC = ((b"version https://git-lfs", "a Git LFS pointer, not the file: run git lfs pull"), (b"GGUF", "a GGUF file"),
          (b"PK\x03\x04", "a zip archive, as torch.save writes: name it .bin"),
          (b"\x80", "a pickle, as torch.save writes: name it .bin"), (b"<", "HTML or XML: a web page saved instead?"))


def _looks_like(head: bytes) -> str:
    """Why the first bytes cannot start a safetensors file: an absurd header length, and no '{' at byte 8
    where the JSON header must begin; what they look like instead, when that is recognisable."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of what was read is still text
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    if text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
        line = text.strip().splitlines()[0]
        line = line if len(line) <= 30 else line[:30] + "…"  # 41 bytes were read: a shorter line is whole
        return f"it is text, {line!r}; a safetensors file starts with a length and '{{'"
    return "no 8-byte header length followed by the '{' of a JSON header"


def _read_header_bytes(path: Path) -> tuple[bytes, int, int]:
    """(header bytes, header length n, file size), with the framing checked."""
    try:
        with validate.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            if len(head) < 8:
                raise InspectError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head[:8])
            if (n > _MAX_HEADER or 8 + n > size) and head[8:9] != b"{":
                raise InspectError(f"{path}: not a safetensors file ({_looks_like(head + f.read(32))})")
            f.seek(8)
            if n > _MAX_HEADER:
                raise InspectError(f"{path}: safetensors header length {n} is larger than the 100 MB limit (corrupt file?)")
            if 8 + n > size:
                raise InspectError(
                    f"{path}: safetensors header claims {plural(n, 'byte')} but the file has only {size - 8:,} after the length "
                    "(truncated download?)"
                )
            raw = f.read(n)
    except OSError as e:
        raise InspectError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) != n:
        raise InspectError(f"{path}: the file changed while it was read (header shorter than {plural(n, 'byte')})")
    return raw, n, size


def _parse_header(path: Path, raw: bytes) -> tuple[dict, dict[str, str]]:
    try:
        text = raw.decode("utf-8")  # the format is UTF-8 without a BOM (safetensors refuses anything else)
    except UnicodeDecodeError as e:
        raise InspectError(f"{path}: safetensors header is not valid UTF-8 ({validate.utf8_reason(e)} at byte {e.start})") from e
    header = validate.parse_json(text, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise InspectError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InspectError(f"{path}: safetensors __metadata__ must map strings to strings")
    for k, v in meta.items():
        name_ok(path, k, "metadata key")
        if not v.isascii():
            name_ok(path, v[:MAX_NAME_LENGTH], f"metadata value of {k[:60]!r}")
    if len(header) > validate.MAX_TENSORS:
        raise InspectError(f"{path}: {len(header)} {noun(len(header), 'tensor')} in one file (limit {validate.MAX_TENSORS})")
    return header, meta


def _shape_ok(shape: object) -> bool:
    if type(shape) is not list or len(shape) > _MAX_DIMS:
        return False
    for d in shape:  # noqa: SIM110 - a loop is faster than all() over a generator here (100,000 entries)
        if type(d) is not int or not 0 <= d <= _INT64_MAX:
            return False
    return True


def _offsets_ok(offs: object) -> bool:
    return type(offs) is list and len(offs) == 2 and type(offs[0]) is int and type(offs[1]) is int and 0 <= offs[0] <= offs[1]


def _entry(path: Path, key: str, entry: object, data_len: int) -> TensorInfo:
    """One header entry → TensorInfo, each field checked (types exact: a bool is not an integer)."""
    if len(key) > MAX_NAME_LENGTH or not key.isascii():
        name_ok(path, key)
    if not isinstance(entry, dict):
        raise InspectError(f"{path}: tensor {key!r}: header entry is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(dtype) is not str or dtype not in DTYPE_SIZES:
        raise InspectError(f"{path}: tensor {key!r}: unknown dtype {validate.show_value(dtype)}")
    if not _shape_ok(shape):
        raise InspectError(
            f"{path}: tensor {key!r}: shape {validate.show_value(shape)} is not a list of at most {_MAX_DIMS} "
            "non-negative 64-bit integers"
        )
    if not _offsets_ok(offs):
        raise InspectError(f"{path}: tensor {key!r}: data_offsets {validate.show_value(offs)} are not [start, end]")
    start, end = offs  # type: ignore[misc]
    if end > data_len:
        raise InspectError(
            f"{path}: tensor {key!r}: data ends at byte {end} but the file holds only {data_len} data bytes "
            "(truncated file?)"
        )
    dims = cast("list[int]", shape)
    has_zero = 0 in dims
    nonzero = math.prod([d for d in dims if d] if has_zero else dims) * DTYPE_SIZES[dtype]
    if nonzero > _INT64_MAX:
        raise InspectError(f"{path}: tensor {key!r}: shape {validate.show_value(shape)} has more elements than int64 holds")
    nbytes = 0 if has_zero else nonzero
    if end - start != nbytes:
        raise InspectError(f"{path}: tensor {key!r}: {plural(end - start, 'byte')} stored but {dtype} {shape} needs {nbytes:,}")
    return TensorInfo(key, dtype, tuple(dims), nbytes, start)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """The safetensors library's rule (Metadata::validate): sorted by offsets, the tensors tile the data
    exactly — no overlap, no gap, nothing after the last one."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.key) for t in tensors.values())
    end, prev = 0, None
    for s, e, k in spans:
        if s != end:
            what = "overlap" if s < end else "leave a gap between them"
            raise InspectError(
                f"{path}: tensors {prev!r} and {k!r} {what} in the file (data starts at byte {s}, the previous "
                f"tensor ends at {end}; corrupt header)" if prev is not None else
                f"{path}: tensor {k!r}: data starts at byte {s}, not 0 (corrupt header)"
            )
        end, prev = e, k
    if end != data_len:
        raise InspectError(f"{path}: {plural(data_len - end, 'byte')} after the last tensor's data (corrupt or concatenated file)")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (tensors, metadata, data_start).

    Linear in the header size (the one sort of offsets aside, which is linear on the sorted headers
    writers produce): JSON through :func:`lora_inspect.validate.parse_json` (depth and size limits, a
    repeated tensor name refused), every entry checked as the safetensors library checks it, so ``info``
    refuses exactly the files that ``safe_open`` would refuse later."""
    raw, n, size = _read_header_bytes(path)
    header, meta = _parse_header(path, raw)
    data_len = size - 8 - n
    tensors = {key: _entry(path, key, entry, data_len) for key, entry in header.items()}
    _check_layout(path, tensors, data_len)
    return tensors, meta, 8 + n


class SafetensorsSource(TensorSource):
    """Lazy: the header now; tensor data memory-mapped when a key is asked for, viewed without a copy."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors, self.metadata, self.data_start = read_safetensors_header(path)
        self.data_len = sum(t.nbytes for t in self.tensors.values())  # the header tiles the data exactly
        self._identity = _identity(os.stat(path))  # the file the header came from: _open maps only that one
        self._data: np.ndarray | None = None
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def scalar(self, key: str) -> float:
        """Read a one-element tensor straight from the file (no torch), e.g. a kohya ``.alpha``.
        NaN and ±inf come back as floats: the caller names the module and refuses them."""
        info = self._known(key)
        if info.numel != 1:
            raise InspectError(f"{self.path}: tensor {key!r} must hold one value, found shape {info.shape}")
        if info.dtype == "BF16":
            fmt, pad = "<f", b"\0\0"  # bf16 is the high half of an f32
        elif info.dtype in _SCALAR_FORMATS:
            fmt, pad = _SCALAR_FORMATS[info.dtype], b""
        else:
            return super().scalar(key)
        try:
            with validate.open_regular(self.path) as f:
                f.seek(self.data_start + info.offset)
                raw = f.read(info.nbytes)
        except OSError as e:
            raise InspectError(f"{self.path}: cannot read tensor {key!r}: {e.strerror or e}") from e
        if len(raw) != info.nbytes:
            raise InspectError(f"{self.path}: tensor {key!r}: the file ends inside its data (changed while read?)")
        return float(struct.unpack(fmt, pad + raw)[0])

    def _open(self) -> np.ndarray:
        """The file's data section as bytes, memory-mapped read-only once (an empty file maps nothing)."""
        with self._lock:  # worker threads read modules in parallel: one map per file
            if self._data is None:
                self._data = self._map_data()
        return self._data

    def _map_data(self) -> np.ndarray:
        import numpy as np

        validate.require_regular_file(self.path)
        try:
            with validate.open_regular(self.path) as f:
                st = os.fstat(f.fileno())
                if _identity(st) != self._identity:
                    raise InspectError(f"{self.path}: the file changed after its header was read (replaced or "
                                       "rewritten while lora-inspect ran?)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else None
        except OSError as e:
            raise InspectError(f"{self.path}: cannot read: {e.strerror or e}") from e
        buffer = self._map if self._map is not None else b""
        return np.frombuffer(buffer, dtype=np.uint8, count=self.data_len, offset=self.data_start)

    def release(self, keys: list[str]) -> None:
        """Drop the pages of these tensors from this process's memory map (``MADV_DONTNEED``): reading
        streams module by module, so the resident set stays one module's worth, not the file's. Safe for a
        read-only file mapping — a later read of the same bytes faults them in again from the page cache."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        spans = [self.tensors[k] for k in keys if k in self.tensors]
        if not spans:
            return
        start = self.data_start + min(t.offset for t in spans)
        end = self.data_start + max(t.offset + t.nbytes for t in spans)
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the span only
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def raw(self, key: str) -> np.ndarray:
        from ..arrays import NUMPY_OF

        info = self._known(key)
        data = self._open()[info.offset: info.offset + info.nbytes]
        return data.view(NUMPY_OF[info.dtype]).reshape(info.shape)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else e.__class__.__name__)[:200]


def open_tensors(path: Path) -> TensorSource:
    if path.suffix in (".bin", ".pt", ".pth"):
        from .bin_source import load_bin

        return load_bin(path)
    return SafetensorsSource(path)

