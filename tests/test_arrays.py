"""The numpy tensor layer (``lora_inspect.arrays``): bf16 as raw bits, narrowed as torch narrows, widened exactly;
the marker dtype refuses arithmetic and casts; torch's door keeps the bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_inspect.arrays import BF16, decode, encode, from_torch, st_dtype, to_torch


def _values(seed: int) -> np.ndarray:
    """Seeded float64 values over 80 decades, with ±0, ±inf, float32's extremes, subnormals and halfway cases."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(50_000) * 10.0 ** rng.integers(-40, 40, 50_000)
    halfway = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32).astype(np.float64)  # ties
    special = [0.0, -0.0, np.inf, -np.inf, 3.4028234663852886e38, -3.4e38, 1e-45, 1e-39, 6e-8, 65504.0, 65520.0]
    return np.concatenate([x, halfway, -halfway, special])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("source", ["float64", "float32"])
@pytest.mark.parametrize("st, torch_dtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_encode_rounds_as_torch_does(seed, source, st, torch_dtype):
    with np.errstate(over="ignore"):
        x = _values(seed).astype(source)
    ours = encode(x, st)
    theirs = torch.from_numpy(x).to(torch_dtype)
    assert ours.shape == x.shape and st_dtype(ours) == st
    assert np.array_equal(ours.view(np.uint16), theirs.view(torch.int16).numpy().view(np.uint16))
    widened = decode(ours) if st == "BF16" else ours.astype(np.float32)
    assert np.array_equal(widened.view(np.uint32), theirs.float().numpy().view(np.uint32))  # exact widening


def test_nan_becomes_a_quiet_nan_and_shapes_are_kept():
    b = encode(np.array([np.nan, -np.nan, 1.0]), "BF16")
    assert b.view(np.uint16)[0] == 0x7FC0 and np.isnan(decode(b)[:2]).all() and decode(b)[2] == 1.0
    for shape in [(), (0,), (3, 0, 2), (2, 3, 1, 1)]:
        x = np.full(shape, 0.5, dtype=np.float32)
        assert encode(x, "BF16").shape == shape and decode(encode(x, "BF16")).shape == shape
        assert to_torch(encode(x, "BF16")).shape == shape


def test_the_marker_refuses_arithmetic_and_casts():
    b = encode(np.ones((2, 2), dtype=np.float32), "BF16")
    assert b.dtype == BF16
    for bad in (lambda: b.astype(np.float64), lambda: np.asarray(b, dtype=np.float32), lambda: b + 1,
                lambda: np.linalg.norm(b), lambda: b @ b):
        with pytest.raises((TypeError, ValueError, np.exceptions.DTypePromotionError)):
            bad()


def test_torch_door_keeps_the_bits():
    g = torch.Generator().manual_seed(3)
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.bool):
        t = (torch.randn(4, 5, generator=g) * 3).to(dt)
        a = from_torch(t.T)  # a non-contiguous tensor too
        assert a.shape == (5, 4) and torch.equal(to_torch(a), t.T.contiguous())
        assert st_dtype(a) == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
                               torch.float64: "F64", torch.int64: "I64", torch.bool: "BOOL"}[dt]


def test_float64_buffer_widens_exactly_into_reused_memory():
    from lora_inspect.arrays import float64_buffer

    x = (np.random.default_rng(5).standard_normal((7, 3)) * 100).astype(np.float32)
    b = encode(x, "BF16")
    for stored in (b, b.T, x, x.T, x.astype(np.float16)):
        got = float64_buffer(stored, 0)
        assert got.dtype == np.float64 and np.array_equal(got, decode(stored).astype(np.float64))
    first = float64_buffer(b, 0)
    other = float64_buffer(x, 1)  # another slot: the first result is untouched
    assert np.array_equal(first, decode(b).astype(np.float64)) and np.array_equal(other, x.astype(np.float64))
