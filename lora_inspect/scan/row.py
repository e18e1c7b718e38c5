"""One adapter → one :class:`ScanRow`: identity (path, digest, size), layout, ranks and α, the ``rank``
summary, flags and the ``check`` verdict — or an error row carrying the one line a single-file command
prints for the same input. Runs in a worker (process pool or Ray task); nothing here presents.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..defaults import DEFAULT_ENERGY
from ..errors import InspectError
from ..validate import open_regular

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..checks import Policy

__all__ = ["ScanRow", "ScanConfig", "scan_one", "digest_files", "adapter_files", "error_row", "no_lora_keys",
           "SKIPPED", "NOT_ADAPTER"]

CHUNK = 1 << 20
SKIPPED = "skipped"  # scan_one's answer for an adapter whose digest already has a row (--resume)
NOT_ADAPTER = "not-adapter"  # a readable tensor file with no LoRA key at all (base weights beside adapters)
# the files of a directory adapter that its digest covers, in this order (what the readers read)
_DIR_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapters.safetensors")


@dataclass
class ScanConfig:
    """What every worker needs: the policy, τ, the row schema id, and the digests to skip (``--resume``)."""

    policy: "Policy | None" = None
    energy: float = DEFAULT_ENERGY
    precision: str = "auto"
    row_schema: str = ""
    skip: frozenset[str] = frozenset()


@dataclass
class ScanRow:
    """One adapter's result. Unknown values are None (an error row has only path, maybe digest/size, and error).

    ``size`` is the bytes the digest covers; ``params``/``bytes`` are the low-rank factors' (as ``rank``);
    ``*_uniform`` are those counts with every module cut to ``uniform_rank``, ``*_pattern`` at each
    module's own energy rank; ``check_failed`` names the rules that failed, ``check_messages`` says why."""

    path: str
    schema: str = ""
    digest: str | None = None
    size: int | None = None
    layout: str | None = None
    format: str | None = None
    modules: int | None = None
    r: int | None = None
    ranks: list[int] = field(default_factory=list)
    alpha: float | None = None
    alphas: list[float] = field(default_factory=list)
    dtype: str | None = None
    params: int | None = None
    bytes: int | None = None
    energy: float | None = None
    energy_rank_max: int | None = None
    energy_rank_mean: float | None = None
    uniform_rank: int | None = None
    uniform_min_retained_energy: float | None = None
    params_uniform: int | None = None
    bytes_uniform: int | None = None
    params_pattern: int | None = None
    bytes_pattern: int | None = None
    flags: list[str] = field(default_factory=list)
    check_ok: bool | None = None
    check_failed: list[str] = field(default_factory=list)
    check_messages: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScanRow":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def adapter_files(path: Path) -> list[Path]:
    """The files an adapter's digest covers: a directory's weights and config; a file and the
    ``adapter_config.json`` beside it (which the reader would use too)."""
    if path.is_dir():
        return [path / n for n in _DIR_FILES if (path / n).is_file()]
    side = path.parent / "adapter_config.json"
    return [path, side] if side.is_file() else [path]


def digest_files(files: list[Path]) -> tuple[str, int]:
    """sha256 over (name, length, content) of each file in turn, streamed in 1 MiB chunks; the bytes read.
    Special files are refused without being opened (``validate.open_regular``)."""
    h = hashlib.sha256()
    total = 0
    for p in files:
        with open_regular(p) as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{p.name}\0{size}\0".encode())
            while chunk := f.read(CHUNK):
                h.update(chunk)
                total += len(chunk)
    return h.hexdigest(), total


def error_row(path: str, message: str, cfg: ScanConfig, digest: str | None = None, size: int | None = None) -> ScanRow:
    return ScanRow(path=path, schema=cfg.row_schema, digest=digest, size=size, error=message, check_ok=False)


def _identity(ad: "Adapter", row: ScanRow) -> None:
    mods = ad.modules
    row.layout = ad.layout.name if ad.layout is not None else None
    row.format = ad.format
    row.modules = len(mods)
    row.ranks = sorted({m.rank for m in mods})
    row.r = max(row.ranks, default=0)
    row.alphas = sorted({float(m.alpha) for m in mods})
    row.alpha = None if ad.alpha is None else float(ad.alpha)
    dtypes = sorted({m.dtype for m in mods})
    row.dtype = ",".join(dtypes) if dtypes else None


def _analysis(ad: "Adapter", cfg: ScanConfig, row: ScanRow):
    from ..analysis import analyse

    report = analyse(ad, cfg.energy, precision=cfg.precision)
    s = report.summary
    ers = [m.energy_rank for m in report.modules if m.energy_rank is not None]
    row.energy = cfg.energy
    row.energy_rank_max = max(ers, default=None)
    row.energy_rank_mean = round(sum(ers) / len(ers), 6) if ers else None
    row.uniform_rank = s.uniform_rank
    row.uniform_min_retained_energy = round(float(s.uniform_min_retained_energy), 9)
    row.params, row.params_uniform, row.params_pattern = s.params.now, s.params.uniform, s.params.pattern
    row.bytes, row.bytes_uniform, row.bytes_pattern = s.bytes.now, s.bytes.uniform, s.bytes.pattern
    row.flags = sorted(s.flags)
    return report


_BASES: dict[str, Any] = {}


def _check(ad: "Adapter", cfg: ScanConfig, report, row: ScanRow) -> None:
    from ..checks import Policy, evaluate, scan_values

    policy = cfg.policy or Policy()
    base = None
    if policy.base:
        from ..basemodels import load_base

        base = _BASES.get(policy.base) or _BASES.setdefault(policy.base, load_base(policy.base))
    if policy.min_energy is not None and policy.min_energy[0] != cfg.energy:
        from ..analysis import analyse

        report = analyse(ad, DEFAULT_ENERGY, precision=cfg.precision)
    values = scan_values(ad, report, finite=policy.require_finite) if policy.needs_values else None
    results = evaluate(ad, policy, base=base, report=report, values=values)
    failed = [r for r in results if not r.ok]
    row.check_ok = not failed
    row.check_failed = sorted({r.rule for r in failed})
    row.check_messages = [f"{r.rule}: {r.message}" if r.message else r.rule for r in failed]


def _unexpected(e: BaseException) -> str:
    """The line the CLI prints for an exception it did not foresee (``cli._Group.invoke``)."""
    if isinstance(e, MemoryError):
        return "out of memory (is the input what it claims to be?)"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"unexpected {e.__class__.__name__}: {first}"


def no_lora_keys(p: Path) -> bool:
    """A readable tensor file none of whose keys mentions LoRA (a base model's weights): not an adapter,
    so no row. A file that cannot be read, or has LoRA keys in a layout no reader knows, gets its error row."""
    from ..formats import open_source

    try:
        keys = open_source(p).keys()
    except InspectError:
        return False
    return bool(keys) and not any("lora" in k.lower() for k in keys)


def scan_one(path: str, cfg: ScanConfig) -> ScanRow | str:
    """The row for the adapter at ``path`` — never raises for bad input; :data:`SKIPPED` when
    ``"digest path"`` is in ``cfg.skip``, :data:`NOT_ADAPTER` for a tensor file without LoRA keys."""
    from ..formats import load_adapter

    p = Path(path)
    digest = size = None
    try:
        if not p.exists():
            raise InspectError(f"{p}: no such file or directory")
        digest, size = digest_files(adapter_files(p))
        if f"{digest} {path}" in cfg.skip:
            return SKIPPED
        ad = load_adapter(p)
        row = ScanRow(path=path, schema=cfg.row_schema, digest=digest, size=size)
        _identity(ad, row)
        report = _analysis(ad, cfg, row)
        _check(ad, cfg, report, row)
        return row
    except InspectError as e:
        if p.is_file() and no_lora_keys(p):
            return NOT_ADAPTER
        return error_row(path, str(e), cfg, digest, size)
    except Exception as e:  # an input nobody foresaw: still one row, one line
        return error_row(path, _unexpected(e), cfg, digest, size)
