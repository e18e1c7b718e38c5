"""``verify --base HF_DIR``: the JSON document (schema ``verify``, the same as ``verify DIR``'s, with
fields added) and the table."""

from __future__ import annotations

from dataclasses import asdict

from ..hf.verify import HFVerifyResult
from .render import Table, View
from .schemas import VERIFY_SCHEMA

__all__ = ["hf_verify_doc", "hf_verify_view"]


def hf_verify_doc(res: HFVerifyResult) -> dict:
    return {"schema": VERIFY_SCHEMA, "task": "hf", "base": res.base, "data": res.data, "device": res.device,
            "dtype": res.dtype, "tokens": res.tokens, "sequences": res.sequences, "base_loss": res.base_loss,
            "results": [asdict(r) for r in res.results]}


def hf_verify_view(res: HFVerifyResult) -> View:
    rows = [(r.adapter, f"{r.loss:.6g}", f"{(r.loss - res.base_loss):+.4g}", f"{r.perplexity:.6g}",
             f"{r.kl_to_first:.3g}", f"{r.top1_agreement:.2%}") for r in res.results]
    first = res.results[0] if res.results else None
    footer = []
    if first is not None:
        for r in res.results[1:]:
            rel = (r.loss - first.loss) / first.loss if first.loss else 0.0
            footer.append(f"{r.adapter}: loss {rel:+.2%} vs {first.adapter}, KL {r.kl_to_first:.3g} nats/token, "
                          f"same top-1 token {r.top1_agreement:.2%} of the time")
    return View(hf_verify_doc(res), [Table(
        f"verify on {res.base} ({res.tokens} tokens of {res.data}, {res.device} {res.dtype}; base loss {res.base_loss:.6g})",
        ["adapter", "loss", "Δ vs base", "perplexity", "KL to first", "top-1 agreement"], rows,
        kinds=["path", "fixed", "fixed", "fixed", "fixed", "fixed"])], footer=footer)
