"""``verify ADAPTER … --base HF_DIR --data FILE`` (wiring; the work is in :mod:`lora_inspect.hf.verify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import InspectError

__all__ = ["run_hf_verify"]


def run_hf_verify(adapters: list[str], base: str, data: str | None, max_tokens: int | None, batch_size: int | None,
                  device: str, fmt: str) -> None:
    """Evaluate ``adapters`` on the Hugging Face model ``base`` and ``data``; write the view in ``fmt``."""
    from ..hf.model import is_hf_dir
    from ..hf.text import DEFAULT_MAX_TOKENS
    from ..hf.verify import verify_hf
    from ..views.render import emit, stderr_console
    from ..views.verify import hf_verify_view

    if not Path(base).is_dir():
        raise click.BadParameter(f"{base}: no such directory", param_hint="'--base'")
    if not is_hf_dir(base):
        raise InspectError(f"--base {base}: not a Hugging Face model directory (config.json with a model_type); "
                           "for a lora-inspect training directory use `verify DIR`")
    if data is None:
        raise click.UsageError("--base HF_DIR needs --data FILE (.txt, or .jsonl with a 'text' field)")
    if device not in ("auto", "cpu", "cuda"):
        raise click.BadParameter(f"{device!r}: use auto, cpu or cuda", param_hint="'--device'")
    bar = _Bar(enabled=fmt == "table" and stderr_console().is_terminal)
    try:
        res = verify_hf(adapters, base, data, max_tokens=max_tokens or DEFAULT_MAX_TOKENS, batch=batch_size or 8,
                        device=device, progress=bar.advance, total=bar.start)
    finally:
        bar.stop()
    emit(hf_verify_view(res), fmt)


class _Bar:
    """A progress bar started once the number of batches is known (rich, on stderr, terminals only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._cm: Any = None
        self._advance: Any = None

    def start(self, total: int) -> None:
        from ..views.render import progress

        if self.enabled:
            self._cm = progress(total, "verify")
            self._advance = self._cm.__enter__()

    def advance(self, n: int = 1) -> None:
        if self._advance is not None:
            self._advance(n)

    def stop(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None
