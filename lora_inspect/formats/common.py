"""Pairing of A/B keys into modules — the one place every layout goes through.

Each layout names its factor suffixes (``.lora_A.weight`` …) and roles; :func:`group_keys` splits
a tensor listing into modules and full tensors, and :func:`build_module` checks the pair (both
factors present, ranks agreeing, shapes sensible) and returns a :class:`~lora_inspect.adapter.Module`.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

from ..adapter import ORIENT_EMBEDDING, ORIENT_MLX, ORIENT_PEFT, Module
from ..errors import InspectError, UnpairedFactorError
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
        for suf in order:
            if key.endswith(suf) and len(key) > len(suf):
                name = key[: -len(suf)]
                if strip_prefix and name.startswith(strip_prefix):
                    name = name[len(strip_prefix) :]
                roles = modules.setdefault(name, {})
                role = suffixes[suf]
                if role in roles:
                    raise InspectError(f"module {name!r}: two tensors for its {role} factor ({roles[role]!r}, {key!r})")
                roles[role] = key
                break
        else:
            rest.append(key)
    # modules holding only an alpha / magnitude / bias but no factors are not modules
    for name in [n for n, r in modules.items() if "A" not in r and "B" not in r]:
        rest.extend(modules.pop(name).values())
    return modules, rest


def pattern_lookup(pattern: dict | None, name: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: first key (in dict order) for which
    ``re.match(rf"(.*\\.)?({key})$", name)`` matches wins (peft.utils.other.get_pattern_key)."""
    if pattern:
        for key, value in pattern.items():
            try:
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
            except re.error as e:
                raise InspectError(f"pattern key {key!r} is not a valid regular expression ({e})") from e
    return default


def scale_for(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT: s = α/r, or α/√r with rsLoRA (Kalajdzievski 2023, 'A Rank Stabilization Scaling Factor')."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def build_module(
    name: str,
    roles: dict[str, str],
    source: TensorSource,
    *,
    orient: str = ORIENT_PEFT,
    alpha: float | None = None,
    rslora: bool = False,
    adalora: bool = False,
) -> tuple[Module, bool]:
    """Check one A/B pair and make a Module. Returns (module, alpha_was_known).

    ``alpha`` None means: look for a per-module ``alpha`` tensor, else assume α = r (kohya's rule).
    """
    if "A" not in roles or "B" not in roles:
        have = "A" if "A" in roles else "B"
        missing = "B" if have == "A" else "A"
        raise UnpairedFactorError(
            f"module {name!r}: unpaired factor — {roles[have]!r} has no matching {missing} tensor "
            "(incomplete save or renamed keys?)"
        )
    a_info, b_info = source.info(roles["A"]), source.info(roles["B"])
    a_shape, b_shape = a_info.shape, b_info.shape
    if len(a_shape) < 2 or len(b_shape) < 2 or 0 in a_shape or 0 in b_shape:
        raise InspectError(
            f"module {name!r}: empty or 1-D factors {a_shape} (A) and {b_shape} (B) — the sign of a DeepSpeed ZeRO-3 "
            "/ FSDP save whose shards were not gathered (save inside deepspeed.zero.GatheredParameters or FSDP's "
            "summon_full_params)"
        )
    if orient == ORIENT_MLX:  # lora_a (in, r), lora_b (r, out)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InspectError(f"module {name!r}: mlx factors must be 2-D, found {a_shape} and {b_shape}")
        r_a, r_b = a_shape[1], b_shape[0]
        out_dim, in_dim, kind, kernel = b_shape[1], a_shape[0], "linear", None
    elif orient == ORIENT_EMBEDDING:  # A (r, vocab), B (dim, r)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InspectError(f"module {name!r}: embedding factors must be 2-D, found {a_shape} and {b_shape}")
        r_a, r_b = a_shape[0], b_shape[1]
        out_dim, in_dim, kind, kernel = a_shape[1], b_shape[0], "embedding", None
    else:  # A (r, in[, kh, kw]), B (out, r[, 1, 1])
        if len(a_shape) not in (2, 3, 4) or len(b_shape) != len(a_shape):
            raise InspectError(
                f"module {name!r}: factor shapes {a_shape} (A) and {b_shape} (B) do not form a LoRA pair"
            )
        if len(b_shape) > 2 and any(d != 1 for d in b_shape[2:]):
            raise InspectError(f"module {name!r}: up/B factor of a conv must be (out, r, 1, 1), found {b_shape}")
        r_a, r_b = a_shape[0], b_shape[1]
        out_dim = b_shape[0]
        in_dim = math.prod(a_shape[1:])
        kind = "linear" if len(a_shape) == 2 else "conv"
        kernel = tuple(a_shape[2:]) if len(a_shape) == 4 else ((a_shape[2], 1) if len(a_shape) == 3 else None)
    if r_a != r_b:
        raise InspectError(
            f"module {name!r}: rank mismatch — A has rank {r_a} ({roles['A']!r} {a_shape}) but B has rank {r_b} "
            f"({roles['B']!r} {b_shape})"
        )
    r = r_a
    known = alpha is not None
    if alpha is None and "alpha" in roles:
        alpha = source.scalar(roles["alpha"])
        known = True
        if not math.isfinite(alpha):
            raise InspectError(f"module {name!r}: alpha tensor {roles['alpha']!r} is {alpha}")
        if alpha == 0:  # kohya: zero alpha means α = r
            alpha = float(r)
    if alpha is None:
        alpha = float(r)
    if adalora:
        scale = alpha / (r + 1e-5)  # peft AdaLoRA: scaling / (ranknum + 1e-5), ranknum = r
    else:
        scale = scale_for(alpha, r, rslora)
    if "E" in roles:
        e_shape = source.info(roles["E"]).shape
        if math.prod(e_shape) != r:
            raise InspectError(f"module {name!r}: lora_E has shape {e_shape}, expected ({r}, 1)")
    # DoRA normalises the weight's output features: for an embedding (ΔW (vocab, dim) here) PEFT's
    # lora_magnitude_vector has one entry per embedding dim, i.e. per column
    m_len = in_dim if orient == ORIENT_EMBEDDING else out_dim
    if "m" in roles and math.prod(source.info(roles["m"]).shape) != m_len:
        raise InspectError(
            f"module {name!r}: DoRA magnitude has shape {source.info(roles['m']).shape}, expected ({m_len},)"
        )
    mod = Module(
        name=name,
        kind=kind,
        shape=(out_dim, in_dim),
        rank=r,
        alpha=float(alpha),
        scale=float(scale),
        a_key=roles["A"],
        b_key=roles["B"],
        source=source,
        orient=orient,
        kernel=kernel,
        e_key=roles.get("E"),
        magnitude_key=roles.get("m"),
        bias_key=roles.get("bias"),
        alpha_key=roles.get("alpha"),
        dtype=a_info.dtype,
    )
    return mod, known

