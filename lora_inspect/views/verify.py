"""``verify``: the JSON document (schema ``verify``) and the table, for a training output directory
(``verify DIR``) and for adapters on a Hugging Face model (``verify … --base HF_DIR``, fields added).

Both tables say below them what each column is: the numbers mean different things for the planted
task (a KL divergence to a teacher) and for text (a cross-entropy), and a loss of 0.0005 beside a
perplexity of 157 is right, not a bug, when the perplexity includes the teacher's own entropy.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .render import Table, View
from .schemas import VERIFY_SCHEMA
from .words import plural

if TYPE_CHECKING:  # pragma: no cover
    from ..hf.verify import HFVerifyResult

__all__ = ["hf_verify_doc", "hf_verify_view", "verify_doc", "verify_view"]

COLUMNS = ["adapter", "loss", "Δ vs base", "perplexity", "KL to first", "top-1 agreement"]
KINDS = ["path", "fixed", "fixed", "fixed", "fixed", "fixed"]
OPTIONAL = ("Δ vs base", "perplexity")  # the base loss is in the title; the caption says what perplexity is

_KL_AGREE = ("KL to first = mean over positions of KL(first ‖ this) in nats, the first adapter being the "
             "reference; top-1 agreement = share of positions where this adapter's most likely next token is "
             "the first's")


def _row(x: dict[str, Any], base_loss: float) -> tuple:
    return (x["adapter"], f"{x['loss']:.6g}", f"{x['loss'] - base_loss:+.4g}", f"{x['perplexity']:.6g}",
            f"{x['kl_to_first']:.3g}", f"{x['top1_agreement']:.2%}")


def _versus_first(results: list[dict[str, Any]]) -> list[str]:
    """One line per further adapter: its loss relative to the first's, KL and agreement."""
    if not results:
        return []
    first = results[0]
    out = []
    for r in results[1:]:
        rel = (r["loss"] - first["loss"]) / first["loss"] if first["loss"] else 0.0
        out.append(f"{r['adapter']}: loss {rel:+.2%} vs {first['adapter']}, KL {r['kl_to_first']:.3g} nats/token, "
                   f"same top-1 token {r['top1_agreement']:.2%} of the time")
    return out


def verify_doc(r: dict[str, Any]) -> dict[str, Any]:
    """``verify DIR``'s document: schema, task, the base's loss and one result per adapter."""
    return {"schema": r["schema"], "task": r["task"], "base_loss": r["base_loss"], "results": r["results"]}


def _legend(task: str | None, results: list[dict[str, Any]]) -> list[str]:
    """What loss and perplexity are for ``task``, in words (the caption under the table)."""
    if task == "planted":
        floor = results[0]["perplexity"] * math.exp(-results[0]["loss"]) if results else None
        own = f" (here {floor:.6g})" if floor is not None and math.isfinite(floor) else ""
        return ["loss = KL(teacher ‖ model) in nats per position on the held-out inputs, the planted task's "
                "objective: 0 is the teacher exactly; Δ vs base = loss minus the base model's",
                "perplexity = exp(cross-entropy to the teacher's distribution) = exp(teacher entropy + loss): "
                f"it cannot fall below the teacher's own perplexity{own}, however small the loss",
                _KL_AGREE]
    return ["loss = next-byte cross-entropy in nats per byte on the held-out text; Δ vs base = loss minus the "
            "base model's; perplexity = exp(loss)", _KL_AGREE]


def verify_view(r: dict[str, Any], directory: str) -> View:
    """``verify DIR``: one row per adapter, the columns explained below the table."""
    rows = [_row(x, r["base_loss"]) for x in r["results"]]
    table = Table(f"verify {directory} ({r['task']} task; base loss {r['base_loss']:.6g})", COLUMNS, rows,
                  kinds=KINDS, optional=OPTIONAL)
    return View(verify_doc(r), [table], footer=_legend(r["task"], r["results"]) + _versus_first(r["results"]))


def hf_verify_doc(res: HFVerifyResult) -> dict:
    return {"schema": VERIFY_SCHEMA, "task": "hf", "base": res.base, "data": res.data, "device": res.device,
            "dtype": res.dtype, "tokens": res.tokens, "sequences": res.sequences, "base_loss": res.base_loss,
            "results": [asdict(r) for r in res.results]}


def hf_verify_view(res: HFVerifyResult) -> View:
    doc = hf_verify_doc(res)
    rows = [_row(x, res.base_loss) for x in doc["results"]]
    legend = ["loss = next-token cross-entropy in nats per token of --data (the base's tokenizer); Δ vs base = "
              "loss minus the base model's; perplexity = exp(loss)", _KL_AGREE]
    return View(doc, [Table(
        f"verify on {res.base} ({plural(res.tokens, 'token')} of {res.data}, {res.device} {res.dtype}; base loss "
        f"{res.base_loss:.6g})", COLUMNS, rows, kinds=KINDS, optional=OPTIONAL)],
        footer=legend + _versus_first(doc["results"]))
