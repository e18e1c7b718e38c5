"""``verify ADAPTER … --base HF_DIR --data FILE``: each adapter merged into a Hugging Face base and run on
the user's text.

Per adapter, over every predicted token t (next-token prediction; padding excluded):

- ``loss`` — mean cross-entropy −log p(x_{t+1} | x_{≤t}); ``perplexity`` — exp(loss);
- ``kl_to_first`` — mean over tokens of KL(p_first ‖ p_this), the first adapter being the reference;
- ``top1_agreement`` — fraction of tokens where this adapter's argmax equals the first's;

and ``base_loss`` for the base without an adapter: the same definitions as ``verify DIR`` on the
project's own models (:mod:`lora_inspect.train.verify`). Batches are the outer loop, adapters the
inner one (each merged, run and unmerged per batch: :func:`lora_inspect.hf.apply.merged`), so only one
batch of log-probabilities is held, whatever the vocabulary. CPU: float32, fixed order; GPU: bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .apply import Bound, bind_adapter, merged
from .model import HFBase, load_hf
from .text import DEFAULT_MAX_TOKENS, batches, read_documents, token_chunks

__all__ = ["AdapterScore", "HFVerifyResult", "verify_hf", "prepare_text"]


@dataclass
class AdapterScore:
    adapter: str
    loss: float
    perplexity: float
    kl_to_first: float
    top1_agreement: float


@dataclass
class HFVerifyResult:
    base: str
    data: str
    device: str
    dtype: str
    tokens: int  # predicted tokens
    sequences: int
    base_loss: float
    results: list[AdapterScore] = field(default_factory=list)


@dataclass
class _Sums:
    ce: float = 0.0
    kl: float = 0.0
    agree: float = 0.0


def prepare_text(base: HFBase, data: str | Path, max_tokens: int) -> list[list[int]]:
    """Token chunks of ``data`` (see :mod:`lora_inspect.hf.text`)."""
    if base.tokenizer is None:
        raise ValueError("the base was loaded without its tokenizer")
    return token_chunks(base.tokenizer, read_documents(data), base.context, max_tokens, str(data))


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs (B, T−1, V) float32 of the next token at each position."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def _score(logp: torch.Tensor, ref: torch.Tensor, tgt: torch.Tensor, keep: torch.Tensor, s: _Sums) -> None:
    lp, rp = logp[keep], ref[keep]  # (n, V)
    s.ce += float(-lp.gather(1, tgt[keep].unsqueeze(1)).double().sum())
    s.kl += float((rp.exp() * (rp - lp)).sum(-1).double().sum())
    s.agree += float((lp.argmax(-1) == rp.argmax(-1)).double().sum())


def verify_hf(adapters: Sequence[str | Path], base_dir: str | Path, data: str | Path, *,
              max_tokens: int = DEFAULT_MAX_TOKENS, batch: int = 8, device: str = "auto",
              progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> HFVerifyResult:
    """Evaluate the base and each adapter on ``data``; every adapter is bound (checked) before any run.
    ``total`` receives the number of batches, ``progress`` one call per batch."""
    base = load_hf(base_dir, device)
    bound: list[Bound] = [bind_adapter(a, base.model) for a in adapters]
    chunks = prepare_text(base, data, max_tokens)
    n_batches = (len(chunks) + batch - 1) // batch
    if total is not None:
        total(n_batches)
    sums = [_Sums() for _ in [None, *bound]]
    n_tok = 0
    for ids, mask in batches(chunks, batch):
        ids, mask = ids.to(base.device), mask.to(base.device)
        tgt, keep = ids[:, 1:], mask[:, 1:].bool()
        n_tok += int(keep.sum())
        ref = None
        for s, b in zip(sums, [None, *bound]):
            with merged(base.model, b) as model:
                lp = _logprobs(model, ids, mask)
            if b is not None and ref is None:
                ref = lp
            _score(lp, lp if ref is None else ref, tgt, keep, s)
        if progress is not None:
            progress(1)
    res = HFVerifyResult(str(base_dir), str(data), base.device.type, str(base.dtype).removeprefix("torch."), n_tok,
                         len(chunks), sums[0].ce / n_tok)
    for b, s in zip(bound, sums[1:]):
        loss = s.ce / n_tok
        res.results.append(AdapterScore(b.label, loss, math.exp(min(loss, 700.0)), max(s.kl / n_tok, 0.0),
                                        s.agree / n_tok))
    return res
