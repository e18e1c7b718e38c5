"""Mutations: each takes a copy of a seed adapter and damages it in one way (the family), returning a
short description. Deterministic given the ``random.Random`` passed in.

Families: safetensors header (length, JSON text, nesting, field types, dtypes, shapes, offsets,
metadata), file (truncation, byte flips, trailing junk), values (NaN/Inf, all-zero B), structure of
A/B (drop, swap, rank mismatch, 1-D, zero-size), names (very long, unicode, empty, many tensors),
configs (adapter_config.json, mlx config, ``lora_adapter_metadata``, kohya ``ss_*``: values of every
type, pathological patterns, encodings, nesting), .bin (pickles that run code, zip damage, non-tensor
contents) and special files (FIFO, directory named like a file, symlink loops, /dev/zero).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .seeds import Seed
from .sfile import DTYPE_SIZE, Entry, SFile, build, header_of, parse

__all__ = ["Mutated", "FAMILIES", "mutate", "HOSTILE_VALUES", "PATTERN_KEYS"]


@dataclass
class Mutated:
    seed: str
    family: str
    desc: str
    path: Path  # the mutated input given to the commands
    marker: Path | None = None  # a file that must never appear (a pickle that would create it)
    expect_check_fails: bool = False  # `check` must not pass this input (non-finite or untrained weights)


# values of every JSON type, and the numbers that break arithmetic
HOSTILE_VALUES: list = [None, [], [2], {}, {"a": None}, "", "8", "abc", "(.*)*x", float("nan"), float("inf"),
                        float("-inf"), 10 ** 400, 2 ** 63, -1, 0, -0.0, 1e-320, 1e308, True, False, 3.5, "NaN",
                        [[[]]], "\u0000", "é" * 50]
PATTERN_KEYS = ["(.*)*x", "(a+)+$", "(a|aa)+b", "([a-z]+)*\\d", "^(.*?,){30}P", "[", "(?P<x", "\\", "", ".*",
                "q_proj", "model.layers.0.self_attn.q_proj", "layers\\.[0-9]+\\.q_proj", "é", "x" * 10000]
PEFT_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
             "fan_in_fan_out", "peft_type", "modules_to_save", "layers_to_transform", "layers_pattern", "bias",
             "base_model_name_or_path", "task_type", "exclude_modules", "lora_bias", "revision", "init_lora_weights"]
MLX_KEYS = ["fine_tune_type", "num_layers", "lora_parameters", "lora_parameters.rank", "lora_parameters.scale",
            "lora_parameters.keys", "lora_parameters.dropout", "lora_parameters.alpha"]
KOHYA_META = ["ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_sd_model_name", "ss_network_module",
              "ss_network_args", "format"]
DTYPES = list(DTYPE_SIZE) + ["F4", "XYZ", "", "C64", "f32"]


def _copy(seed: Seed, dst: Path) -> Path:
    out = dst / seed.path.name
    if seed.is_dir:
        shutil.copytree(seed.path, out)
    else:
        shutil.copyfile(seed.path, out)
    return out


def _weights(seed: Seed, inp: Path) -> Path:
    return inp / seed.weights.name if seed.is_dir else inp


def _rx(rng: random.Random, xs: list):
    return xs[rng.randrange(len(xs))]


def _is_st(seed: Seed) -> bool:
    return seed.weights.suffix == ".safetensors"


def _raw(seed: Seed, inp: Path) -> tuple[Path, bytes, int, dict]:
    w = _weights(seed, inp)
    raw = w.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return w, raw, n, json.loads(raw[8:8 + n])


def _rewrite_header(w: Path, raw: bytes, n: int, body: bytes) -> None:
    """Write ``w`` again with a new header ``body`` (its length prefix recomputed) and the old data."""
    w.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# ---- safetensors header ---------------------------------------------------------------------------------

def m_header_len(rng, seed, inp):
    w, raw, n, _ = _raw(seed, inp)
    v = _rx(rng, [0, 1, 7, n - 1, n + 1, n + 8, len(raw), len(raw) - 8, 2 ** 63 - 1, 2 ** 64 - 1, 10 ** 9, 2 ** 32])
    w.write_bytes(struct.pack("<Q", v % 2 ** 64) + raw[8:])
    return f"header length {n} → {v}"


def m_header_text(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    text = raw[8:8 + n]
    kind = _rx(rng, ["cut", "cut-keep-len", "garbage", "utf16", "bom", "dup-key", "empty"])
    if kind == "cut":
        new = text[: rng.randrange(max(n, 1))]
    elif kind == "cut-keep-len":
        c = rng.randrange(max(n, 1))
        new = text[:c] + b" " * (n - c)
    elif kind == "garbage":
        new = bytes(rng.randrange(256) for _ in range(min(n, 64))) + text[64:]
    elif kind == "utf16":
        new = text.decode().encode("utf-16")
    elif kind == "bom":
        new = b"\xef\xbb\xbf" + text
    elif kind == "dup-key":
        k = _rx(rng, _tensor_names(h))
        new = text[:-1] + b"," + json.dumps(k).encode() + b":" + json.dumps(h[k]).encode() + b"}"
    else:
        new = b""
    w.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return f"header JSON {kind}"


def m_header_nest(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    depth = _rx(rng, [64, 1000, 5000, 100000])
    where = _rx(rng, ["root-value", "metadata", "shape", "top"])
    nested = "[" * depth + "]" * depth
    if where == "top":
        text = nested
    else:
        text = json.dumps(h)
        k = _rx(rng, _tensor_names(h))
        if where == "root-value":
            text = text[:-1] + ', "zz": ' + nested + "}"
        elif where == "metadata":
            text = text[:-1] + ', "__metadata__": {"x": ' + nested + "}}"
        else:
            h2 = dict(h)
            h2[k] = dict(h[k], shape="@@")
            text = json.dumps(h2).replace('"@@"', nested)
    _rewrite_header(w, raw, n, text.encode())
    return f"header nested depth {depth} at {where}"


def m_header_field(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    k = _rx(rng, _tensor_names(h))
    field = _rx(rng, ["dtype", "shape", "data_offsets", "entry", "extra-field", "missing"])
    v = _rx(rng, HOSTILE_VALUES)
    if field == "entry":
        h[k] = v
    elif field == "extra-field":
        h[k] = dict(h[k], zz=v)
    elif field == "missing":
        f = _rx(rng, ["dtype", "shape", "data_offsets"])
        h[k] = {a: b for a, b in h[k].items() if a != f}
        v = f"(no {f})"
    else:
        h[k] = dict(h[k], **{field: v})
    _rewrite_header(w, raw, n, json.dumps(h).encode())
    return f"{k[-40:]}: {field} = {v!r:.40}"


def m_dtype(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    k = _rx(rng, _tensor_names(h))
    d = _rx(rng, DTYPES)
    consistent = rng.random() < 0.5 and d in DTYPE_SIZE
    sf = parse(raw)
    for e in sf.entries:
        if e.name == k:
            old = DTYPE_SIZE.get(e.dtype, 4)
            e.dtype = d
            if consistent and e.shape:  # reinterpret the same bytes: fix the last dim
                total = len(e.data) // DTYPE_SIZE[d]
                rest = 1
                for s in e.shape[:-1]:
                    rest *= s
                if rest and total % rest == 0:
                    e.shape = e.shape[:-1] + [total // rest]
                else:
                    e.shape = [total]
            elif consistent:
                e.data = e.data[: DTYPE_SIZE[d]].ljust(DTYPE_SIZE[d], b"\0")
            del old
    w.write_bytes(build(sf, header={**header_of(sf), **({"__metadata__": h["__metadata__"]} if "__metadata__" in h else {})}))
    return f"{k[-40:]}: dtype → {d!r} ({'sizes consistent' if consistent else 'same offsets'})"


def m_shape(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    k = _rx(rng, _tensor_names(h))
    shp = list(h[k]["shape"])
    kind = _rx(rng, ["swap", "1-D", "add-dim", "zero", "negative", "huge", "float", "scalar", "overflow-product"])
    if kind == "swap":
        shp = shp[::-1]
    elif kind == "1-D":
        p = 1
        for s in shp:
            p *= s
        shp = [p]
    elif kind == "add-dim":
        shp = shp + [1]
    elif kind == "zero":
        shp = [0] + shp[1:]
    elif kind == "negative":
        shp = [-s for s in shp] or [-1]
    elif kind == "huge":
        shp = [2 ** 62] + shp[1:]
    elif kind == "float":
        shp = [s + 0.5 for s in shp]
    elif kind == "scalar":
        shp = []
    else:
        shp = [2 ** 32, 2 ** 32, 2 ** 32]
    h[k]["shape"] = shp
    _rewrite_header(w, raw, n, json.dumps(h).encode())
    return f"{k[-40:]}: shape {kind} → {str(shp)[:40]}"


def m_offsets(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    names = _tensor_names(h)
    k = _rx(rng, names)
    b, e = h[k]["data_offsets"]
    size = len(raw) - 8 - n
    kind = _rx(rng, ["reversed", "past-end", "overlap", "shift", "huge", "negative", "float", "three", "gap"])
    new = {"reversed": [e, b], "past-end": [b, size + 4], "overlap": [max(b - 4, 0), e - 4 if e >= 4 else e],
           "shift": [b + 1, e + 1], "huge": [b, 2 ** 64 + e], "negative": [-4, e], "float": [b + 0.5, e],
           "three": [b, e, e], "gap": [b + 4, e + 4]}[kind]
    h[k]["data_offsets"] = new
    _rewrite_header(w, raw, n, json.dumps(h).encode())
    return f"{k[-40:]}: data_offsets {kind} → {new}"


def m_metadata(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    kind = _rx(rng, ["not-object", "value-type", "kohya", "lora_adapter_metadata"])
    meta = dict(h.get("__metadata__") or {})
    if kind == "not-object":
        h["__metadata__"] = _rx(rng, HOSTILE_VALUES)
        d = f"__metadata__ = {h['__metadata__']!r:.40}"
    elif kind == "value-type":
        meta[_rx(rng, ["format", "x"])] = _rx(rng, HOSTILE_VALUES)
        h["__metadata__"] = meta
        d = f"__metadata__ value {meta!r:.60}"
    elif kind == "kohya":
        key = _rx(rng, KOHYA_META)
        v = _rx(rng, HOSTILE_VALUES)
        meta[key] = v if isinstance(v, str) else json.dumps(v)
        h["__metadata__"] = meta
        d = f"metadata {key} = {meta[key]!r:.40}"
    else:
        cfg = json.loads(meta.get("lora_adapter_metadata", "{}") or "{}") if seed.meta_config else {"r": 4}
        d = _mutate_config_obj(rng, cfg, PEFT_KEYS)
        meta["lora_adapter_metadata"] = cfg if isinstance(cfg, str) else json.dumps(cfg)
        h["__metadata__"] = meta
        d = "lora_adapter_metadata: " + d
    _rewrite_header(w, raw, n, json.dumps(h).encode())
    return d


def m_many_tensors(rng, seed, inp):
    w, raw, n, h = _raw(seed, inp)
    count = _rx(rng, [1000, 20000, 200000])
    end = len(raw) - 8 - n
    for i in range(count):
        h[f"zz.{i}.lora_A.weight"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [end, end]}
    _rewrite_header(w, raw, n, json.dumps(h).encode())
    return f"{count} extra zero-size tensors"


# ---- file level -----------------------------------------------------------------------------------------

def m_truncate(rng, seed, inp):
    w = _weights(seed, inp)
    raw = w.read_bytes()
    c = _rx(rng, [0, 1, 7, 8, 9, rng.randrange(len(raw)), len(raw) - 1, len(raw) // 2])
    w.write_bytes(raw[:c])
    return f"{w.name} truncated to {c} of {len(raw)} bytes"


def m_byte_flip(rng, seed, inp):
    w = _weights(seed, inp)
    raw = bytearray(w.read_bytes())
    k = _rx(rng, [1, 2, 8, 64])
    where = _rx(rng, ["anywhere", "head"])
    lim = min(len(raw), 4096) if where == "head" else len(raw)
    for _ in range(k):
        i = rng.randrange(lim)
        raw[i] ^= 1 << rng.randrange(8)
    w.write_bytes(bytes(raw))
    return f"{k} bit flips ({where}) in {w.name}"


def m_junk(rng, seed, inp):
    w = _weights(seed, inp)
    with open(w, "ab") as f:
        f.write(bytes(rng.randrange(256) for _ in range(_rx(rng, [1, 100, 4096]))))
    return f"trailing junk after {w.name}"


# ---- tensor values and A/B structure (re-serialised consistently) ----------------------------------------

def _pairs_any(sf: SFile) -> list[tuple[Entry, Entry]]:
    """A/B pairs; for a file without any (LoHa, LoKr), two factors of one module (e.g. hada_w1_a, hada_w1_b)."""
    pairs = _ab_pairs(sf)
    if pairs:
        return pairs
    groups: dict[str, list[Entry]] = {}
    for e in sf.entries:
        if ".hada_" in e.name or ".lokr_" in e.name:
            groups.setdefault(e.name.rsplit(".", 1)[0], []).append(e)
    return [(g[0], g[1]) for g in (sorted(v, key=lambda e: e.name) for v in groups.values()) if len(g) >= 2]


def _ab_pairs(sf: SFile) -> list[tuple[Entry, Entry]]:
    """(A, B) entries of every module, by the key conventions of every layout."""
    pairs = []
    by = {e.name: e for e in sf.entries}
    for a_s, b_s in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
                     (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
                     (".lora_a", ".lora_b")):
        for name, e in by.items():
            if name.endswith(a_s) and name[: -len(a_s)] + b_s in by:
                pairs.append((e, by[name[: -len(a_s)] + b_s]))
    return pairs


def _fill(e: Entry, value: float) -> None:
    import numpy as np

    if e.dtype == "F32":
        e.data = np.full(len(e.data) // 4, value, dtype="<f4").tobytes()
    elif e.dtype == "F16":
        e.data = np.full(len(e.data) // 2, value, dtype="<f2").tobytes()
    elif e.dtype == "BF16":
        e.data = (np.full(len(e.data) // 2, value, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()


def m_values(rng, seed, inp, out: Mutated):
    w = _weights(seed, inp)
    sf = parse(w.read_bytes())
    pairs = _pairs_any(sf)
    kind = _rx(rng, ["nan", "inf", "zero-B-all", "zero-B-one", "huge", "alpha-nan", "alpha-neg", "alpha-zero", "tiny"])
    a, b = _rx(rng, pairs)
    if kind in ("nan", "inf", "huge", "tiny"):
        import numpy as np

        x = bytearray(b.data)
        v = {"nan": np.float32("nan"), "inf": np.float32("inf"), "huge": np.float32(3e38), "tiny": np.float32(1e-44)}[kind]
        if kind == "tiny":
            _fill(b, 1e-44)
            _fill(a, 1e-44)
        else:
            x[:4] = v.tobytes()
            b.data = bytes(x)
        out.expect_check_fails = kind in ("nan", "inf")
    elif kind == "zero-B-all":
        for _, bb in pairs:
            _fill(bb, 0.0)
        out.expect_check_fails = True
    elif kind == "zero-B-one":
        _fill(b, 0.0)
        out.expect_check_fails = True
    else:
        alphas = [e for e in sf.entries if e.name.endswith(".alpha")]
        if not alphas:
            return m_values(rng, seed, inp, out) if rng.random() < 0.5 else _alpha_add(sf, w, b, kind)
        import numpy as np

        v = {"alpha-nan": np.nan, "alpha-neg": -4.0, "alpha-zero": 0.0}[kind]
        e = _rx(rng, alphas)
        e.data = np.array(v, dtype="<f4").tobytes()[: len(e.data)] if e.dtype == "F32" else e.data
        out.expect_check_fails = kind == "alpha-nan"
    w.write_bytes(build(sf))
    return f"{kind} in {b.name[-40:]}"


def _alpha_add(sf: SFile, w: Path, b: Entry, kind: str) -> str:
    import numpy as np

    stem = b.name.rsplit(".lora", 1)[0].rsplit("_lora", 1)[0]
    v = {"alpha-nan": np.nan, "alpha-neg": -4.0, "alpha-zero": 0.0}[kind]
    sf.entries.append(Entry(stem + ".alpha", "F32", [], np.array(v, dtype="<f4").tobytes()))
    w.write_bytes(build(sf))
    return f"added {kind} .alpha for {stem[-40:]}"


def _lycoris_structure(rng, sf: SFile, w: Path) -> str:
    """Files without A/B pairs (LoHa, LoKr): drop one factor, or transpose its declared shape."""
    facs = [e for e in sf.entries if ".hada_" in e.name or ".lokr_" in e.name]
    e = _rx(rng, facs)
    if rng.random() < 0.5 or len(e.shape) < 2:
        sf.entries.remove(e)
        desc = f"dropped {e.name[-40:]}"
    else:
        e.shape = list(reversed(e.shape))
        desc = f"transposed the shape of {e.name[-40:]}"
    w.write_bytes(build(sf))
    return desc


def m_structure(rng, seed, inp):
    w = _weights(seed, inp)
    sf = parse(w.read_bytes())
    pairs = _ab_pairs(sf)
    if not pairs:
        return _lycoris_structure(rng, sf, w)
    a, b = _rx(rng, pairs)
    kind = _rx(rng, ["drop-A", "drop-B", "swap", "rank-mismatch", "1-D", "zero-rank", "transpose-A", "dup-name",
                     "drop-all-B", "only-extras"])
    if kind == "drop-A":
        sf.entries.remove(a)
    elif kind == "drop-B":
        sf.entries.remove(b)
    elif kind == "drop-all-B":
        for _, bb in pairs:
            sf.entries.remove(bb)
    elif kind == "only-extras":
        sf.entries = [Entry("base_model.model.lm_head.weight", "F32", [4, 4], b"\0" * 64)]
    elif kind == "swap":
        a.name, b.name = b.name, a.name
    elif kind == "rank-mismatch":
        r = a.shape[0] if len(a.shape) > 0 else 1
        sz = DTYPE_SIZE.get(a.dtype, 4)
        if len(a.shape) >= 2 and r > 1:
            a.shape = [r - 1] + a.shape[1:]
            a.data = a.data[: len(a.data) * (r - 1) // r]
        else:
            a.shape = [2, len(a.data) // sz]
            a.data = a.data * 2
    elif kind == "1-D":
        for e in (a, b):
            p = len(e.data) // DTYPE_SIZE.get(e.dtype, 4)
            e.shape = [p]
    elif kind == "zero-rank":
        a.shape = [0] + a.shape[1:]
        a.data = b""
        b.shape = b.shape[:1] + [0] + b.shape[2:]
        b.data = b""
    elif kind == "transpose-A":
        a.shape = a.shape[::-1]
    else:
        sf.entries.append(Entry(a.name, a.dtype, a.shape, a.data))
        w.write_bytes(build(sf, header_text=_dup_header(sf)))
        return f"duplicate key {a.name[-40:]}"
    w.write_bytes(build(sf))
    return f"A/B {kind} at {a.name[-40:]}"


def _dup_header(sf: SFile) -> bytes:
    parts, off = [], 0
    if sf.metadata is not None:
        parts.append('"__metadata__": ' + json.dumps(sf.metadata))
    for e in sf.entries:
        parts.append(json.dumps(e.name) + ": " + json.dumps({"dtype": e.dtype, "shape": e.shape,
                                                               "data_offsets": [off, off + len(e.data)]}))
        off += len(e.data)
    return ("{" + ", ".join(parts) + "}").encode()


def m_names(rng, seed, inp):
    w = _weights(seed, inp)
    sf = parse(w.read_bytes())
    a, b = _rx(rng, _pairs_any(sf))
    kind = _rx(rng, ["long", "very-long", "unicode", "empty", "newline", "dots", "control", "rtl", "path"])
    ins = {"long": "m" * 10000, "very-long": "m" * _rx(rng, [10 ** 6, 10 ** 7]), "unicode": "模块_ß_🙂",
           "empty": "", "newline": "a\nb\r\nc", "dots": "....", "control": "\x1b[31mred\x07", "rtl": "\u202eevil",
           "path": "../../etc/passwd"}[kind]
    for e in (a, b):
        head, sep, tail = e.name.rpartition(".lora")
        if not sep:
            head, sep, tail = e.name.rpartition("_lora")
        if kind == "empty":
            e.name = sep.lstrip(".") + tail if sep else ""
        else:
            e.name = f"{head}.{ins}{sep}{tail}" if sep else ins + e.name
    w.write_bytes(build(sf))
    return f"module name {kind} ({len(ins)} chars)"


# ---- configs ----------------------------------------------------------------------------------------------

def _mutate_config_obj(rng, cfg, keys: list[str]) -> str:
    """Change ``cfg`` (a dict) in place: one key to a hostile value, or a pathological pattern."""
    kind = _rx(rng, ["value", "value", "pattern", "pattern-value"])
    if kind == "value":
        key = _rx(rng, keys)
        v = _rx(rng, HOSTILE_VALUES)
        if "." in key:
            a, k = key.split(".", 1)
            if not isinstance(cfg.get(a), dict):
                cfg[a] = {}
            cfg[a][k] = v
        else:
            cfg[key] = v
        return f"{key} = {v!r:.40}"
    field = _rx(rng, ["rank_pattern", "alpha_pattern"])
    if kind == "pattern":
        k = _rx(rng, PATTERN_KEYS)
        cfg[field] = {k: 2}
        return f"{field} key {k!r:.40}"
    v = _rx(rng, HOSTILE_VALUES)
    cfg[field] = {"q_proj": v}
    return f"{field}[q_proj] = {v!r:.40}"


def m_config(rng, seed, inp):
    if seed.config is None:
        return m_metadata(rng, seed, inp) if _is_st(seed) else m_truncate(rng, seed, inp)
    p = inp / seed.config.name
    cfg = json.loads(p.read_text())
    keys = MLX_KEYS if seed.layout == "mlx" else PEFT_KEYS
    d = _mutate_config_obj(rng, cfg, keys)
    p.write_text(json.dumps(cfg))
    return f"{p.name}: {d}"


def m_config_file(rng, seed, inp):
    if seed.config is None:
        return m_header_text(rng, seed, inp) if _is_st(seed) else m_zip(rng, seed, inp)
    p = inp / seed.config.name
    text = p.read_text()
    kind = _rx(rng, ["truncated", "not-json", "utf16-bom", "utf8-bom", "latin1", "deep", "list", "empty",
                     "binary", "null", "huge-int", "missing"])
    if kind == "truncated":
        p.write_text(text[: rng.randrange(len(text))])
    elif kind == "not-json":
        p.write_text("r: 8\nlora_alpha: 16\n")
    elif kind == "utf16-bom":
        p.write_bytes(text.encode("utf-16"))
    elif kind == "utf8-bom":
        p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    elif kind == "latin1":
        p.write_bytes(text[:-1].encode() + ', "base_model_name_or_path": "caf\xe9"}'.encode("latin-1"))
    elif kind == "deep":
        d = _rx(rng, [1000, 100000])
        p.write_text(text[:-1] + ', "zz": ' + "[" * d + "]" * d + "}")
    elif kind == "list":
        p.write_text("[" + text + "]")
    elif kind == "empty":
        p.write_text("")
    elif kind == "binary":
        p.write_bytes(bytes(rng.randrange(256) for _ in range(200)))
    elif kind == "null":
        p.write_text("null")
    elif kind == "huge-int":
        p.write_text(text[:-1] + ', "r": ' + "9" * 5000 + "}")
    else:
        p.unlink()
    return f"{p.name}: {kind}"


# ---- .bin: pickles and zips -------------------------------------------------------------------------------

class _Exec:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _evil_pickle(marker: Path, how: str) -> bytes:
    import pickle

    cmd = f"touch {marker}"
    if how == "reduce":
        return pickle.dumps({"x": _Exec(cmd)}, protocol=2)
    if how == "eval":
        return b"cbuiltins\neval\n(V__import__('os').system(" + repr(cmd).encode() + b")\ntR."
    # an exec via subprocess.call hidden inside a dict value
    return b"(dp0\nVa\ncsubprocess\ncall\n((Vsh\nV-c\nV" + cmd.encode() + b"\nltR" + b"s."


def m_pickle(rng, seed, inp, out: Mutated):
    w = _weights(seed, inp)
    if w.suffix != ".bin":
        w = w.with_suffix(".bin") if not seed.is_dir else inp / "adapter_model.bin"
        if seed.is_dir:
            _weights(seed, inp).unlink()
        else:
            inp.unlink()
            out.path = w
    marker = out.marker
    assert marker is not None
    how = _rx(rng, ["reduce", "eval", "subprocess"])
    container = _rx(rng, ["zip", "legacy"])
    write_pickle(w, _evil_pickle(marker, how), container)
    return f"pickle that runs code ({how}, {container}) as {w.name}"


def write_pickle(w: Path, payload: bytes, container: str) -> None:
    """A pickle as torch would find it: bare (``legacy``) or inside torch's zip layout (``zip``)."""
    if container == "legacy":
        w.write_bytes(payload)
    else:
        with zipfile.ZipFile(w, "w") as z:
            z.writestr("archive/data.pkl", payload)
            z.writestr("archive/version", "3\n")
            z.writestr("archive/byteorder", "little")


def m_bin_content(rng, seed, inp, out: Mutated):
    import torch

    w = _weights(seed, inp)
    if w.suffix != ".bin":
        return m_pickle(rng, seed, inp, out)
    kind = _rx(rng, ["list", "int-value", "str-key", "nested", "empty", "sparse", "complex", "bool", "int8",
                     "meta", "noncontig", "tensor-subclass-param", "huge-shape-zero"])
    state = torch.load(str(w), weights_only=True)
    k = _rx(rng, sorted(state))
    obj: object
    if kind == "list":
        obj = list(state.values())
    elif kind == "int-value":
        state[k] = 3
        obj = state
    elif kind == "str-key":
        obj = {**state, 7: torch.zeros(2)}
    elif kind == "nested":
        obj = {"state_dict": state}
    elif kind == "empty":
        obj = {}
    elif kind == "sparse":
        state[k] = state[k].to_sparse()
        obj = state
    elif kind == "complex":
        state[k] = state[k].to(torch.complex64)
        obj = state
    elif kind == "bool":
        state[k] = state[k] > 0
        obj = state
    elif kind == "int8":
        state[k] = state[k].to(torch.int8)
        obj = state
    elif kind == "meta":
        state[k] = torch.empty(state[k].shape, device="meta")
        obj = state
    elif kind == "noncontig":
        state[k] = state[k].t().contiguous().t()
        obj = state
    elif kind == "tensor-subclass-param":
        state[k] = torch.nn.Parameter(state[k])
        obj = state
    else:
        state[k] = torch.zeros(0, 2 ** 40) if rng.random() < 0.5 else torch.zeros(2 ** 20, 0)
        obj = state
    torch.save(obj, str(w))
    return f".bin holds {kind} ({k[-40:]})"


def m_zip(rng, seed, inp):
    w = _weights(seed, inp)
    if w.suffix != ".bin":
        return m_byte_flip(rng, seed, inp)
    raw = bytearray(w.read_bytes())
    kind = _rx(rng, ["truncate", "cd-flip", "local-flip", "drop-data-pkl", "drop-storage", "rename-dir", "eocd-cut"])
    if kind == "truncate":
        raw = raw[: rng.randrange(len(raw))]
    elif kind in ("cd-flip", "local-flip"):
        sig = b"PK\x01\x02" if kind == "cd-flip" else b"PK\x03\x04"
        pos = [i for i in range(len(raw) - 4) if raw[i:i + 4] == sig]
        i = _rx(rng, pos) + rng.randrange(4, 30)
        raw[i] ^= 0xFF
    elif kind == "eocd-cut":
        raw = raw[:-rng.randrange(1, 22)]
    else:
        zin = zipfile.ZipFile(w)
        items = [(i, zin.read(i)) for i in zin.infolist()]
        zin.close()
        with zipfile.ZipFile(w, "w") as z:
            dropped = False
            for info, data in items:
                name = info.filename
                if kind == "drop-data-pkl" and name.endswith("data.pkl"):
                    continue
                if kind == "drop-storage" and "/data/" in name and not dropped:
                    dropped = True
                    continue
                if kind == "rename-dir":
                    name = "zz/" + name.split("/", 1)[1]
                z.writestr(name, data)
        return f".bin zip {kind}"
    w.write_bytes(bytes(raw))
    return f".bin zip {kind}"


# ---- special files ----------------------------------------------------------------------------------------

def m_special(rng, seed, inp, out: Mutated):
    kind = _rx(rng, ["fifo", "dir-named-file", "symlink-loop", "dev-zero", "dev-null", "dangling", "config-fifo",
                     "config-dir", "config-dev-zero", "empty-dir"])
    target = _weights(seed, inp)
    if kind.startswith("config-"):
        if seed.config is None:
            kind = "fifo"
        else:
            target = inp / seed.config.name
    if kind == "empty-dir":
        if seed.is_dir:
            shutil.rmtree(inp)
        else:
            inp.unlink()
            inp = out.path = inp.parent / "empty"
        inp.mkdir()
        return "an empty directory"
    target.unlink()
    if kind in ("fifo", "config-fifo"):
        os.mkfifo(target)
    elif kind in ("dir-named-file", "config-dir"):
        target.mkdir()
    elif kind == "symlink-loop":
        other = target.with_name(target.name + ".loop")
        os.symlink(other.name, target)
        os.symlink(target.name, other)
    elif kind in ("dev-zero", "config-dev-zero"):
        os.symlink("/dev/zero", target)
    elif kind == "dev-null":
        os.symlink("/dev/null", target)
    else:
        os.symlink(target.name + ".missing", target)
    return f"{target.name} is a {kind}"


Mutation = Callable[..., str]
FAMILIES: dict[str, tuple[float, Mutation, bool]] = {
    # name: (weight, function, needs the Mutated record)
    "header-len": (1.0, m_header_len, False),
    "header-json": (1.5, m_header_text, False),
    "header-nest": (1.0, m_header_nest, False),
    "header-field": (3.0, m_header_field, False),
    "dtype": (1.5, m_dtype, False),
    "shape": (1.5, m_shape, False),
    "offsets": (1.5, m_offsets, False),
    "metadata": (2.0, m_metadata, False),
    "many-tensors": (0.3, m_many_tensors, False),
    "truncate": (1.5, m_truncate, False),
    "byte-flip": (2.0, m_byte_flip, False),
    "junk": (0.5, m_junk, False),
    "values": (2.0, m_values, True),
    "structure": (2.5, m_structure, False),
    "names": (1.5, m_names, False),
    "config": (4.0, m_config, False),
    "config-file": (1.5, m_config_file, False),
    "pickle": (1.0, m_pickle, True),
    "bin-content": (1.0, m_bin_content, True),
    "zip": (1.0, m_zip, False),
    "special": (1.0, m_special, True),
}
ST_ONLY = {"header-len", "header-json", "header-nest", "header-field", "dtype", "shape", "offsets", "metadata",
           "many-tensors", "values", "structure", "names"}


def mutate(rng: random.Random, seeds: list[Seed], dst: Path, marker: Path, family: str | None = None) -> Mutated:
    """Copy a random seed into ``dst`` and apply one mutation (of ``family``, or one drawn by weight)."""
    while True:
        seed = _rx(rng, seeds)
        if family is None:
            names = list(FAMILIES)
            fam = rng.choices(names, weights=[FAMILIES[n][0] for n in names])[0]
        else:
            fam = family
        if fam in ST_ONLY and not _is_st(seed):
            if family is not None and not any(_is_st(s) for s in seeds):
                raise ValueError(f"family {family} needs a safetensors seed")
            continue
        if fam in ("bin-content", "zip") and seed.weights.suffix != ".bin" and family is None:
            continue
        break
    dst.mkdir(parents=True, exist_ok=True)
    inp = _copy(seed, dst)
    out = Mutated(seed.name, fam, "", inp, marker=marker)
    _, fn, needs = FAMILIES[fam]
    out.desc = fn(rng, seed, inp, out) if needs else fn(rng, seed, inp)
    return out
