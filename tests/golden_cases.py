"""Golden outputs: `--json` and `--format markdown` of every command on every sample and on small
hand-built fixtures of every layout, recorded before a refactor so that behaviour stays the same.

Regenerate (after a deliberate change, say which in the commit):

    python tests/golden_cases.py --update                       # every case
    python tests/golden_cases.py --update diff-peft_dir-peft_dir-json ...   # only these cases

Fixtures are built from seeded generators (no PEFT, no downloads), so they are the same on every
machine; paths are replaced by placeholders. What is computed from them (singular values, φ, …) comes
from BLAS/LAPACK kernels that differ between CPUs in the last bits (≈1e-16 relative), so no golden is
compared bit for bit:

- text is compared exactly and every number in it to :data:`REL_TOL` (1e-9) relative (:data:`ABS_TOL`
  near zero; the numbers of a list, such as a spectrum, also relative to its largest entry): a JSON
  document value by value (:func:`compare_json`: keys in order, kinds, strings as text), Markdown and
  strings token by token (:func:`compare_text`: a number is ``-?digits[.digits][e±digits]``; integers
  without a point or exponent are compared exactly, like words);
- cases on a fixture with 16-bit factors (:data:`F32_FIXTURES`), whose spectra are taken in float32,
  compare every number to :data:`REL_TOL_F32` (1e-5) instead;
- numbers the program rounds for display (``0.6348``) are compared as printed: two machines print
  different digits only for a value within ~1e-15 of a rounding boundary;
- a self-check's error/tolerance ratio (:data:`_NOISY`) is compared by range only (≤ 1 or not);
- which module a summary names as the worst does not depend on the last bits either: ties within
  ``ties.TIE_RTOL`` go to the lowest layer, then the name (``ties.extreme_module``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN_DIR = HERE / "goldens"
sys.path.insert(0, str(HERE))


def _g(seed: int):
    return torch.Generator().manual_seed(seed)


def _pair(out_dim: int, in_dim: int, r: int, seed: int, dtype=torch.float32):
    g = _g(seed)
    a = torch.randn(r, in_dim, generator=g, dtype=torch.float64)
    b = torch.randn(out_dim, r, generator=g, dtype=torch.float64) * torch.logspace(0, -2, r, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _peft_config(**kw) -> dict:
    cfg = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM", "use_rslora": False,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "bias": "none",
    }
    cfg.update(kw)
    return cfg


def build_fixtures(tmp: Path) -> dict[str, Path]:
    """Small adapters of every layout, deterministic."""
    fx: dict[str, Path] = {}
    pre = "base_model.model.model.layers"
    # PEFT directory: four layers (2 and 10 to expose the sort order), a rank/alpha pattern
    d = tmp / "peft_dir"
    d.mkdir()
    t = {}
    for i, layer in enumerate((0, 1, 2, 10)):
        for j, proj in enumerate(("q_proj", "v_proj")):
            r = 2 if (layer, proj) == (1, "v_proj") else 4
            a, b = _pair(24, 16, r, seed=10 * i + j)
            t[f"{pre}.{layer}.self_attn.{proj}.lora_A.weight"] = a
            t[f"{pre}.{layer}.self_attn.{proj}.lora_B.weight"] = b
    _save(d / "adapter_model.safetensors", t)
    cfg = _peft_config(rank_pattern={"model.layers.1.self_attn.v_proj": 2},
                       alpha_pattern={"model.layers.1.self_attn.v_proj": 4})
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    fx["peft_dir"] = d
    # PEFT .bin directory, rsLoRA, DoRA magnitudes, an embedding, modules_to_save
    d = tmp / "peft_bin"
    d.mkdir()
    t = {}
    for layer in (0, 1):
        a, b = _pair(24, 16, 4, seed=100 + layer)
        t[f"{pre}.{layer}.mlp.down_proj.lora_A.weight"] = a
        t[f"{pre}.{layer}.mlp.down_proj.lora_B.weight"] = b
        t[f"{pre}.{layer}.mlp.down_proj.lora_magnitude_vector"] = torch.rand(24, generator=_g(200 + layer)) + 0.5
    ea, eb = _pair(8, 40, 4, seed=300)  # stored lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = eb.T.contiguous()
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = ea.T.contiguous()
    t["base_model.model.lm_head.modules_to_save.default.weight"] = torch.randn(40, 8, generator=_g(301))
    torch.save(t, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps(_peft_config(
        r=4, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=["down_proj", "embed_tokens"],
        modules_to_save=["lm_head"])))
    fx["peft_bin"] = d
    # bare PEFT safetensors with its config in the header (diffusers' lora_adapter_metadata)
    p = tmp / "peft_meta.safetensors"
    t = {}
    for layer in (0, 1):
        a, b = _pair(20, 12, 3, seed=400 + layer)
        t[f"{pre}.{layer}.self_attn.o_proj.lora_A.weight"] = a
        t[f"{pre}.{layer}.self_attn.o_proj.lora_B.weight"] = b
    _save(p, t, {"lora_adapter_metadata": json.dumps(_peft_config(r=3, lora_alpha=6, target_modules=["o_proj"]))})
    fx["peft_meta"] = p
    # kohya: linear modules with alphas, a 3x3 conv, one module without alpha
    p = tmp / "kohya.safetensors"
    t = {}
    for i in range(3):
        a, b = _pair(32, 24, 4, seed=500 + i, dtype=torch.float16)
        name = f"lora_unet_down_blocks_0_attentions_{i}_transformer_blocks_0_attn1_to_q"
        t[f"{name}.lora_down.weight"] = a
        t[f"{name}.lora_up.weight"] = b
        if i != 2:
            t[f"{name}.alpha"] = torch.tensor(2.0 + i, dtype=torch.float16)
    a, b = _pair(8, 6 * 9, 4, seed=510)
    t["lora_unet_conv_in.lora_down.weight"] = a.reshape(4, 6, 3, 3)
    t["lora_unet_conv_in.lora_up.weight"] = b.reshape(8, 4, 1, 1)
    t["lora_unet_conv_in.alpha"] = torch.tensor(4.0)
    a, b = _pair(16, 16, 2, seed=520)
    t["lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight"] = a
    t["lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight"] = b
    t["lora_te1_text_model_encoder_layers_0_self_attn_k_proj.alpha"] = torch.tensor(1.0)
    _save(p, t, {"ss_base_model_version": "sdxl_base_v1-0"})
    fx["kohya"] = p
    # diffusers: unet/text_encoder prefixes with .alpha keys
    p = tmp / "pytorch_lora_weights.safetensors"
    t = {}
    for i, comp in enumerate(("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
                              "text_encoder.text_model.encoder.layers.0.self_attn.q_proj")):
        a, b = _pair(16, 16, 4, seed=600 + i)
        t[f"{comp}.lora_A.weight"] = a
        t[f"{comp}.lora_B.weight"] = b
        t[f"{comp}.alpha"] = torch.tensor(8.0)
    _save(p, t)
    fx["diffusers"] = p
    # mlx-lm directory: transposed factors, absolute scale
    d = tmp / "mlx_dir"
    d.mkdir()
    t = {}
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            a, b = _pair(24, 16, 4, seed=700 + layer * 2 + (proj == "v_proj"))
            t[f"model.layers.{layer}.self_attn.{proj}.lora_a"] = a.T.contiguous()
            t[f"model.layers.{layer}.self_attn.{proj}.lora_b"] = b.T.contiguous()
    _save(d / "adapters.safetensors", t)
    (d / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2, "model": "tiny-llama",
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
    }))
    fx["mlx"] = d
    # the bundled samples, as a user has them
    fx["planted"] = ROOT / "samples" / "planted"
    fx["text"] = ROOT / "samples" / "text"
    fx["planted_kohya"] = ROOT / "samples" / "planted-kohya.safetensors"
    return fx


SMALL = ("peft_dir", "peft_bin", "peft_meta", "kohya", "diffusers", "mlx")
ALL = SMALL + ("planted", "text", "planted_kohya")


def cases() -> list[tuple[str, list[str]]]:
    """(case id, argv with {fixture} placeholders and {out} for outputs)."""
    out: list[tuple[str, list[str]]] = []
    for name in ALL:
        for fmt in ("json", "markdown"):
            out.append((f"info-{name}-{fmt}", ["info", f"{{{name}}}", "--format", fmt]))
            out.append((f"rank-{name}-{fmt}", ["rank", f"{{{name}}}", "--all", "--format", fmt]))
            out.append((f"check-{name}-{fmt}", ["check", f"{{{name}}}", "--no-config", "--max-rank", "8",
                                                "--min-energy", "0.9@4", "--format", fmt]))
        out.append((f"truncate-{name}-json", ["truncate", f"{{{name}}}", "--rank", "2", "-o", "{out}", "--json"]))
        out.append((f"rescale-{name}-json", ["rescale", f"{{{name}}}", "--factor", "2", "-o", "{out}", "--json"]))
    for name in ("peft_dir", "planted", "text"):
        out.append((f"footprint-{name}-json", ["footprint", f"{{{name}}}", "--json"]))
        out.append((f"footprint-{name}-markdown", ["footprint", f"{{{name}}}", "--format", "markdown"]))
    out.append(("truncate-planted-energy-json", ["truncate", "{planted}", "--energy", "0.9", "-o", "{out}", "--json"]))
    out.append(("truncate-planted-budget-json", ["truncate", "{planted}", "--max-params", "40k", "-o", "{out}", "--json"]))
    out.append(("rescale-peft_dir-alpha-json", ["rescale", "{peft_dir}", "--alpha", "16", "-o", "{out}", "--json"]))
    out.append(("rescale-kohya-bake-json", ["rescale", "{kohya}", "--factor", "0.5", "--bake", "-o", "{out}", "--json"]))
    out.append(("check-multi-json", ["check", "{planted}", "{text}", "{planted_kohya}", "--no-config",
                                     "--max-rank", "16", "--serving", "vllm", "--json"]))
    for a, b in (("planted", "planted_kohya"), ("planted", "text"), ("peft_dir", "peft_dir")):
        for fmt in ("json", "markdown"):
            out.append((f"diff-{a}-{b}-{fmt}", ["diff", f"{{{a}}}", f"{{{b}}}", "--all", "--format", fmt]))
    return out


def run_case(argv: list[str], fixtures: dict[str, Path], tmp: Path, case_id: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from lora_inspect.cli import main

    outp = tmp / "out" / case_id.replace("/", "_")
    outp.parent.mkdir(exist_ok=True)
    if any(str(fixtures[n]).endswith(".safetensors") for n in fixtures if "{" + n + "}" in argv):
        outp = outp.with_suffix(".safetensors")
    args = [a.format(out=outp, **{k: str(v) for k, v in fixtures.items()}) for a in argv]
    res = CliRunner().invoke(main, args, catch_exceptions=False, env={"COLUMNS": "200", "NO_COLOR": "1"})
    text = res.stdout
    text = text.replace(str(outp), "<OUT>")
    for name, path in sorted(fixtures.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(path), f"<{name}>")
    text = text.replace(str(tmp), "<TMP>")
    return res.exit_code, text


REL_TOL = 1e-9
"""Numbers in goldens agree to this relative tolerance (float64 results differ between machines by
≈1e-16 of the largest number they come with: measured ≤ 6e-13 relative, on a spectrum's smallest σ)."""
ABS_TOL = 1e-12
"""… or to this absolute one, for values near zero (a cosine of 1e-17 against -3e-17)."""
F32_FIXTURES = ("kohya",)
"""Fixtures with 16-bit factors, whose spectra ``rank`` takes in float32 (``spectrum.compute_dtype``)."""
REL_TOL_F32 = 1e-5
"""The tolerance of every number of a case on an :data:`F32_FIXTURES` fixture: float32 results differ
between machines by a few units of float32 roundoff (measured 1.7e-7 relative on a σ₁; roundoff is 6e-8)."""

# diagnostics whose last digits depend on thread timing: only their range is compared
_NOISY = {"max_error_over_tolerance"}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def case_tolerance(case_id: str) -> float:
    """:data:`REL_TOL`, or :data:`REL_TOL_F32` for a case on a fixture with 16-bit factors."""
    argv = dict(cases()).get(case_id, [])
    return REL_TOL_F32 if any(f"{{{f}}}" in argv for f in F32_FIXTURES) else REL_TOL


def numbers_close(a: float, b: float, rel: float = REL_TOL, scale: float = 0.0) -> bool:
    """The one number rule of the goldens: equal to ``rel`` relative — of the larger of the two, or of
    ``scale`` (the largest entry of the list they belong to) — or to :data:`ABS_TOL` absolute. NaN
    equals NaN; an infinity only itself."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=max(ABS_TOL, rel * scale))


def _split(text: str) -> list[tuple[bool, str]]:
    """Text as (is a number, run) pairs: number runs and the text between them."""
    out: list[tuple[bool, str]] = []
    pos = 0
    for m in _NUMBER.finditer(text):
        if m.start() > pos:
            out.append((False, text[pos : m.start()]))
        out.append((True, m.group()))
        pos = m.end()
    if pos < len(text):
        out.append((False, text[pos:]))
    return out


def _same_number(x: str, y: str, rel: float) -> bool:
    if not any(c in x + y for c in ".eE"):  # integers: counts, ranks, layer indices — exactly
        return x == y
    return numbers_close(float(x), float(y), rel)


def compare_text(want: str, got: str, where: str = "", rel: float = REL_TOL) -> str | None:
    """None when ``got`` equals ``want`` with every number equal to :func:`numbers_close` (integers
    exactly), else the first difference (line, recorded and new text)."""
    if want == got:
        return None
    wl, gl = want.splitlines(), got.splitlines()
    for i, (x, y) in enumerate(zip(wl, gl)):
        if x == y:
            continue
        tx, ty = _split(x), _split(y)
        same = len(tx) == len(ty) and all(
            nx == ny and (_same_number(a, b, rel) if nx else a == b) for (nx, a), (ny, b) in zip(tx, ty))
        if not same:
            return f"{where}line {i + 1}: recorded {x!r}, now {y!r}"
    if len(wl) != len(gl) or want.endswith("\n") != got.endswith("\n"):
        return f"{where}{len(wl)} lines recorded, {len(gl)} now"
    return None


def _kind(x) -> str:
    return "bool" if isinstance(x, bool) else "number" if isinstance(x, (int, float)) else type(x).__name__


def compare_json(want, got, path: str = "$", rel: float = REL_TOL, scale: float = 0.0) -> str | None:
    """None when two JSON values agree — same keys in the same order, same kinds (bool, number, string,
    null, list, object), booleans, integers and ``None`` exactly, any float to :func:`numbers_close`,
    strings by :func:`compare_text` — else where they first differ. The numbers of a list of numbers
    (a spectrum) are compared relative to its largest entry too: a small σ carries the absolute
    error of σ₁."""
    if path.rsplit(".", 1)[-1] in _NOISY:
        ok = _kind(want) == _kind(got) == "number" and (0 <= want <= 1) == (0 <= got <= 1)
        return None if ok else f"{path}: {want!r} vs {got!r}"
    if _kind(want) != _kind(got):
        return f"{path}: {want!r} != {got!r}"
    if isinstance(want, dict):
        if list(want) != list(got):
            return f"{path}: keys {list(want)} != {list(got)}"
        return next((d for k in want if (d := compare_json(want[k], got[k], f"{path}.{k}", rel))), None)
    if isinstance(want, list):
        if len(want) != len(got):
            return f"{path}: length {len(want)} != {len(got)}"
        numbers = [abs(x) for x in want + got if _kind(x) == "number" and math.isfinite(x)]
        top = max(numbers) if numbers and len(numbers) == 2 * len(want) else 0.0
        return next((d for i, (x, y) in enumerate(zip(want, got))
                     if (d := compare_json(x, y, f"{path}[{i}]", rel, top))), None)
    if isinstance(want, str):
        return compare_text(want, got, f"{path}: ", rel)
    if isinstance(want, float) or isinstance(got, float):
        return None if numbers_close(float(want), float(got), rel, scale) else f"{path}: {want!r} != {got!r}"
    return None if want == got else f"{path}: {want!r} != {got!r}"


def compare(case_id: str, code: int, text: str) -> str | None:
    """None when the output matches the recorded golden (to :func:`case_tolerance`), else a one-line difference."""
    path = GOLDEN_DIR / f"{case_id}.txt"
    if not path.exists():
        return f"no golden recorded for {case_id} (run: python tests/golden_cases.py --update)"
    want = path.read_text(encoding="utf-8")
    want_code, _, want_text = want.partition("\n")
    if int(want_code.removeprefix("exit ")) != code:
        return f"exit {code}, recorded {want_code}"
    rel = case_tolerance(case_id)
    if case_id.endswith("-json") and (want_text or text):
        try:
            return compare_json(json.loads(want_text), json.loads(text), rel=rel)
        except json.JSONDecodeError as e:
            return f"not JSON: {e}"
    return compare_text(want_text, text, rel=rel)


def update(tmp: Path, only: list[str] | None = None) -> None:
    """Record every case's output (``only``: just these case ids; the other goldens stay as they are)."""
    GOLDEN_DIR.mkdir(exist_ok=True)
    known = {c for c, _ in cases()}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        sys.exit(f"no such case: {', '.join(unknown)}")
    fixtures = build_fixtures(tmp)
    if not only:
        for old in GOLDEN_DIR.glob("*.txt"):
            old.unlink()
    for case_id, argv in cases():
        if only and case_id not in only:
            continue
        code, text = run_case(argv, fixtures, tmp, case_id)
        (GOLDEN_DIR / f"{case_id}.txt").write_text(f"exit {code}\n{text}", encoding="utf-8")
        print(f"{case_id}: exit {code}")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:2] != ["--update"]:
        sys.exit("usage: python tests/golden_cases.py --update [CASE_ID ...]")
    os.environ.setdefault("COLUMNS", "200")
    os.environ.setdefault("NO_COLOR", "1")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        update(Path(d), sys.argv[2:])
