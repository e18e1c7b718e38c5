"""Every command's `--json` and `--format markdown` output equals the recorded goldens (see
tests/golden_cases.py; regenerate with `python tests/golden_cases.py --update [CASE_ID ...]` after a
deliberate change and say which in the commit).

"Equals": text exactly, every number to ``golden_cases.REL_TOL`` (1e-9) relative — never bit for bit,
since singular values and φ come from BLAS/LAPACK kernels that differ between CPUs in the last bits. The
module a summary names as the worst does not depend on those bits: ties within ``ties.TIE_RTOL``
go to the lowest layer, then the name (tested here with values perturbed by ±1e-15 relative)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import golden_cases as gc
import pytest

from lora_inspect import load_adapter
from lora_inspect.diff import diff_adapters, summarise
from lora_inspect.ties import TIE_RTOL, extreme_module


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    return tmp, gc.build_fixtures(tmp)


@pytest.mark.parametrize("case_id,argv", gc.cases(), ids=[c[0] for c in gc.cases()])
def test_golden(fixtures, case_id, argv):
    tmp, fx = fixtures
    code, text = gc.run_case(argv, fx, tmp, case_id)
    diff = gc.compare(case_id, code, text)
    assert diff is None, f"{case_id}: {diff}"


def test_compare_detects_a_changed_number(fixtures):
    tmp, fx = fixtures
    case_id, argv = next(c for c in gc.cases() if c[0] == "rank-peft_dir-json")
    code, text = gc.run_case(argv, fx, tmp, case_id)
    poisoned = text.replace('"energy_rank": ', '"energy_rank": 1', 1)
    assert gc.compare(case_id, code, poisoned) is not None


def _recorded(case_id: str) -> tuple[int, str]:
    code, _, text = (gc.GOLDEN_DIR / f"{case_id}.txt").read_text(encoding="utf-8").partition("\n")
    return int(code.removeprefix("exit ")), text


def _scale_floats(doc, factor: float, which: int | None = None, seen: list[int] | None = None):
    """``doc`` with every non-zero float (``which``: only the one at that index) multiplied by ``factor``."""
    seen = [0] if seen is None else seen
    if isinstance(doc, dict):
        return {k: _scale_floats(v, factor, which, seen) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_scale_floats(v, factor, which, seen) for v in doc]
    if isinstance(doc, float) and doc != 0:
        seen[0] += 1
        return doc * factor if which is None or which == seen[0] - 1 else doc
    return doc


@pytest.mark.parametrize("case_id", ["diff-planted-text-json", "rank-planted-json", "diff-peft_dir-peft_dir-json"])
def test_json_goldens_tolerate_rounding_and_nothing_more(case_id):
    code, text = _recorded(case_id)
    doc = json.loads(text)
    assert gc.compare(case_id, code, text) is None
    count = [0]
    _scale_floats(doc, 1.0, seen=count)
    n_floats = count[0]
    assert n_floats > 10
    # every float 1e-12 off (≈10⁴ × what other kernels change): still equal
    wobbled = _scale_floats(doc, 1 + 1e-12)
    assert wobbled != doc and gc.compare(case_id, code, json.dumps(wobbled)) is None
    # any one float 1e-6 off: a difference, named by its path
    for k in (0, 5, n_floats // 2):
        once = _scale_floats(wobbled, 1 + 1e-6, which=k)
        diff = gc.compare(case_id, code, json.dumps(once))
        assert diff is not None and diff.startswith("$"), k
    # a word: a module name, a key
    assert "self_attn" in text and '"modules"' in text
    assert gc.compare(case_id, code, text.replace("self_attn", "self_atn", 1)) is not None
    assert gc.compare(case_id, code, text.replace('"modules"', '"module"', 1)) is not None


def test_text_goldens_compare_words_exactly_and_numbers_to_the_tolerance():
    line = "model.layers.10.self_attn.q_proj  σ₁ 0.123456789012345  kept 0.6348 of 1,024  2.6e-08\n"
    assert gc.compare_text(line, line.replace("0.123456789012345", "0.1234567890124")) is None  # 1e-13
    assert gc.compare_text(line, line.replace("2.6e-08", "2.60e-8")) is None  # the same number
    for poisoned in (
        line.replace("0.123456789012345", "0.1234568"),  # 1e-6 relative
        line.replace("0.6348", "0.6349"),  # a printed digit
        line.replace("2.6e-08", "2.6e-09"),
        line.replace("layers.10", "layers.11"),  # integers exactly (layer indices, counts)
        line.replace("1,024", "1,025"),
        line.replace("kept", "kapt"),  # a word
        line.replace("  kept", " kept"),  # spacing
        line.rstrip("\n"),
        line + "one more line\n",
    ):
        assert gc.compare_text(line, poisoned) is not None, poisoned


@pytest.mark.parametrize("case_id", ["rank-planted-markdown", "diff-planted-text-markdown", "check-planted-markdown"])
def test_markdown_goldens_catch_a_changed_number_or_word(case_id):
    code, text = _recorded(case_id)
    assert gc.compare(case_id, code, text) is None
    m = next(m for m in re.finditer(r"\d+\.\d+", text))
    bumped = repr(float(m.group()) * (1 + 1e-6))
    assert gc.compare(case_id, code, text[: m.start()] + bumped + text[m.end():]) is not None
    word = re.search(r"[A-Za-z_]{4,}", text)
    assert word
    assert gc.compare(case_id, code, text[: word.start()] + word.group().upper() + text[word.end():]) is not None


# ties: which module a summary names


NAMES = ["model.layers.10.self_attn.q_proj", "model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.q_proj",
         "model.layers.2.mlp.down_proj"]


@pytest.mark.parametrize("largest", [False, True])
def test_tied_modules_go_to_the_lowest_layer_then_the_name(largest):
    """Four modules tie (1 up to rounding): the winner is layer 2 (not 10), then ``mlp.down_proj``
    (the name in natural order), whatever ±1e-15 relative rounding does to the values."""
    rng = random.Random(0)
    for trial in range(200):
        values = [(1.0 * (1 + rng.uniform(-1e-15, 1e-15)), n) for n in NAMES]
        best, name = extreme_module(values, largest=largest)
        assert name == "model.layers.2.mlp.down_proj", (trial, values)
        assert best == (max if largest else min)(v for v, _ in values)  # the value is the exact extreme
    # a real difference (1e-9 ≫ TIE_RTOL) is not a tie
    step = 1e-9 if largest else -1e-9
    assert extreme_module([(1.0, NAMES[2]), (1.0 + step, NAMES[0])], largest=largest)[1] == NAMES[0]
    assert extreme_module([(0.5, NAMES[2]), (0.5 * (1 + 0.5 * TIE_RTOL), NAMES[0])], largest=largest)[1] == NAMES[2]
    assert extreme_module([], largest=largest) == (None, None)


def test_a_self_diff_names_the_first_module_of_each_group_whatever_the_last_bits(fixtures):
    """diff of an adapter with itself: every φ and cosine is 1 and every distance 0 up to rounding
    (the case whose golden once named a module by its last bits)."""
    _, fx = fixtures
    ad = load_adapter(fx["peft_dir"])
    res = diff_adapters(ad, ad, top=1)
    rng = random.Random(1)
    for trial in range(50):
        wobble = [replace(d, phi=d.phi * (1 + rng.uniform(-1e-15, 1e-15)),
                          cosine=d.cosine * (1 + rng.uniform(-1e-15, 1e-15)),
                          rel_distance=d.rel_distance + rng.uniform(0, 1e-16)) for d in res.modules]
        s = res.summary if trial == 0 else summarise(wobble)
        assert (s.min_phi_module, s.min_cosine_module, s.max_rel_distance_module) == (
            "model.layers.0.self_attn.q_proj",) * 3, trial
        for t, want in (("q_proj", "model.layers.0.self_attn.q_proj"), ("v_proj", "model.layers.0.self_attn.v_proj")):
            st = s.by_type[t]
            assert (st.min_phi_module, st.min_cosine_module, st.max_rel_distance_module) == (want,) * 3, (trial, t)
