"""``truncate --calibrate FILE --base HF_DIR``: the text is split (every 4th chunk held out for the check), the
base loaded with the adapter bound, then the calibrated truncation runs (wiring; the work is in
:mod:`lora_inspect.hf.collect` and :mod:`lora_inspect.rewrite.calibrate`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..adapter import Adapter
from ..errors import InspectError
from ..rewrite import TruncateSpec
from ..rewrite.results import TruncateResult

__all__ = ["calibrated"]


def calibrated(ad: Adapter, out: str, spec: TruncateSpec, calibrate: str, base: str | None, ridge: float,
               max_tokens: int | None, batch_size: int | None, device: str, force: bool, show: bool) -> TruncateResult:
    from ..hf.apply import bind_adapter
    from ..hf.collect import ModelCalibration, hf_feed, split_chunks
    from ..hf.model import is_hf_dir, load_hf
    from ..hf.text import DEFAULT_MAX_TOKENS
    from ..hf.verify import prepare_text
    from ..rewrite.calibrate import calibrated_truncate, calibration_target
    from ..views.render import progress

    if base is None:
        raise click.UsageError("--calibrate needs --base HF_DIR (the model the adapter was trained on)")
    if not is_hf_dir(base):
        raise InspectError(f"--base {base}: not a Hugging Face model directory (config.json with a model_type)")
    if not ridge > 0:
        raise click.BadParameter(f"must be > 0, got {ridge}", param_hint="'--ridge'")
    calibration_target(ad, Path(out), force)  # refusals come before the base is loaded
    hf = load_hf(base, device)
    bound = bind_adapter(ad.path, hf.model, ad)
    fit, held = split_chunks(prepare_text(hf, calibrate, max_tokens or DEFAULT_MAX_TOKENS), str(calibrate))
    batch = batch_size or 8
    data = ModelCalibration(hf.model, bound, hf_feed(fit, batch, hf.device), hf_feed(held, batch, hf.device))
    facts = {"data": str(calibrate), "base": str(base)}
    with progress(len(ad.modules), "calibrating", enabled=show) as advance:
        return calibrated_truncate(ad, Path(out), spec, data, ridge=ridge, force=force, calibration=facts,
                                   progress=advance)
