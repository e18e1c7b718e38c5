"""The layout plug-ins and the issue-9 fixes in the reading/writing core: the diffusers
attention-processor layout, the lora_adapter_metadata rescale, config validation where values
enter, output-path and rescale-factor refusals, OS errors while writing, stale temporaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import build_peft, planted_factors, rel_close, run_cli, write_kohya, write_mlx
from safetensors.torch import load_file, save_file

from lora_inspect import load_adapter
from lora_inspect.errors import InspectError
from lora_inspect.formats import LAYOUTS, detect_format
from lora_inspect.formats.layout import Found

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
ATTN2 = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"


def _one_line(r, *contains: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-inspect: error:"), r.stderr
    assert "Traceback" not in r.output and "unexpected" not in lines[0], lines[0]
    for c in contains:
        assert c in lines[0], (c, lines[0])
    return lines[0]


def _attn_procs(seed: int = 0, r: int = 4) -> dict[str, torch.Tensor]:
    """diffusers ≤ 0.13 ``save_attn_procs`` keys: <block>.processor.to_{q,k,v,out}_lora.{down,up}.weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for block, dim in ((ATTN, 16), (ATTN2, 24)):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            sd[f"{block}.processor.{proj}_lora.down.weight"] = torch.randn(r, dim, generator=g)
            sd[f"{block}.processor.{proj}_lora.up.weight"] = torch.randn(dim, r, generator=g)
    return sd


def _real_name(key: str) -> str:
    name = key.rsplit("_lora.", 1)[0].replace(".processor.", ".")
    return name + ".0" if name.endswith(".to_out") else name


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_attn_procs_read(tmp_path, suffix):
    sd = _attn_procs()
    path = tmp_path / f"pytorch_lora_weights{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, str(path))
    ad = load_adapter(path)
    assert ad.format == "diffusers-attn-procs"
    want = {_real_name(k) for k in sd}
    assert {m.name for m in ad.modules} == want
    assert f"{ATTN}.to_out.0" in want and f"{ATTN}.to_q" in want
    for m in ad.modules:  # scale 1: ΔW = up @ down, independent of the reader's orientation code
        stored = m.a_key.rsplit("_lora.down.weight", 1)[0]
        ref = sd[f"{stored}_lora.up.weight"].double() @ sd[f"{stored}_lora.down.weight"].double()
        assert m.scale == 1.0 and rel_close(m.delta(), ref, 1e-12), m.name


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_attn_procs_rewrite_same_layout(tmp_path, suffix):
    sd = _attn_procs(seed=1)
    path = tmp_path / f"in{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, str(path))
    r = run_cli("truncate", path, "-o", tmp_path / f"t{suffix}", "--rank", "2")
    assert r.exit_code == 0, r.output
    r = run_cli("rescale", path, "-o", tmp_path / f"b{suffix}", "--factor", "0.5", "--bake")
    assert r.exit_code == 0, r.output
    for name, k, f in (("t", 2, 1.0), ("b", 4, 0.5)):
        out = tmp_path / f"{name}{suffix}"
        got = load_file(str(out)) if suffix == ".safetensors" else torch.load(str(out), weights_only=True)
        assert set(got) == set(sd)  # the same keys: the same layout
        for key in sd:
            if key.endswith("_lora.down.weight"):
                up = key.replace("_lora.down.weight", "_lora.up.weight")
                ref = sd[up].double() @ sd[key].double()
                new = got[up].double() @ got[key].double()
                assert got[key].shape[0] == k
                if k == 4:
                    assert rel_close(new, f * ref, 1e-6)
                else:  # Eckart–Young: the best rank-2 approximation
                    u, s, vh = torch.linalg.svd(ref)
                    assert rel_close(new, (u[:, :2] * s[:2]) @ vh[:2], 1e-5)
        assert load_adapter(out).format == "diffusers-attn-procs"
    _one_line(run_cli("rescale", path, "-o", tmp_path / f"c{suffix}", "--factor", "2"), "use --bake")
    from lora_inspect.rewrite import rescale

    with pytest.raises(InspectError) as e:  # the library names no flag; the command does
        rescale(load_adapter(path), tmp_path / f"d{suffix}", factor=2.0)
    assert "--" not in str(e.value) and e.value.option == "bake"


def test_layouts_are_an_ordered_list():
    """First match wins: PEFT (which also reads diffusers keys beside a config) is the last layout that reads;
    after it only written-only layouts (GGUF). Every reading layout owns a format or shares PEFT's."""
    names = [layout.name for layout in LAYOUTS]
    assert names.index("diffusers-attn-procs") < names.index("peft")
    assert all(not layout.matches(["x.lora_A.weight"], Found(Path("x"), Path("x"))) for layout in
               LAYOUTS[names.index("peft") + 1:])
    owned = [f for layout in LAYOUTS for f in layout.formats]
    assert len(owned) == len(set(owned))  # one layout per format: layout_named is unambiguous


def test_rescale_config_in_metadata_header(tmp_path):
    """A bare safetensors file whose PEFT config lives in lora_adapter_metadata: --factor edits the header."""
    g = torch.Generator().manual_seed(3)
    sd, ref = {}, {}
    for i in range(2):
        b, a = torch.randn(12, 4, generator=g), torch.randn(4, 10, generator=g)
        sd[f"base_model.model.layers.{i}.q_proj.lora_A.weight"] = a
        sd[f"base_model.model.layers.{i}.q_proj.lora_B.weight"] = b
        ref[f"layers.{i}.q_proj"] = (b.double() @ a.double())
    cfg = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"layers.1.q_proj": 2}, "target_modules": ["q_proj"]}
    path = tmp_path / "x.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(cfg)})
    out = tmp_path / "y.safetensors"
    r = run_cli("rescale", path, "-o", out, "--factor", "3")
    assert r.exit_code == 0, r.output
    with open(out, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    new_cfg = json.loads(meta["lora_adapter_metadata"])
    assert new_cfg["lora_alpha"] == 24 and new_cfg["alpha_pattern"] == {"layers.1.q_proj": 6}
    ad = load_adapter(out)
    for name, alpha in (("layers.0.q_proj", 8), ("layers.1.q_proj", 2)):
        assert rel_close(ad.module(name).delta(), 3 * alpha / 4 * ref[name], 1e-6)


# ------------------------------------------------------------------ config values, validated where they enter


def _peft(tmp_path, **cfg_changes):
    b = build_peft(tmp_path / "a", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    cfg_path = b.path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(cfg_changes)
    cfg_path.write_text(json.dumps(cfg))
    return b.path


@pytest.mark.parametrize("changes, contains", [
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": [2]}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": "2"}}, "alpha_pattern"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"r": [4]}, "r must be"),
    ({"use_rslora": "yes"}, "use_rslora"),
])
def test_bad_config_values_one_line(tmp_path, changes, contains):
    path = _peft(tmp_path, **changes)
    _one_line(run_cli("info", path), "adapter_config.json", contains)


def test_target_modules_null_reads_and_rewrites(tmp_path):
    """PEFT's semantics: target_modules null means 'from the model type'; the adapter is readable, and a
    rewrite's output is readable too."""
    path = _peft(tmp_path, target_modules=None)
    assert run_cli("info", path, "--json").exit_code == 0
    for cmd, opt in (("truncate", ("--rank", "2")), ("rescale", ("--factor", "2"))):
        out = tmp_path / f"o-{cmd}"
        r = run_cli(cmd, path, "-o", out, *opt)
        assert r.exit_code == 0, r.output
        r = run_cli("info", out, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads((out / "adapter_config.json").read_text())["target_modules"] is None


def test_config_utf16_with_bom(tmp_path):
    path = _peft(tmp_path)
    cfg_path = path / "adapter_config.json"
    cfg_path.write_bytes(cfg_path.read_text().encode("utf-16"))  # Python writes a BOM first
    assert cfg_path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    assert load_adapter(path).r == 4


def test_diffusers_metadata_alpha_string(tmp_path):
    b, a = planted_factors(8, 6, 2, 2, seed=0)
    sd = {"unet.mid.to_q.lora_A.weight": a, "unet.mid.to_q.lora_B.weight": b}
    path = tmp_path / "d.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": "8"})})
    _one_line(run_cli("info", path), "lora_alpha")


def test_mlx_rank_list(tmp_path):
    b, a = planted_factors(8, 6, 2, 2, seed=0)
    d = write_mlx(tmp_path / "m", {"model.layers.0.self_attn.q_proj": (b, a)})
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = [2]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _one_line(run_cli("info", d), "rank")


@pytest.mark.parametrize("cmd", ["info", "rank"])
def test_nan_alpha_tensor(tmp_path, cmd):
    b, a = planted_factors(8, 6, 2, 2, seed=0)
    path = write_kohya(tmp_path / "k.safetensors", {"lora_unet_x_proj": (a, b, float("nan"))})
    _one_line(run_cli(cmd, path), "alpha")


# ------------------------------------------------------------------ refusals and warnings of the rewrites


@pytest.fixture
def kohya(tmp_path):
    g = torch.Generator().manual_seed(5)
    mods = {f"lora_unet_b{i}_proj": (torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g), 2.0)
            for i in range(2)}
    return write_kohya(tmp_path / "k.safetensors", mods)


def test_directory_adapter_to_weight_file_name_refused(tmp_path):
    path = _peft(tmp_path)
    out = tmp_path / "k.safetensors"
    _one_line(run_cli("truncate", path, "-o", out, "--rank", "2"), "k.safetensors", "directory")
    assert not out.exists()
    d = write_mlx(tmp_path / "m", {"model.layers.0.self_attn.q_proj": planted_factors(8, 6, 2, 2, seed=0)})
    _one_line(run_cli("rescale", d, "-o", tmp_path / "m.safetensors", "--factor", "2"), "directory")
    assert not (tmp_path / "m.safetensors").exists()


def test_truncate_rank_above_every_rank_warns(kohya, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run_cli("truncate", kohya, "-o", out, "--rank", "64")
    assert r.exit_code == 0 and out.is_file(), r.output
    assert "copied unchanged" in r.stderr and "every module" in r.stderr
    new = load_adapter(out)
    old = load_adapter(kohya)
    for m in old.modules:
        assert rel_close(new.module(m.name).delta(), m.delta(), 1e-5)


@pytest.mark.parametrize("opt, contains", [
    (("--factor", "-1"), "--factor"),
    (("--factor", "0"), "--factor"),
    (("--factor", "inf"), "--factor"),
    (("--alpha", "-16"), "--alpha"),
    (("--factor", "1e300"), "overflow"),
    (("--factor", "1e300", "--bake"), "overflow"),
    (("--factor", "1e-40", "--bake"), "underflow"),
])
def test_rescale_factor_refusals(kohya, tmp_path, opt, contains):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    _one_line(run_cli("rescale", kohya, "-o", out_dir / "x.safetensors", *opt), contains)
    assert list(out_dir.iterdir()) == []


def test_energy_error_names_the_flag_not_the_library(kohya, tmp_path):
    line = _one_line(run_cli("truncate", kohya, "-o", tmp_path / "x.safetensors", "--energy", "2"), "--energy")
    from lora_inspect.rewrite import TruncateSpec

    with pytest.raises(InspectError) as e:
        TruncateSpec(energy=2).validate()
    assert "--" not in str(e.value) and "energy must be in (0, 1]" in str(e.value) and line


# ------------------------------------------------------------------ writing: OS errors, stale temporaries


def test_os_error_while_writing_is_one_line_and_leaves_nothing(kohya, tmp_path, monkeypatch):
    import errno

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    line = _one_line(run_cli("truncate", kohya, "-o", out_dir / "x.safetensors", "--rank", "2"), "ENOSPC")
    assert "No space left" in line and "x.safetensors" in line
    assert list(out_dir.iterdir()) == []


def test_write_safetensors_os_error(tmp_path):
    from lora_inspect.files import write_safetensors

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InspectError, match="cannot write"):
        write_safetensors(blocker / "x.safetensors", {"a": torch.zeros(2)})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(kohya, tmp_path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    pid = _dead_pid()
    stale_dir = out_dir / f".old.lora-inspect-tmp-{pid}"
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"partial")
    stale_file = out_dir / f".x.safetensors.lora-inspect-tmp-{pid}.safetensors"
    stale_file.write_bytes(b"partial")
    keep = out_dir / "unrelated.txt"
    keep.write_text("mine")
    r = run_cli("truncate", kohya, "-o", out_dir / "x.safetensors", "--rank", "2")
    assert r.exit_code == 0, r.output
    assert not stale_dir.exists() and not stale_file.exists() and keep.read_text() == "mine"
    assert "note: removed" in r.stderr and str(pid) in r.stderr


def test_detect_format_names_layouts(kohya):
    from lora_inspect.formats.tensors import open_tensors

    assert detect_format(open_tensors(kohya)) == "kohya"


def test_too_many_tensors_refused_in_one_line(tmp_path, monkeypatch):
    import lora_inspect.validate as validate

    monkeypatch.setattr(validate, "MAX_TENSORS", 3)
    g = torch.Generator().manual_seed(0)
    sd = {f"lora_unet_b{i}_proj.lora_down.weight": torch.randn(2, 4, generator=g) for i in range(2)}
    sd.update({f"lora_unet_b{i}_proj.lora_up.weight": torch.randn(4, 2, generator=g) for i in range(2)})
    path = tmp_path / "k.safetensors"
    save_file(sd, str(path))
    _one_line(run_cli("info", path), "4 tensors", "3")


def test_module_lookup_is_an_index(kohya):
    ad = load_adapter(kohya)
    for m in ad.modules:
        assert ad.module(m.name) is m
    with pytest.raises(KeyError):
        ad.module("nope")


def test_file_size_limit_while_writing_is_one_line(tmp_path):
    """A real failing write (RLIMIT_FSIZE: the kernel's EFBIG, as a full disk gives ENOSPC): exit 2,
    one line naming the output, no temporary left behind."""
    resource = pytest.importorskip("resource")
    g = torch.Generator().manual_seed(2)
    mods = {f"lora_unet_b{i}_proj": (torch.randn(8, 512, generator=g), torch.randn(512, 8, generator=g), 4.0)
            for i in range(8)}
    src = write_kohya(tmp_path / "k.safetensors", mods)  # ~260 kB
    out_dir = tmp_path / "o"
    out_dir.mkdir()

    def limit():  # pragma: no cover - runs in the child
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(p) for p in sys.path if p]))
    r = subprocess.run([sys.executable, "-m", "lora_inspect", "rescale", str(src), "-o", str(out_dir / "x.safetensors"),
                        "--factor", "2"], capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "x.safetensors" in lines[0] and "cannot write" in lines[0] and "Traceback" not in r.stderr
    assert list(out_dir.iterdir()) == []
