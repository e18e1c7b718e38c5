"""Every JSON document lora-inspect writes, its schema id and version, in one place.

A document carries ``"schema": "lora-inspect/<name>/<version>"``. The version changes when a field
is removed, renamed or changes meaning; adding a field or reordering a list does not change it.
``verify``'s and ``task.json``'s ids are listed here too; the ``train`` package writes them.
"""

from __future__ import annotations

__all__ = ["SCHEMAS", "schema_id", "INFO_SCHEMA", "RANK_SCHEMA", "FOOTPRINT_SCHEMA", "CHECK_SCHEMA", "DIFF_SCHEMA",
           "TRUNCATE_SCHEMA", "RESCALE_SCHEMA", "VERIFY_SCHEMA", "TASK_SCHEMA",
           "SCAN_SCHEMA", "SCAN_ROW_SCHEMA", "CONVERT_SCHEMA", "MERGE_SCHEMA",
           "EXTRACT_SCHEMA", "FIT_SCHEMA", "APPLIED_SCHEMA"]

SCHEMAS: dict[str, int] = {
    "info": 1,  # `info`: layout, settings, sizes (views.inspect)
    "rank": 1,  # `rank`: per-module spectra and the summary (views.inspect)
    "footprint": 1,  # `footprint`: parameters, bytes, serving and VRAM terms (views.footprint)
    "check": 1,  # `check`: one row per adapter × rule (views.check)
    "diff": 1,  # `diff`: two adapters module by module (views.diff)
    "truncate": 1,  # `truncate` (views.rewrite)
    "rescale": 1,  # `rescale` (views.rewrite)
    "verify": 1,  # `verify` (train.verify); with --base HF_DIR also task "hf", base, data, tokens … (views.verify)
    "task": 1,  # task.json beside a trained adapter (train.tasks)
    "scan": 1,  # `scan`: the summary document (views.scan)
    "scan-row": 1,  # `scan`: one JSONL/Parquet row per adapter (scan.row.ScanRow)
    "convert": 1,  # `convert` (views.algebra)
    "merge": 1,  # `merge` (views.algebra)
    "extract": 1,  # `extract` (views.extract)
    "fit": 1,  # `fit`: per-module action, error, kept share, serving and applied checks (views.fit)
    "applied": 1,  # `check --applied`: per-module fate and the applied share of ‖ΔW‖² (views.fit)
}


def schema_id(name: str) -> str:
    """``"rank"`` → ``"lora-inspect/rank/1"``."""
    return f"lora-inspect/{name}/{SCHEMAS[name]}"


INFO_SCHEMA = schema_id("info")
RANK_SCHEMA = schema_id("rank")
FOOTPRINT_SCHEMA = schema_id("footprint")
CHECK_SCHEMA = schema_id("check")
DIFF_SCHEMA = schema_id("diff")
TRUNCATE_SCHEMA = schema_id("truncate")
RESCALE_SCHEMA = schema_id("rescale")
VERIFY_SCHEMA = schema_id("verify")
TASK_SCHEMA = schema_id("task")
SCAN_SCHEMA = schema_id("scan")
SCAN_ROW_SCHEMA = schema_id("scan-row")
CONVERT_SCHEMA = schema_id("convert")
MERGE_SCHEMA = schema_id("merge")
FIT_SCHEMA = schema_id("fit")
APPLIED_SCHEMA = schema_id("applied")
EXTRACT_SCHEMA = schema_id("extract")
