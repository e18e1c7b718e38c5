"""Counts in words (issues 18/19): every sentence that states a count agrees with it — "1 module has",
"2 modules have", never "1 modules" or "every module already have". The helpers are defined once, in
:mod:`lora_inspect.units` (the lower layers state counts too and may not import the views), and re-exported
by :mod:`lora_inspect.views.words`. Each message is driven here with a count of 1 and of 2."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from builders import run_cli, write_kohya, write_safetensors_raw
from safetensors.torch import save_file

from lora_inspect import load_adapter
from lora_inspect.adapter import LowRankUpdate
from lora_inspect.errors import InspectError
from lora_inspect.units import noun, plural, verb

ONE_TWO = pytest.mark.parametrize("n", [1, 2])


def _names(n: int) -> list[str]:
    return [f"layers.{i}.q_proj" for i in range(n)]


def _no_bad_plural(text: str) -> None:
    """No "1 <word>s" for the nouns these messages count."""
    assert not re.search(r"\b1 (?:\w+ )?(modules|tensors|adapters|weights|bytes|parts|convs|mismatches|tokens)\b",
                         text), text


def _kohya(path, n: int, alpha: float | None = 2.0, up_zero: bool = False):
    g = torch.Generator().manual_seed(n)
    mods = {}
    for i in range(n):
        up = torch.zeros(8, 2) if up_zero else torch.randn(8, 2, generator=g)
        mods[f"lora_te_text_model_encoder_layers_{i}_mlp_fc1"] = (torch.randn(2, 6, generator=g), up, alpha)
    return write_kohya(path, mods)


# ------------------------------------------------------------------------------------- the helpers


def test_the_helpers_agree_with_the_count_and_have_one_definition():
    from lora_inspect.views import words

    assert (words.plural, words.noun, words.verb) == (plural, noun, verb)  # re-exported, not redefined
    assert plural(1, "module") == "1 module" and plural(2, "module") == "2 modules"
    assert plural(0, "file") == "0 files" and plural(4096, "byte") == "4,096 bytes"
    assert plural(1, "shape mismatch") == "1 shape mismatch" and plural(2, "shape mismatch") == "2 shape mismatches"
    assert plural(2, "LyCORIS module") == "2 LyCORIS modules" and noun(2, "entry") == "entries"
    assert [verb(1, w) for w in ("has", "is", "does", "keeps")] == ["has", "is", "does", "keeps"]
    assert [verb(2, w) for w in ("has", "is", "does", "keeps", "matches")] == ["have", "are", "do", "keep", "match"]


# ------------------------------------------------------------------------------------- truncate


def _module(name: str, rank: int, low_rank: bool = True, params: int = 10):
    upd = LowRankUpdate("a", "b", rank) if low_rank else SimpleNamespace()
    return SimpleNamespace(name=name, rank=rank, update=upd, params=params)


@ONE_TWO
def test_truncation_warnings(n):
    from lora_inspect.rewrite.truncation import truncation_warnings

    no_dora = SimpleNamespace(use_dora=False, modules=[])
    dropped = truncation_warnings(no_dora, SimpleNamespace(rank=None), _names(n))
    assert dropped == [f"{plural(n, 'module')} {'keeps' if n == 1 else 'keep'} rank 0 and "
                       f"{'is' if n == 1 else 'are'} dropped: {', '.join(_names(n))}"]

    mods = [_module(x, 4, params=10) for x in _names(n)]
    larger = truncation_warnings(SimpleNamespace(use_dora=False, modules=mods), SimpleNamespace(rank=None), [],
                                 [SimpleNamespace(params_after=20) for _ in mods])
    assert larger[0].startswith(f"{n} {'module is' if n == 1 else 'modules are'} larger as LoRA")

    lycoris = [_module(x, 1, low_rank=False) for x in _names(n)] + [_module("layers.9.v_proj", 8)]
    exact = truncation_warnings(SimpleNamespace(use_dora=False, modules=lycoris), SimpleNamespace(rank=2), [])
    assert exact == [f"{n} LyCORIS {'module has' if n == 1 else 'modules have'} rank(ΔW) ≤ 2: written as LoRA "
                     f"{'pair holding its' if n == 1 else 'pairs holding their'} exact ΔW"]

    some = [_module(x, 1) for x in _names(n)] + [_module("layers.9.v_proj", 8)]
    same = truncation_warnings(SimpleNamespace(use_dora=False, modules=some), SimpleNamespace(rank=2), [])
    assert same[0].startswith(f"{n} of {n + 1} modules already {'has' if n == 1 else 'have'} rank ≤ 2")
    every = [_module(x, 1) for x in _names(n)]
    same = truncation_warnings(SimpleNamespace(use_dora=False, modules=every), SimpleNamespace(rank=2), [])
    assert same[0].startswith("every module already has rank ≤ 2")
    for line in dropped + larger + exact + same:
        _no_bad_plural(line)


@ONE_TWO
def test_truncate_on_a_real_adapter_says_how_many_already_fit(tmp_path, n):
    """kohya: n modules of rank 1 beside one of rank 4, truncated to rank 2."""
    g = torch.Generator().manual_seed(0)
    mods = {f"lora_te_text_model_encoder_layers_{i}_mlp_fc1": (torch.randn(1, 6, generator=g),
                                                              torch.randn(8, 1, generator=g), 1.0) for i in range(n)}
    mods["lora_te_text_model_encoder_layers_9_mlp_fc1"] = (torch.randn(4, 6, generator=g),
                                                          torch.randn(8, 4, generator=g), 4.0)
    src = write_kohya(tmp_path / "k.safetensors", mods)
    res = run_cli("truncate", src, "--rank", "2", "-o", tmp_path / "out.safetensors", "--json")
    assert res.exit_code == 0, res.stderr
    warnings = json.loads(res.stdout)["warnings"]
    assert f"{n} of {n + 1} modules already {'has' if n == 1 else 'have'} rank ≤ 2: copied unchanged " \
           "(same ΔW, scale baked into the factors)" in warnings


# ------------------------------------------------------------------------------------- rescale


@ONE_TWO
def test_rescale_warning(n):
    from lora_inspect.rewrite.rescaling import _warnings

    ad = SimpleNamespace(use_dora=False, use_rslora=False, modules=[object()] * 3)
    layout = SimpleNamespace(caps=SimpleNamespace(alpha="tensors"))
    docs = [SimpleNamespace(scale_after=100.0)] * n + [SimpleNamespace(scale_after=1.0)] * (3 - n)
    assert _warnings(ad, layout, docs) == [f"{n} of 3 modules now {'has' if n == 1 else 'have'} α/r outside the "
                                           "usual 0.5–2 range"]


# ------------------------------------------------------------------------------------- check


@ONE_TWO
def test_check_rule_messages(n):
    from lora_inspect.checks.rules import ValueScan, _energy_rule, _integrity_rules, base_results

    report = SimpleNamespace(modules=[SimpleNamespace(name=x, singular_values=None) for x in _names(n)])
    energy = _energy_rule(report, 0.9, 2)
    assert energy.message == f"{plural(n, 'module')} {'has' if n == 1 else 'have'} non-finite factors (e.g. layers.0.q_proj)"

    finite, trained = _integrity_rules(ValueScan(nonfinite=[f"t{i}" for i in range(n)], zero_b=_names(n)), True)
    assert finite.message.startswith(f"{plural(n, 'tensor')} {'holds' if n == 1 else 'hold'} NaN/inf: ")
    assert trained.message.startswith(f"{plural(n, 'module')} {'has' if n == 1 else 'have'} an all-zero B factor "
                                      f"(LoHa/LoKr: any factor), so {'it changes' if n == 1 else 'they change'} "
                                      "nothing (saved before training?)")

    mods = [SimpleNamespace(name=x, shape=(8, 6)) for x in _names(3)]
    known = {x: SimpleNamespace(out=8, inp=6 if i >= n else 5) for i, x in enumerate(_names(3))}
    names, shapes = base_results(SimpleNamespace(modules=mods, extras=[]), SimpleNamespace(modules=known, name="b"))
    assert shapes.message.startswith(f"{plural(n, 'shape mismatch')}, e.g. layers.0.q_proj 8×6 vs base 8×5")
    missing = {x: SimpleNamespace(out=8, inp=6) for x in _names(3)[n:]}
    names, _ = base_results(SimpleNamespace(modules=mods, extras=[]), SimpleNamespace(modules=missing, name="b"))
    assert names.message.startswith(f"{n} of 3 modules {'matches' if n == 1 else 'match'} no module of b, e.g. ")
    for r in (energy, finite, trained, names, shapes):
        _no_bad_plural(r.message)


# ------------------------------------------------------------------------------------- footprint, report


@ONE_TWO
def test_serving_scope(tmp_path, n):
    from lora_inspect.footprint import serving_memory

    ad = load_adapter(_kohya(tmp_path / "k.safetensors", n))
    assert serving_memory(ad)["vllm"]["scope"] == (f"the adapter's {plural(n, 'module')} only (give --base for "
                                                   "every LoRA-capable layer)")
    base = SimpleNamespace(name="b", modules={x: SimpleNamespace(out=8, inp=6, layer=0) for x in _names(n)})
    assert serving_memory(ad, base)["vllm"]["scope"] == f"all {plural(n, 'decoder linear module')} of b"


@ONE_TWO
def test_spectra_figure_title(tmp_path, n, monkeypatch):
    pytest.importorskip("matplotlib")
    from lora_inspect.analysis import analyse
    from lora_inspect.report import figures

    monkeypatch.setattr(figures, "_png", lambda fig: (fig._suptitle.get_text() if fig._suptitle else "").encode())
    [drawn] = figures.render_figures([analyse(load_adapter(_kohya(tmp_path / "k.safetensors", n)))])
    titles = [f.png.decode() for f in drawn.types.values()]
    assert any(t.startswith(f"mlp_fc1: {plural(n, 'module')}, r = 2") for t in titles), titles
    for t in titles:
        _no_bad_plural(t)


# ------------------------------------------------------------------------------------- reading files


@ONE_TWO
def test_tensor_count_limit(tmp_path, n, monkeypatch):
    import lora_inspect.validate as validate
    from lora_inspect.formats.tensors import open_tensors

    monkeypatch.setattr(validate, "MAX_TENSORS", n - 1)
    sd = {f"t{i}": torch.zeros(1) for i in range(n)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save(sd, tmp_path / "a.bin")
    for f in (tmp_path / "a.safetensors", tmp_path / "a.bin"):
        with pytest.raises(InspectError, match=f": {n} {noun(n, 'tensor')} in one file \\(limit {n - 1}\\)"):
            open_tensors(f)


@ONE_TWO
def test_trailing_bytes(tmp_path, n):
    from lora_inspect.formats.tensors import open_tensors

    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    f = write_safetensors_raw(tmp_path / "a.safetensors", header, b"\0" * (4 + n))
    with pytest.raises(InspectError, match=f": {plural(n, 'byte')} after the last tensor's data"):
        open_tensors(f)


@ONE_TWO
def test_missing_alpha_note(tmp_path, n):
    notes = load_adapter(_kohya(tmp_path / "k.safetensors", n, alpha=None)).notes
    assert f"{plural(n, 'module')} {'has' if n == 1 else 'have'} no .alpha tensor: α = r (scale 1) assumed, " \
           "as kohya does" in notes


@ONE_TWO
def test_peft_prefix_notes(n):
    from lora_inspect.formats.peft import _prefix_notes

    notes: list[str] = []
    _prefix_notes(notes, False, 3 - n, 3, True)
    assert notes == [f"{plural(n, 'module')} {'lacks' if n == 1 else 'lack'} the 'base_model.model.' prefix the "
                     f"{'others have' if n == 1 else 'other has'}"]


# ------------------------------------------------------------------------------------- budgets, diff


@ONE_TWO
def test_size_budget_below_what_every_output_keeps(n):
    from lora_inspect.errors import OptionError
    from lora_inspect.rewrite.ranks import _budget

    spec = SimpleNamespace(max_params=None, max_bytes=n)
    with pytest.raises(OptionError, match=f"a size budget of {plural(n, 'byte')} is smaller .* "
                                          f"\\({plural(n, 'byte')}: full tensors"):
        _budget([], spec, fixed_bytes=n)  # type: ignore[arg-type]


@ONE_TWO
def test_diff_zero_line(tmp_path, n):
    f = _kohya(tmp_path / "k.safetensors", n, up_zero=True)
    res = run_cli("diff", f, f)
    assert res.exit_code == 0, res.stderr
    assert f"ΔW_B is zero (untrained?) in {n} of {plural(n, 'compared module')}," in res.stdout
    _no_bad_plural(res.stdout)
