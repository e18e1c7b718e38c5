"""The README's tour and the guide pages under docs/ show real output: ``scripts/tour.py`` reruns every tour
command on the committed samples, and this test fails when a block is stale (text exactly, numbers to
1e-9 relative; timings and paths normalised). Regenerate with ``python scripts/tour.py``. The README
stays short: at most 250 lines, every page it links to exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tour  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = tour.documents()
# console blocks with a `$ lora-inspect` prompt that are not produced by the script, with the reason
STATIC_COMMANDS = {
    "$ lora-inspect diff samples/planted planted-r4 --format markdown",  # its Markdown output is the block below it
}


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "tour.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=1800)


def test_every_tour_block_has_a_recipe_and_every_recipe_a_block():
    assert sorted(tour.all_blocks(DOCS)) == sorted(tour.TOURS)
    assert list(tour.blocks(README)) == ["info", "rank", "truncate", "check", "convert", "extract"]


def test_every_command_shown_with_a_prompt_is_inside_a_tour_block():
    prompts = set()
    for doc in DOCS:
        outside = tour.BLOCK.sub("", doc.read_text(encoding="utf-8"))
        prompts |= set(re.findall(r"^\$ lora-inspect .*$", outside, flags=re.M))
    assert prompts == STATIC_COMMANDS


def test_the_readme_is_short_and_its_links_exist():
    assert len(README.splitlines()) <= 250
    links = re.findall(r"\]\(((?:docs|reports)/[^)#]+)", README)
    assert len(links) >= 8
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_the_cpu_torch_hint_comes_before_the_two_commands():
    setup = README.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    hint = setup.index("download.pytorch.org/whl/cpu")
    first = setup.index("pip install -e . && lora-inspect rank samples/planted")
    second = setup.index("pip install -e '.[test]' && python -m pytest -q")
    assert hint < first < second


def test_numbers_compare_to_a_stated_tolerance_and_text_exactly():
    """The last bits of a float depend on the CPU's kernels; a real change does not hide behind that."""
    a = '{"stable_rank": 2.745178962682635, "name": "down_proj", "flags": []}'
    assert tour.same(a, a.replace("2.745178962682635", "2.7451789626826346"))  # 1e-16 relative
    assert not tour.same(a, a.replace("2.745178962682635", "2.745181"))  # 1e-6 relative
    assert not tour.same(a, a.replace("down_proj", "up_proj"))
    assert not tour.same("k=4 ×14", "k=4 ×15")
    assert not tour.same("rank 4", "rank 4 5")


def test_normalise_masks_timings_and_trailing_spaces():
    a = "held-out loss 0.28 → 0.0005 in 400 steps (23,987 tokens/s); wrote runs/planted   \n"
    b = "held-out loss 0.28 → 0.0005 in 400 steps (9,001.5 tokens/s); wrote runs/planted"
    assert tour.normalise(a) == tour.normalise(b)
    assert tour.normalise(a) != tour.normalise(a.replace("0.0005", "0.0006"))


def test_a_stale_block_is_reported_and_rewritten(tmp_path):
    copy = tmp_path / "README.md"
    body = tour.blocks(README)["info"]
    stale = README.replace(body, body.replace("F32 ×28", "F32 ×29"))
    assert stale != README
    copy.write_text(stale, encoding="utf-8")
    res = _script("--check", "--only", "info", "--readme", str(copy))
    assert res.returncode == 1 and "tour:info" in res.stdout and "stale tour blocks: info" in res.stderr
    assert copy.read_text(encoding="utf-8") == stale  # check mode writes nothing
    assert _script("--only", "info", "--readme", str(copy)).returncode == 0
    assert tour.normalise(tour.blocks(copy.read_text(encoding="utf-8"))["info"]) == tour.normalise(body)


@pytest.mark.slow
def test_the_readme_tour_is_up_to_date():
    res = _script("--check")
    assert res.returncode == 0, f"{res.stderr}\n{res.stdout[-6000:]}"
