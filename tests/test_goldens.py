"""Every command's `--json` and `--format markdown` output equals the recorded goldens (see
tests/golden_cases.py; regenerate with `python tests/golden_cases.py --update` after a deliberate
change and say which in the commit)."""

from __future__ import annotations

import golden_cases as gc
import pytest


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
