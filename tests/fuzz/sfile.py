"""Raw safetensors files for the fuzzer: parse and build byte by byte (no safetensors/torch code), so a
mutation can produce any header, consistent or not.

Format (huggingface/safetensors README): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data
buffer; offsets are relative to the start of the buffer.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

__all__ = ["Entry", "SFile", "parse", "build", "DTYPE_SIZE"]

DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class Entry:
    name: str
    dtype: str
    shape: list[int]
    data: bytes


@dataclass
class SFile:
    entries: list[Entry]
    metadata: dict | None = None
    extra: dict = field(default_factory=dict)  # header keys that are not tensors (kept verbatim)


def parse(raw: bytes) -> SFile:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    buf = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    entries = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = info["data_offsets"]
        entries.append(Entry(name, info["dtype"], list(info["shape"]), buf[b:e]))
    return SFile(entries, meta)


def header_of(sf: SFile) -> dict:
    header: dict = {}
    if sf.metadata is not None:
        header["__metadata__"] = sf.metadata
    off = 0
    for e in sf.entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + len(e.data)]}
        off += len(e.data)
    header.update(sf.extra)
    return header


def build(sf: SFile, header: dict | None = None, *, header_text: bytes | None = None,
          header_len: int | None = None) -> bytes:
    """Bytes of ``sf``: offsets computed from the entries unless ``header``/``header_text`` is given."""
    if header_text is None:
        header_text = json.dumps(header if header is not None else header_of(sf), ensure_ascii=False).encode()
    n = len(header_text) if header_len is None else header_len
    return struct.pack("<Q", n % (1 << 64)) + header_text + b"".join(e.data for e in sf.entries)
