"""Every layout in the registry × every command, parametrized from ``LAYOUTS`` (issue 19): a new layout is
tested by every command as soon as it is registered — and this file fails until ``tests/layout_builders.py``
has its builder.

For each layout a small adapter is built (:data:`tests.layout_builders.BUILDERS`) with ΔW computed in float64
from the raw tensors it was written from, then run through the CLI: ``info``, ``rank`` (singular values),
``truncate --rank 1`` (Eckart–Young), ``rescale`` (×0.5; ``--bake`` where the layout stores no α), ``convert``
to every target (what the target's capabilities cannot hold is refused in one line, exit 2, nothing written;
everything else keeps ΔW) and ``merge`` of the adapter with itself (2·ΔW)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_inspect.convert.canon import Canon, CanonModule, from_adapter
from lora_inspect.convert.flux import flux_for_target
from lora_inspect.formats import LAYOUTS, MERGE_TARGETS, TARGETS, layout_for_target, layout_of, load_adapter
from lora_inspect.formats.capabilities import AlphaHome
from lora_inspect.formats.layout import Held, Layout, Naming
from tests.builders import run_cli
from tests.layout_builders import BUILDERS, Built, Key

NAMES = [layout.name for layout in LAYOUTS]
REL = 1e-5  # fp32 factors, float64 references


def test_every_layout_has_exactly_one_builder():
    missing = [n for n in NAMES if n not in BUILDERS]
    assert not missing, f"layouts without a builder in tests/layout_builders.py: {missing}"
    assert not [n for n in BUILDERS if n not in NAMES], "builders for layouts that are not registered"
    assert len(NAMES) == len(set(NAMES)), "two layouts share a name"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in BUILDERS:
            pytest.fail(f"layout {name!r} has no builder in tests/layout_builders.py")
        if name not in cache:
            cache[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _layout(name: str) -> Layout:
    return next(layout for layout in LAYOUTS if layout.name == name)


def _out(tmp: Path, layout: Layout, src: Path | None = None) -> Path:
    """Where a write goes: a directory for directory layouts, else a file with the layout's suffix."""
    if layout.weight_files:
        return tmp / "out"
    return tmp / ("out" + (src.suffix if src is not None and src.is_file() else layout.file_suffix))


def _one_line_refusal(res, out: Path, tmp: Path, contains: str = "") -> None:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr and contains in res.stderr, res.stderr
    assert not out.exists() and not [p for p in tmp.iterdir() if "lora-inspect-tmp" in p.name]


def _read(path: Path, base: Path | None = None) -> dict[Key, torch.Tensor]:
    """The canonical ΔW of every module of the adapter at ``path`` as the project reads it back."""
    ad = load_adapter(path)
    return _normal(from_adapter(layout_of(ad).with_base(ad, base)))


def _normal(canon: Canon) -> dict[Key, torch.Tensor]:
    """ΔW by canonical name, Flux modules in diffusers' (split) naming, where convert and merge meet them."""
    return {(m.component, m.path): torch.as_tensor(m.delta()) for m in flux_for_target(canon, Naming.PIPELINE).modules}


def _expected(b: Built, name: str, f: float = 1.0) -> dict[Key, torch.Tensor]:
    """The builder's independent ΔW (× ``f``) in the same naming as :func:`_read` (B = ΔW, A = I: a Flux split
    only cuts rows of B)."""
    mods = [CanonModule(c, p, _kind(d), (f * d).numpy(), np.eye(d.shape[1], dtype=np.float64), 1.0)
            for (c, p), d in b.expected.items()]
    return _normal(Canon(mods, _layout(name).naming))


def _kind(d: torch.Tensor):
    from lora_inspect.kinds import Kind

    return Kind.LINEAR  # the dense reference is never reshaped: its kind only steers nothing here


def _close(got: dict[Key, torch.Tensor], want: dict[Key, torch.Tensor], what: str) -> None:
    """Equal ΔW per module; one-model names on one side match the other's by path; a module only one side has
    must be zero (a Flux part a split left empty)."""
    if len({c for c, _ in got}) <= 1 and len({c for c, _ in want}) <= 1:
        got, want = ({(None, p): d for (_, p), d in x.items()} for x in (got, want))
    scale = max(float(d.norm()) for d in want.values())
    for k in set(got) | set(want):
        g, w = got.get(k), want.get(k)
        assert g is not None or float(w.norm()) <= REL * scale, (what, "missing", k)
        assert w is not None or float(g.norm()) <= REL * scale, (what, "unexpected", k)
        if g is not None and w is not None:
            assert float((g.reshape(w.shape) - w).norm()) <= REL * max(float(w.norm()), scale * 1e-3), (what, k)


def _held(path: Path) -> tuple[list[Held], list[str], bool]:
    ad = load_adapter(path)
    layout = layout_of(ad)
    held = [Held(m.name, m.kind, m.is_dora, layout.canonical_name(m)[0]) for m in ad.modules]
    return held, list(ad.extras), layout.caps.full_tensors


@pytest.mark.parametrize("name", NAMES)
def test_info_reads_it_with_this_layout(built, name):
    b = built(name)
    res = run_cli("info", b.path, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    ad = load_adapter(b.path)
    assert layout_of(ad).name == name and doc["adapter"]["format"] == ad.format and doc["modules"] == len(b.expected)


@pytest.mark.parametrize("name", NAMES)
def test_rank_gives_the_exact_spectrum(built, name):
    b = built(name)
    res = run_cli("rank", b.path, "--json", "--all")
    assert res.exit_code == 0, res.stderr
    ad = load_adapter(b.path)
    canonical = {m.name: layout_of(ad).canonical_name(m) for m in ad.modules}
    for mod in json.loads(res.stdout)["modules"]:
        want = torch.linalg.svdvals(b.expected[canonical[mod["name"]]])
        got = torch.tensor(mod["singular_values"], dtype=torch.float64)
        k = min(len(got), len(want))
        assert torch.allclose(got[:k], want[:k], rtol=REL, atol=REL * float(want[0])), mod["name"]


def _best(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("name", NAMES)
def test_truncate_keeps_the_best_rank_1(built, name, tmp_path):
    b = built(name)
    out = _out(tmp_path, _layout(name), b.path)
    res = run_cli("truncate", b.path, "-o", out, "--rank", "1")
    assert res.exit_code == 0, res.stderr
    want = Built(b.path, {k: _best(d, 1) for k, d in b.expected.items()})
    _close(_read(out, b.gguf_base), _expected(want, name), "truncate")


@pytest.mark.parametrize("name", NAMES)
def test_rescale_multiplies_every_delta(built, name, tmp_path):
    b = built(name)
    out = _out(tmp_path, _layout(name), b.path)
    res = run_cli("rescale", b.path, "-o", out, "--factor", "0.5")
    if _layout(name).caps.alpha == AlphaHome.NONE or res.exit_code:  # no α in this layout, or in this file
        _one_line_refusal(res, out, tmp_path, "--bake")
        res = run_cli("rescale", b.path, "-o", out, "--factor", "0.5", "--bake")
    assert res.exit_code == 0, res.stderr
    _close(_read(out, b.gguf_base), _expected(b, name, 0.5), "rescale")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", NAMES)
def test_convert_to_every_target(built, name, target, tmp_path):
    b = built(name)
    layout = layout_for_target(target)
    out = _out(tmp_path, layout)
    base = ["--base", b.gguf_base] if target == "gguf" and b.gguf_base else []
    res = run_cli("convert", b.path, "--to", target, "-o", out, "--dtype", "fp32", *base)
    held, extras, carry = _held(b.path)
    why = layout.refusal(held, extras, carry)
    if why is not None:  # from the capabilities alone
        return _one_line_refusal(res, out, tmp_path, why)
    if layout.file_suffix == ".gguf" and b.gguf_base is None:  # GGUF holds LLM adapters only (names, heads)
        return _one_line_refusal(res, out, tmp_path)
    assert res.exit_code == 0, res.stderr
    _close(_read(out, b.gguf_base), _expected(b, name), f"convert --to {target}")


@pytest.mark.parametrize("name", NAMES)
def test_merge_with_itself_doubles_every_delta(built, name, tmp_path):
    b = built(name)
    held, extras, carry = _held(b.path)
    default = _layout(name).converts_to
    allowed = [t for t in MERGE_TARGETS if layout_for_target(t).refusal(held, extras, carry) is None]
    if default is not None and layout_for_target(default).merge_target and default not in allowed:
        res = run_cli("merge", b.path, b.path, "-o", tmp_path / "refused")
        _one_line_refusal(res, tmp_path / "refused", tmp_path)
    target = default if default in allowed else allowed[0]
    out = _out(tmp_path, layout_for_target(target))
    res = run_cli("merge", b.path, b.path, "--to", target, "-o", out, "--dtype", "fp32")
    assert res.exit_code == 0, res.stderr
    _close(_read(out), _expected(b, name, 2.0), f"merge --to {target}")
