"""Tensor containers (lora_inspect.formats.tensors): the safetensors header is checked as the
safetensors library checks it (so ``info`` refuses exactly what ``safe_open`` would refuse later),
within limits, in one line; ``.bin`` files hold only plain tensors and never run a pickle."""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import run_cli, write_safetensors_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_inspect import validate
from lora_inspect.errors import InspectError
from lora_inspect.formats.bin_source import load_bin
from lora_inspect.formats.tensors import SafetensorsSource, open_tensors, read_safetensors_header

PROPS = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MOD = "base_model.model.layers.0.q_proj"


def _bad(path: Path, *needles: str) -> str:
    with pytest.raises(InspectError) as e:
        open_tensors(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _one(dtype="F32", shape=(1,), offs=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offs) if isinstance(offs, tuple) else offs}


# --- many tensors, long names ----------------------------------------------------------------------------


def test_as_many_zero_size_tensors_as_the_limit_allows_parse_fully(tmp_path):
    n = validate.MAX_TENSORS - 1
    header = {f"z{i}": _one(shape=[0], offs=[4, 4]) for i in range(n)}
    header[f"{MOD}.lora_A.weight"] = _one()
    f = write_safetensors_raw(tmp_path / "many.safetensors", header, b"\0" * 4)
    tensors, meta, start = read_safetensors_header(f)
    assert len(tensors) == n + 1 and meta == {}
    assert tensors["z12345"].nbytes == 0 and tensors["z12345"].shape == (0,) and tensors["z12345"].offset == 4
    assert start == 8 + len(json.dumps(header).encode())


def test_name_longer_than_limit_is_one_line(tmp_path):
    key = "m." * (validate.MAX_NAME_LENGTH // 2) + "lora_A.weight"
    f = write_safetensors_raw(tmp_path / "a.safetensors", {key: _one()}, b"\0" * 4)
    _bad(f, "characters", str(validate.MAX_NAME_LENGTH))
    ok = "m" * validate.MAX_NAME_LENGTH
    g = write_safetensors_raw(tmp_path / "b.safetensors", {ok: _one()}, b"\0" * 4)
    assert list(open_tensors(g).tensors) == [ok]


def test_200k_tensors_are_refused_by_the_header_in_one_line(tmp_path):
    header = {f"z{i}": _one(shape=[0], offs=[0, 0]) for i in range(200_000)}
    _bad(write_safetensors_raw(tmp_path / "a.safetensors", header), "200000 tensors", f"limit {validate.MAX_TENSORS}")


def test_tensor_count_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "MAX_TENSORS", 3)
    header = {f"t{i}": _one(shape=[0], offs=[0, 0]) for i in range(4)}
    _bad(write_safetensors_raw(tmp_path / "a.safetensors", header), "4 tensors", "limit 3")


# --- header entries ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry,needle", [
    (_one(dtype=["F32"]), "dtype"),  # unhashable: was a TypeError
    (_one(dtype="F33"), "dtype"),
    (_one(shape=[-1]), "shape"),
    (_one(shape=[True]), "shape"),  # a bool is not a dimension
    (_one(shape=[1.0]), "shape"),
    (_one(shape="1"), "shape"),
    (_one(shape=[1] * 17), "shape"),
    (_one(shape=[2**63]), "shape"),
    (_one(shape=[0, 2**62, 8], offs=[0, 0]), "int64"),  # product of the non-zero dims overflows
    (_one(offs=[0, True]), "data_offsets"),
    (_one(offs=[0.0, 4]), "data_offsets"),
    (_one(offs=[4, 0]), "data_offsets"),
    (_one(offs=[0, 4, 8]), "data_offsets"),
    (_one(offs=[-4, 0]), "data_offsets"),
    (_one(offs=[0, 2**70]), "truncated"),
    (_one(shape=[2]), "needs"),
    ([1, 2], "not an object"),
])
def test_bad_entry_is_one_line_naming_the_tensor(tmp_path, entry, needle):
    f = write_safetensors_raw(tmp_path / "a.safetensors", {"w": entry}, b"\0" * 4)
    _bad(f, "'w'", needle)


@pytest.mark.parametrize("header,data,needle", [
    ({"a": _one(offs=[4, 8])}, 8, "not 0"),
    ({"a": _one(), "b": _one(offs=[8, 12])}, 12, "gap"),
    ({"a": _one(), "b": _one(offs=[2, 6])}, 6, "overlap"),
    ({"a": _one(), "b": _one(shape=[0], offs=[2, 2])}, 4, "overlap"),
    ({"a": _one()}, 8, "after the last tensor"),
])
def test_layout_rules_of_the_safetensors_library(tmp_path, header, data, needle):
    f = write_safetensors_raw(tmp_path / "a.safetensors", header, b"\0" * data)
    _bad(f, needle)


def test_duplicate_tensor_name_and_bad_text(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    f = tmp_path / "dup.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    _bad(f, "'a' appears twice")
    for raw, needle in [(b"\xef\xbb\xbf{}", "not valid JSON"), (b'{"\xff": 1}', "UTF-8"),
                        (b'{"a\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "surrogate"),
                        (b"[" * 100_000, "nested"), (b'{"__metadata__": {"k": 1}}', "__metadata__")]:
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
        _bad(f, needle)


@pytest.mark.parametrize("cmd", ["info", "rank"])
def test_deeply_nested_header_through_the_cli(tmp_path, cmd):
    raw = b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    f = tmp_path / "deep.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    res = run_cli(cmd, f)
    assert res.exit_code == 2 and "nested" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr


# the header reader accepts a file ⇔ the safetensors library opens it and reads every tensor
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I8", "BF16", "F64"]),
    "shape": st.lists(st.integers(0, 3), max_size=3),
    "data_offsets": st.tuples(st.integers(0, 40), st.integers(0, 40)).map(list),
})


@PROPS
@given(header=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), entries, max_size=4), data=st.integers(0, 48))
def test_header_reader_agrees_with_safe_open(tmp_path_factory, header, data):
    from safetensors import safe_open

    f = write_safetensors_raw(tmp_path_factory.mktemp("h") / "x.safetensors", header, bytes(range(data)))
    try:
        theirs = {}
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                theirs[k] = tuple(h.get_tensor(k).shape)
    except Exception:
        theirs = None
    try:
        ours = {k: t.shape for k, t in read_safetensors_header(f)[0].items()}
    except InspectError as e:
        assert "\n" not in str(e)
        ours = None
    assert ours == theirs, (header, data)


# --- values, errors after the header ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scalar_of_nan_and_inf_is_a_float_for_the_caller_to_refuse(tmp_path, dtype):
    f = tmp_path / "a.safetensors"
    save_file({"x.alpha": torch.tensor([math.nan], dtype=dtype), "y.alpha": torch.tensor([-math.inf], dtype=dtype),
               "z.alpha": torch.tensor(4.0, dtype=dtype)}, str(f))
    src = open_tensors(f)
    assert math.isnan(src.scalar("x.alpha")) and src.scalar("y.alpha") == -math.inf and src.scalar("z.alpha") == 4.0


def test_file_changed_after_the_header_is_one_line(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(f))
    src = SafetensorsSource(f)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(InspectError) as e:
        src.get("w")
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)
    with pytest.raises(InspectError, match="no tensor named 'v'"):
        src.get("v")


from builders import in_thread as _in_thread  # noqa: E402


@pytest.mark.parametrize("name", ["adapter.safetensors", "adapter.bin"])
def test_fifo_adapter_is_refused_without_blocking(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    box = _in_thread(lambda: open_tensors(fifo))
    assert isinstance(box.get("error"), InspectError) and "FIFO" in str(box["error"]), box


# --- .bin: only plain tensors -------------------------------------------------------------------------------


def _bin(tmp_path: Path, state) -> Path:
    f = tmp_path / "adapter.bin"
    torch.save(state, f)
    return f


@pytest.mark.parametrize("make,needle", [
    (lambda: torch.eye(3).to_sparse(), "sparse"),
    (lambda: torch.eye(3).to_sparse_csr(), "sparse"),
    (lambda: torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.qint8), "quantized"),
    (lambda: {"inner": torch.ones(2)}, "nested dict"),
    (lambda: [torch.ones(2)], "not a tensor"),
    (lambda: torch.ones(2, dtype=torch.complex64), "dtype"),
])
def test_bin_entries_that_are_not_plain_tensors(tmp_path, make, needle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta/deprecation notes about building these
        value = make()
    f = _bin(tmp_path, {f"{MOD}.lora_A.weight": torch.ones(2, 4), f"{MOD}.lora_B.weight": value})
    msg = _bad(f, needle)
    assert "lora_B" in msg


def test_bin_non_string_key_and_parameter(tmp_path):
    _bad(_bin(tmp_path, {1: torch.ones(2)}), "not a string")
    src = load_bin(_bin(tmp_path, {"w": torch.nn.Parameter(torch.ones(2, 2))}))
    assert type(src.get("w")) is np.ndarray and src.get("w").tolist() == [[1.0, 1.0], [1.0, 1.0]]


class _SubTensor(torch.Tensor):
    pass


def test_bin_tensor_subclass_is_refused(tmp_path):
    Sub = _SubTensor
    torch.serialization.add_safe_globals([Sub])  # even when the unpickler is told to allow it
    try:
        f = _bin(tmp_path, {"w": torch.ones(2).as_subclass(Sub)})
        _bad(f, "subclass")
    finally:
        torch.serialization.clear_safe_globals()


header_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**64) | st.floats() | st.sampled_from(["F32", "BF16", "x", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["a", "dtype", "shape", "data_offsets", "__metadata__"]), inner, max_size=4),
    max_leaves=12,
)


@PROPS
@given(header=header_json, data=st.integers(0, 16))
def test_any_header_is_read_or_refused_in_one_line(tmp_path_factory, header, data):
    f = write_safetensors_raw(tmp_path_factory.mktemp("j") / "x.safetensors", {"t": header} if data % 2 else header,
                              bytes(data))
    try:
        tensors, meta, _ = read_safetensors_header(f)
    except InspectError as e:
        assert str(e).startswith(str(f)) and "\n" not in str(e)
    else:
        assert all(t.nbytes == math.prod(t.shape) * {"F32": 4, "BF16": 2}[t.dtype] for t in tensors.values())


def test_a_file_replaced_after_its_header_was_read_is_refused(tmp_path):
    """The data is mapped only from the file whose header was read: a file replaced in between (same name,
    other content) is one line, never data read at the old header's offsets."""
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    src = SafetensorsSource(path)
    other = tmp_path / "b.safetensors"
    save_file({"w": torch.full((4, 4), 7.0), "v": torch.zeros(64)}, str(other))
    os.replace(other, path)
    with pytest.raises(InspectError, match="changed after its header was read"):
        src.get("w")
