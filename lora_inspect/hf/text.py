"""The user's text: ``.txt`` (one document) or ``.jsonl`` (one document per line, its ``text`` field),
tokenised with the base's tokenizer and cut into chunks of at most the model's context, in file order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import InspectError

__all__ = ["read_documents", "token_chunks", "batches", "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 65_536


def read_documents(path: str | Path) -> list[str]:
    p = Path(str(path))
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InspectError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InspectError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if p.suffix.lower() != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InspectError(f"{p}: line {i}: not JSON ({e.args[0] if e.args else e})") from None
        t = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(t, str):
            raise InspectError(f"{p}: line {i}: no string field 'text'")
        docs.append(t)
    return docs


def token_chunks(tokenizer, docs: list[str], context: int, max_tokens: int, where: str) -> list[list[int]]:
    """Token ids of each document (no special tokens added), cut into chunks of ≤ ``context`` tokens,
    at most ``max_tokens`` in all; chunks shorter than 2 tokens (nothing to predict) are dropped."""
    chunks: list[list[int]] = []
    left = max_tokens
    for d in docs:
        if left < 2:
            break
        ids = tokenizer(d, add_special_tokens=False)["input_ids"][:left]
        left -= len(ids)
        chunks += [ids[i : i + context] for i in range(0, len(ids), context) if len(ids[i : i + context]) >= 2]
    if not chunks:
        raise InspectError(f"{where}: no text to evaluate (fewer than 2 tokens)")
    return chunks


def batches(chunks: list[list[int]], batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) per batch in order, right-padded with token 0 (masked out)."""
    for i in range(0, len(chunks), batch):
        group = chunks[i : i + batch]
        n = max(len(c) for c in group)
        ids = torch.zeros(len(group), n, dtype=torch.long)
        mask = torch.zeros(len(group), n, dtype=torch.long)
        for j, c in enumerate(group):
            ids[j, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[j, : len(c)] = 1
        yield ids, mask
