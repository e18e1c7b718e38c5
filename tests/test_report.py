"""`report`: every section, one image per module type, nothing external, the right commands; the
image assertions skip without matplotlib (the page layout is tested with stand-in PNGs)."""

from __future__ import annotations

import base64
import io
import re
import struct
import sys
import zlib
from html.parser import HTMLParser

import pytest
import torch
from builders import build_peft, run_cli

from lora_inspect import load_adapter
from lora_inspect.adapter import module_type
from lora_inspect.analysis import analyse
from lora_inspect.report import SECTIONS, AdapterFigures, Figure, page_html, page_markdown

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_png() -> bytes:
    """A valid 1×1 PNG, built by hand (no pillow needed)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def assert_self_contained(page: str) -> None:
    low = page.lower()
    for bad in ("http://", "https://", 'src="//', "<script", "<link", "@import", "url(", "<iframe", "<object"):
        assert bad not in low, bad
    for m in re.finditer(r'\b(?:src|href)\s*=\s*"([^"]*)"', page):
        assert m.group(1).startswith(("data:image/png;base64,", "#")), m.group(1)[:60]


class _Tags(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    p.close()
    assert p.stack == [], p.stack  # every element closed
    return p


def dense_uniform_rank(build, names, tau=0.95, cap=8) -> int:
    """Independent of the QR route: dense SVD of PEFT's own merged ΔW, energy rank, power of two ≤ cap."""
    k = 1
    for n in names:
        s = torch.linalg.svdvals(build.delta(n))
        e = (s**2).cumsum(0) / (s**2).sum()
        k = max(k, int((e < tau - 1e-12).sum()) + 1)
    p = 1
    while p < k:
        p *= 2
    return min(p, cap)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    # every product exactly rank 3 of r = 8: the recommendation must shrink it
    llama = build_peft(tmp, r=8, lora_alpha=16, target_modules=ALL_LINEAR, planted={".": 3}, seed=0)
    gpt2 = build_peft(tmp, arch="gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], seed=1)
    return llama, gpt2


def lora_params(build) -> int:
    return sum(p.numel() for n, p in build.model.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------- without matplotlib


def test_without_matplotlib_exit_2_with_hint(adapters, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "r.html"
    res = run_cli("report", adapters[0].path, "-o", out)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "pip install 'lora-inspect[plot]'" in res.stderr
    assert not out.exists()


def _fake_figs(report) -> AdapterFigures:
    png = tiny_png()
    types = sorted({module_type(r.name) for r in report.modules})
    return AdapterFigures(Figure("heatmap", "heatmap", png), {t: Figure(t, f"{t} spectra", png) for t in types})


def test_page_layout_with_stand_in_images(adapters):
    llama, gpt2 = adapters
    reps = [analyse(load_adapter(b.path), 0.95) for b in (llama, gpt2)]
    page = page_html(reps, [_fake_figs(r) for r in reps], command="lora-inspect report a b -o r.html")
    assert_self_contained(page)
    tags = parse(page)
    assert [s for s, _ in SECTIONS] == [i for i in tags.ids if i in dict(SECTIONS)]
    spectra = [i for i in tags.imgs if i.get("data-kind") == "spectrum"]
    assert sorted(i["data-key"] for i in spectra) == sorted(ALL_LINEAR + ["c_attn", "c_fc"])
    assert sum(i.get("data-kind") == "heatmap" for i in tags.imgs) == 2
    assert 'style="--n:2"' in page  # side by side
    # footprint now: PEFT's own parameter count
    for b in (llama, gpt2):
        assert f"{lora_params(b):,}" in page
    k = dense_uniform_rank(llama, [m.name for m in reps[0].adapter.modules])
    assert k == 4
    assert f"lora-inspect truncate {llama.path} -o {llama.path}-r{k} --rank {k}" in page
    assert f"lora-inspect truncate {llama.path} -o {llama.path}-e0.95 --energy 0.95" in page


def test_markdown_layout_with_stand_in_images(adapters):
    llama, _ = adapters
    rep = analyse(load_adapter(llama.path), 0.95)
    figs = _fake_figs(rep)
    names = {(0, f.key): f"r-1-{f.key}.png" for f in [figs.heatmap, *figs.types.values()]}
    md = page_markdown([rep], [figs], names)
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs) == sorted(names.values())
    for _, title in SECTIONS[:-1]:
        assert f"## {title}" in md
    assert "--rank 4" in md and "http" not in md


# ---------------------------------------------------------------------- with matplotlib


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_html_end_to_end(adapters, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    llama, gpt2 = adapters
    out = tmp_path / "report.html"
    res = run_cli("report", llama.path, gpt2.path, "-o", out)
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    tags = parse(page)
    for sid, title in SECTIONS:
        assert sid in tags.ids and title in page
    types_llama = {i["data-key"] for i in tags.imgs if i.get("data-kind") == "spectrum" and "adapter-llama" in i["alt"]}
    types_gpt2 = {i["data-key"] for i in tags.imgs if i.get("data-kind") == "spectrum" and "adapter-gpt2" in i["alt"]}
    assert types_llama == set(ALL_LINEAR) and types_gpt2 == {"c_attn", "c_fc"}
    assert len([i for i in tags.imgs if i.get("data-kind") == "spectrum"]) == 9
    imgs = _pngs(page)
    assert len(imgs) == 9 + 2
    for data in imgs:
        im = Image.open(io.BytesIO(data))
        im.verify()
        assert im.size[0] >= 600 and im.size[1] >= 250
    assert "--rank 4" in page and "info" not in res.stdout
    assert (out.stat().st_mode & 0o777) != 0o600  # an ordinary file, not mkstemp's private mode


def test_report_markdown_writes_pngs_beside(adapters, tmp_path):
    pytest.importorskip("matplotlib")
    llama, _ = adapters
    out = tmp_path / "pr.md"
    res = run_cli("report", llama.path, "-o", out)
    assert res.exit_code == 0, res.output
    md = out.read_text(encoding="utf-8")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == len(ALL_LINEAR) + 1
    for ref in refs:
        p = tmp_path / ref
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(refs + ["pr.md"])  # no temp files left


def test_report_refuses_to_overwrite_and_to_write_into_input(adapters, tmp_path):
    llama, _ = adapters
    out = tmp_path / "r.html"
    out.write_text("keep me")
    res = run_cli("report", llama.path, "-o", out)
    assert res.exit_code == 2 and "--force" in res.stderr and out.read_text() == "keep me"
    res = run_cli("report", llama.path, "-o", llama.path / "adapter_model.safetensors", "--force")
    assert res.exit_code == 2 and "input" in res.stderr
    res = run_cli("report", llama.path, "-o", tmp_path / "missing-dir" / "r.html")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1


def test_report_force_overwrites(adapters, tmp_path):
    pytest.importorskip("matplotlib")
    llama, _ = adapters
    out = tmp_path / "r.html"
    out.write_text("old")
    res = run_cli("report", llama.path, "-o", out, "--force", "--energy", "0.99")
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "τ = 0.99" in page


def test_report_bad_input_exit_2(tmp_path):
    res = run_cli("report", tmp_path / "nope", "-o", tmp_path / "r.html")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1


# ---------------------------------------------------------------------- issue 9 items
@pytest.mark.parametrize("name", ["x.pdf", "x.png", "x"])
def test_report_refuses_an_output_it_cannot_write(adapters, tmp_path, name):
    out = tmp_path / name
    res = run_cli("report", adapters[0].path, "-o", out)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and ".html or .md" in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_report_format_contradicting_suffix_refused(adapters, tmp_path):
    res = run_cli("report", adapters[0].path, "-o", tmp_path / "x.md", "--format", "html")
    assert res.exit_code == 2 and "contradicts" in res.stderr


def test_heatmaps_share_one_colour_scale(adapters):
    from lora_inspect.report.figures import shared_scales

    reps = [analyse(load_adapter(b.path), 0.95) for b in adapters]
    sc = shared_scales(reps)
    sig = [r.sigma1 for rep in reps for r in rep.modules if r.sigma1]
    assert sc.sigma_lo == pytest.approx(min(sig)) and sc.sigma_hi == pytest.approx(max(sig))
    assert sc.max_rank == max(m.rank for rep in reps for m in rep.adapter.modules)
    # each adapter alone would have had its own, different scale
    assert shared_scales(reps[:1]) != shared_scales(reps[1:])


def test_captions_have_no_raw_tex(adapters):
    reps = [analyse(load_adapter(b.path), 0.95) for b in adapters]
    figs = [_fake_figs(r) for r in reps]
    page = page_html(reps, figs)
    names = {(i, f.key): f"r-{i}-{f.key}.png" for i, fs in enumerate(figs) for f in [fs.heatmap, *fs.types.values()]}
    md = page_markdown(reps, figs, names)
    for text in (page, md):
        assert "_{" not in text and "\\sum" not in text and "Σᵢ₌₁ᵏ σᵢ²" in text
    assert "share one colour scale" in page and "share one colour scale" in md
