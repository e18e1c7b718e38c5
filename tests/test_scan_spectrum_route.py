"""The Gram/Cholesky reduction (``spectrum.gram_r_factor``, used by ``analysis.compute_spectra``) gives the
singular values of the Householder-QR route to 1e-6 of σ₁, and falls back to QR when κ is too large."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_inspect.cholesky import GRAM_MAX_COND, gram_r_factor
from lora_inspect.spectrum import core_singular_values, r_factor


def _factors(seed: int, out: int, inp: int, r: int, decades: float, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -decades, r, dtype=torch.float64)
    b = (torch.randn(out, r, generator=g, dtype=torch.float64) * scale).to(dtype)
    a = torch.randn(r, inp, generator=g, dtype=torch.float64).to(dtype)
    return _np(b), _np(a)


def _np(t: torch.Tensor) -> np.ndarray:
    """As the readers hand factors over: numpy, bf16 widened to float32 (exact)."""
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _dense(b, a, s):
    return np.linalg.svd(s * (b.astype(np.float64) @ a.astype(np.float64)), compute_uv=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 24), extra=st.integers(0, 40),
       decades=st.floats(0, 3.5), bf16=st.booleans())
def test_gram_route_equals_qr_route(seed, r, extra, decades, bf16):
    dt = torch.bfloat16 if bf16 else torch.float32
    b, a = _factors(seed, r + extra, r + 2 * extra + 1, r, decades, dt)
    rb, ra = gram_r_factor(b), gram_r_factor(a, rows=True)
    qb = r_factor(b.astype(np.float64))
    qa = r_factor(a.T.astype(np.float64))
    ref = core_singular_values([qb], [qa], [1.5], r)[0]
    assert np.allclose(ref, _dense(b, a, 1.5)[:r], rtol=0, atol=1e-9 * ref[0])
    if rb is None or ra is None:
        return  # refused (κ too large, or rank deficient): the caller takes QR
    ours = core_singular_values([rb], [ra], [1.5], r)[0]
    assert np.max(np.abs(ours - ref)) <= 1e-6 * ref[0]


def test_ill_conditioned_factors_are_refused():
    b, _ = _factors(1, 64, 64, 8, 8.0)  # eight decades: κ ≈ 1e8 > GRAM_MAX_COND
    assert gram_r_factor(b) is None
    b, _ = _factors(1, 64, 64, 8, 2.0)
    assert gram_r_factor(b) is not None and GRAM_MAX_COND >= 1e2
    assert gram_r_factor(np.zeros((16, 4), dtype=np.float32)) is None  # B = 0 (untrained): QR, which flags it
    assert gram_r_factor(np.ones((3, 8))) is None  # fewer rows than columns


@pytest.mark.parametrize("decades", [0.0, 2.0, 8.0])
def test_compute_spectra_same_on_both_routes(tmp_path, monkeypatch, decades):
    from builders import _hub_peft

    from lora_inspect.analysis import compute_spectra
    from lora_inspect.formats import load_adapter

    mods = {f"model.layers.0.self_attn.{p}": _factors(i, 48, 40, 8, decades, torch.float32)
            for i, p in enumerate(("q_proj", "v_proj"))}
    ad = load_adapter(_hub_peft(tmp_path / "p", {k: (torch.from_numpy(b), torch.from_numpy(a)) for k, (b, a) in mods.items()}, 8))
    monkeypatch.setenv("LORA_INSPECT_REDUCTION", "qr")
    qr = compute_spectra(ad.modules)
    monkeypatch.setenv("LORA_INSPECT_REDUCTION", "auto")
    gram = compute_spectra(ad.modules)
    for name, (sv, _) in qr.items():
        assert np.max(np.abs(gram[name][0] - sv)) <= 1e-6 * sv[0]


def test_factors_whose_gram_overflows_take_qr():
    b = np.random.default_rng(0).standard_normal((32, 4)) * 1e160  # finite, but BᵀB is not
    assert gram_r_factor(b) is None
