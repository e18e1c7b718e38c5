"""Tensor containers: a validated, lazy view of a safetensors file, and a safe ``.bin`` reader.

The safetensors header is parsed and checked by hand before the library opens the file, so a
truncated or hostile file gives one line naming the problem rather than a Rust panic or a huge
allocation. Tensor data is memory-mapped through ``safe_open`` and read only when asked for.
``.bin`` files are read only through ``torch.load(weights_only=True)``: pickled code never runs.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InspectError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TensorInfo", "TensorSource", "SafetensorsSource", "StateDictSource", "open_tensors", "DTYPE_SIZES"]

# safetensors dtype names → bytes per element
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_TORCH_NAMES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "float16": "F16",
    "bfloat16": "BF16", "int32": "I32", "float32": "F32", "int64": "I64", "float64": "F64",
}
# header-only work (info, check) never imports torch; the dtype maps are built on first use
_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def __getattr__(name: str):  # PEP 562: ST_TO_TORCH / TORCH_TO_ST without importing torch at module load
    if name in ("ST_TO_TORCH", "TORCH_TO_ST"):
        import torch

        t2s = {getattr(torch, k): v for k, v in _TORCH_NAMES.items()}
        globals()["TORCH_TO_ST"] = t2s
        globals()["ST_TO_TORCH"] = {v: k for k, v in t2s.items()}
        return globals()[name]
    raise AttributeError(name)


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
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

    def get(self, key: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def keys(self) -> list[str]:
        return list(self.tensors)

    def scalar(self, key: str) -> float:
        """The value of a one-element tensor (a kohya/diffusers ``.alpha``)."""
        t = self.get(key)
        if t.numel() != 1:
            raise InspectError(f"{self.path}: tensor {key!r} must hold one value, found shape {tuple(t.shape)}")
        return float(t.reshape(-1)[0])


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (tensors, metadata, data_start)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InspectError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise InspectError(f"{path}: safetensors header length {n} is larger than the 100 MB limit (corrupt file?)")
            if 8 + n > size:
                raise InspectError(
                    f"{path}: safetensors header claims {n} bytes but the file has only {size - 8} after the length "
                    "(truncated download?)"
                )
            raw = f.read(n)
    except OSError as e:
        raise InspectError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InspectError(f"{path}: safetensors header is not valid JSON ({e.__class__.__name__}: {e})") from e
    if not isinstance(header, dict):
        raise InspectError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InspectError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise InspectError(f"{path}: tensor {key!r}: header entry is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise InspectError(f"{path}: tensor {key!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InspectError(f"{path}: tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise InspectError(f"{path}: tensor {key!r}: data_offsets {offs!r} are not [start, end]")
        if offs[1] > data_len:
            raise InspectError(
                f"{path}: tensor {key!r}: data ends at byte {offs[1]} but the file holds only {data_len} data bytes "
                "(truncated file?)"
            )
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != nbytes:
            raise InspectError(
                f"{path}: tensor {key!r}: {offs[1] - offs[0]} bytes stored but {dtype} {shape} needs {nbytes}"
            )
        tensors[key] = TensorInfo(key, dtype, tuple(shape), nbytes, offs[0])
        spans.append((offs[0], offs[1], key))
    spans.sort()
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InspectError(f"{path}: tensors {k0!r} and {k1!r} overlap in the file (corrupt header)")
    return tensors, meta, 8 + n


class SafetensorsSource(TensorSource):
    """Lazy: the header now, tensor data through ``safe_open`` when a key is asked for."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors, self.metadata, self.data_start = read_safetensors_header(path)
        self._handle = None

    def scalar(self, key: str) -> float:
        """Read a one-element tensor straight from the file (no torch), e.g. a kohya ``.alpha``."""
        info = self.tensors.get(key)
        if info is None:
            raise InspectError(f"{self.path}: no tensor named {key!r}")
        if info.numel != 1:
            raise InspectError(f"{self.path}: tensor {key!r} must hold one value, found shape {info.shape}")
        if info.dtype == "BF16":
            fmt, pad = "<f", b"\0\0"  # bf16 is the high half of an f32
        elif info.dtype in _SCALAR_FORMATS:
            fmt, pad = _SCALAR_FORMATS[info.dtype], b""
        else:
            return super().scalar(key)
        with self.path.open("rb") as f:
            f.seek(self.data_start + info.offset)
            raw = f.read(info.nbytes)
        return float(struct.unpack(fmt, pad + raw)[0])

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as e:  # SafetensorError and friends
                raise InspectError(f"{self.path}: safetensors refused the file: {e}") from e
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise InspectError(f"{self.path}: no tensor named {key!r}")
        info = self.tensors[key]
        if info.dtype not in _TORCH_NAMES.values():
            raise InspectError(f"{self.path}: tensor {key!r} has dtype {info.dtype}, which cannot be analysed")
        try:
            return self._open().get_tensor(key)
        except InspectError:
            raise
        except Exception as e:
            raise InspectError(f"{self.path}: cannot read tensor {key!r}: {e}") from e


class StateDictSource(TensorSource):
    """An in-memory state dict (from a ``.bin`` read with ``weights_only=True``)."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.path = path
        self._state = state
        self.metadata = metadata or {}
        self.tensors = {}
        for k, t in state.items():
            dt = _TORCH_NAMES.get(str(t.dtype).removeprefix("torch."))
            if dt is None:
                raise InspectError(f"{path}: tensor {k!r} has unsupported dtype {t.dtype}")
            self.tensors[k] = TensorInfo(k, dt, tuple(t.shape), t.numel() * t.element_size())

    def get(self, key: str) -> torch.Tensor:
        if key not in self._state:
            raise InspectError(f"{self.path}: no tensor named {key!r}")
        return self._state[key]


def load_bin(path: Path) -> StateDictSource:
    """Read a pickled state dict without executing code (``weights_only=True``)."""
    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not the user's concern, and not one line
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:
        msg = str(e).strip().splitlines()
        first = next((line for line in msg if line.strip()), e.__class__.__name__)
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise InspectError(
                f"{path}: refused: the pickle asks to run code or build objects that are not tensors "
                "(only plain tensors are loaded; convert it with a trusted tool to .safetensors)"
            ) from e
        raise InspectError(f"{path}: not a readable PyTorch state dict ({first[:200]})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InspectError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return StateDictSource(path, state)


def open_tensors(path: Path) -> TensorSource:
    if path.suffix == ".bin" or path.suffix == ".pt" or path.suffix == ".pth":
        return load_bin(path)
    return SafetensorsSource(path)
