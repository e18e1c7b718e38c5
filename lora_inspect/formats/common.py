"""Pairing of A/B keys into modules — the one place every layout goes through.

Each layout names its factor suffixes (``.lora_A.weight`` …) and roles; :func:`group_keys` splits
a tensor listing into modules and full tensors, and :func:`build_module` checks the pair (both
factors present, ranks agreeing, shapes sensible) and returns a :class:`~lora_inspect.adapter.Module`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..adapter import LowRankUpdate, Module
from ..errors import InspectError, UnpairedFactorError
from ..orientation import PEFT, Orientation
from ..peft_rules import adalora_scale, pattern_lookup, scale_for
from .tensors import TensorSource

__all__ = ["group_keys", "build_module", "pattern_lookup", "scale_for"]

# roles: "A", "B", "E" (AdaLoRA), "m" (DoRA magnitude), "bias" (lora_B.bias), "alpha" (scalar)


def group_keys(
    keys: Iterable[str], suffixes: dict[str, str], strip_prefix: str = ""
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Split keys into ``{module name: {role: key}}`` and the keys that belong to no module.

    ``suffixes`` maps a key suffix (``".lora_A.weight"``) to a role; the longest matching suffix wins.
    ``strip_prefix`` is removed from the front of module names when present.
    """
    order = sorted(suffixes, key=len, reverse=True)
    modules: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    for key in keys:
        suf = next((x for x in order if key.endswith(x) and len(key) > len(x)), None)
        if suf is None:
            rest.append(key)
            continue
        name = key[: -len(suf)]
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix) :]
        roles = modules.setdefault(name, {})
        role = suffixes[suf]
        if role in roles:
            raise InspectError(f"module {name!r}: two tensors for its {role} factor ({roles[role]!r}, {key!r})")
        roles[role] = key
    # modules holding only an alpha / magnitude / bias but no factors are not modules
    for name in [n for n, r in modules.items() if "A" not in r and "B" not in r]:
        rest.extend(modules.pop(name).values())
    return modules, rest


def _check_pair(name: str, roles: dict[str, str], a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    if "A" not in roles or "B" not in roles:
        have = "A" if "A" in roles else "B"
        missing = "B" if have == "A" else "A"
        raise UnpairedFactorError(
            f"module {name!r}: unpaired factor — {roles[have]!r} has no matching {missing} tensor "
            "(incomplete save or renamed keys?)"
        )
    if len(a_shape) < 2 or len(b_shape) < 2 or 0 in a_shape or 0 in b_shape:
        raise InspectError(
            f"module {name!r}: empty or 1-D factors {a_shape} (A) and {b_shape} (B) — the sign of a DeepSpeed ZeRO-3 "
            "/ FSDP save whose shards were not gathered (save inside deepspeed.zero.GatheredParameters or FSDP's "
            "summon_full_params)"
        )


def _alpha_from_tensor(name: str, key: str, source: TensorSource, rank: int) -> float:
    alpha = source.scalar(key)
    if not math.isfinite(alpha):
        raise InspectError(f"{source.path}: module {name!r}: alpha tensor {key!r} is {alpha}")
    return float(rank) if alpha == 0 else alpha  # kohya: zero alpha means α = r


def build_module(
    name: str,
    roles: dict[str, str],
    source: TensorSource,
    *,
    orient: Orientation = PEFT,
    alpha: float | None = None,
    rslora: bool = False,
    adalora: bool = False,
) -> tuple[Module, bool]:
    """Check one A/B pair and make a Module. Returns (module, alpha_was_known).

    ``alpha`` None means: look for a per-module ``alpha`` tensor, else assume α = r (kohya's rule).
    """
    if "A" not in roles or "B" not in roles:
        _check_pair(name, roles, (), ())
    a_info, b_info = source.info(roles["A"]), source.info(roles["B"])
    _check_pair(name, roles, a_info.shape, b_info.shape)
    sh = orient.shapes(name, a_info.shape, b_info.shape)
    if sh.rank_a != sh.rank_b:
        raise InspectError(
            f"module {name!r}: rank mismatch — A has rank {sh.rank_a} ({roles['A']!r} {a_info.shape}) but B has rank "
            f"{sh.rank_b} ({roles['B']!r} {b_info.shape})"
        )
    r = sh.rank_a
    known = alpha is not None
    if alpha is None and "alpha" in roles:
        alpha, known = _alpha_from_tensor(name, roles["alpha"], source, r), True
    if alpha is None:
        alpha = float(r)
    scale = adalora_scale(alpha, r) if adalora else scale_for(alpha, r, rslora)
    if "E" in roles:
        e_shape = source.info(roles["E"]).shape
        if math.prod(e_shape) != r:
            raise InspectError(f"module {name!r}: lora_E has shape {e_shape}, expected ({r}, 1)")
    m_len = orient.magnitude_len(sh.out, sh.inp)
    if "m" in roles and math.prod(source.info(roles["m"]).shape) != m_len:
        raise InspectError(
            f"module {name!r}: DoRA magnitude has shape {source.info(roles['m']).shape}, expected ({m_len},)"
        )
    mod = Module(
        name=name,
        kind=sh.kind,
        shape=(sh.out, sh.inp),
        rank=r,
        alpha=float(alpha),
        scale=float(scale),
        update=LowRankUpdate(roles["A"], roles["B"], r, orient, roles.get("E")),
        source=source,
        kernel=sh.kernel,
        magnitude_key=roles.get("m"),
        bias_key=roles.get("bias"),
        alpha_key=roles.get("alpha"),
        dtype=a_info.dtype,
    )
    return mod, known
