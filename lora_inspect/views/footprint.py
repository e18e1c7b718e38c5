"""Tables for ``footprint`` (the document body comes from :func:`lora_inspect.footprint.footprint`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .render import Table, View, fmt_bytes, fmt_count
from .schemas import FOOTPRINT_SCHEMA
from .words import plural, verb

__all__ = ["footprint_view"]

_PROSE = ("text", "fixed", "text")  # term, bytes, formula: the prose wraps, the number never does


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10_000_000 else fmt_bytes(n)


def _terms(doc: dict[str, Any]) -> list[Sequence[Any]]:
    """Rows of a VRAM estimate: each term, then the total."""
    rows: list[Sequence[Any]] = [(t["name"], _gb(t["bytes"]), t["formula"]) for t in doc["terms"]]
    return rows + [("total", _gb(doc["total_bytes"]), "")]


def _params_table(doc: dict[str, Any]) -> Table:
    rec = doc.get("recommended")
    cols = ["type", "modules", "r", "params", "bytes"]
    if rec:
        cols += [f"params @r≤{rec['uniform_rank']}", "params @energy ranks", f"bytes @r≤{rec['uniform_rank']}"]
    rows: list[Sequence[Any]] = []
    for t, g in doc["by_type"].items():
        row = [t, g["modules"], ",".join(map(str, g["ranks"])), f"{g['params']:,}", fmt_bytes(g["bytes"])]
        if rec:
            row += [f"{g['params_uniform']:,}", f"{g['params_pattern']:,}", fmt_bytes(g["bytes_uniform"])]
        rows.append(row)
    total = ["LoRA total", sum(g["modules"] for g in doc["by_type"].values()), "", f"{doc['params']:,}", fmt_bytes(doc["lora_bytes"])]
    if rec:
        total += [f"{rec['params_uniform']:,}", f"{rec['params_pattern']:,}", fmt_bytes(rec["bytes_uniform"])]
    rows.append(total)
    if doc["extra_params"]:
        rows.append(["full tensors", "", "", f"{doc['extra_params']:,}", fmt_bytes(doc["extra_bytes"])] + ([""] * 3 if rec else []))
    optional = (f"bytes @r≤{rec['uniform_rank']}", "params @energy ranks", f"params @r≤{rec['uniform_rank']}") if rec else ()
    return Table("adapter parameters and bytes", cols, rows, kinds=["name"] + ["fixed"] * (len(cols) - 1),
                 optional=optional)


def footprint_view(doc: dict[str, Any], adapter_block: dict[str, Any]) -> View:
    """Tables for a footprint document (the document itself is the JSON)."""
    data = {"schema": FOOTPRINT_SCHEMA, "adapter": adapter_block, **{k: v for k, v in doc.items() if k != "schema"}}
    rec = doc.get("recommended")
    tables = [_params_table(doc)]
    sv = doc["serving"]
    v = sv["vllm"]
    tables.append(Table(f"serving ({sv['dtype']})", ["item", "bytes", "formula"], [
        ("one loaded adapter (unmerged)", fmt_bytes(sv["per_adapter_bytes"]), sv["per_adapter_formula"]),
        (f"vLLM pool, max_loras={v['max_loras']} max_lora_rank={v['max_lora_rank']}", fmt_bytes(v["pool_bytes"]),
         f"{v['formula']} — {v['scope']}"),
    ], justify=["left", "right", "left"], kinds=_PROSE))
    header = [
        f"{adapter_block['path']}: {doc['params']:,} LoRA params ({fmt_count(doc['params'])}), "
        f"{doc['extra_params']:,} full-tensor params, {fmt_bytes(doc['tensor_bytes'])} of tensors ("
        + ", ".join(f"{k} {fmt_bytes(b)}" for k, b in doc["bytes"].items()) + f"), file {fmt_bytes(doc['file_bytes'])}"
    ]
    footer = []
    if rec:
        footer.append(
            f"at τ = {rec['energy']:g}: uniform r={rec['uniform_rank']} → {fmt_count(rec['params_uniform'])} params "
            f"({fmt_bytes(rec['bytes_uniform'])}); per-module energy ranks → {fmt_count(rec['params_pattern'])} "
            f"({fmt_bytes(rec['bytes_pattern'])})"
        )
    if not v["fits"]:
        footer.append(f"! the adapter's rank exceeds max_lora_rank={v['max_lora_rank']}: vLLM refuses it")
    if doc["base"] and doc["base"]["unmatched_modules"]:
        n, total = doc["base"]["unmatched_modules"], sum(g["modules"] for g in doc["by_type"].values())
        footer.append(f"! {n} of {plural(total, 'module')} {verb(n, 'does')} not match {doc['base']['name']} "
                      "by name and shape (lora-inspect check --base tells which)")
    if doc["vram"]:
        tr, inf = doc["vram"]["training"], doc["vram"]["inference"]
        s = tr["settings"]
        title = (f"training VRAM on {doc['base']['name']} ({s['quant']}, batch {s['batch']} × seq {s['seq']}, "
                 f"{s['optimizer']}, {'gradient checkpointing' if s['grad_checkpointing'] else 'no checkpointing'})")
        tables.append(Table(title, ["term", "bytes", "formula"], _terms(tr), justify=["left", "right", "left"], kinds=_PROSE))
        tables.append(Table(f"inference VRAM (batch {s['batch']} × {plural(s['seq'], 'token')} of KV cache)", ["term", "bytes", "formula"],
                            _terms(inf), justify=["left", "right", "left"], kinds=_PROSE))
        footer.append(f"estimated peak: training {_gb(tr['total_bytes'])}, inference {_gb(inf['total_bytes'])} "
                      "(GB = 10⁹ B; allocator slack not included)")
    else:
        footer.append("give --base PRESET|config.json for training and inference VRAM")
    return View(data, tables, header=header, footer=footer)
