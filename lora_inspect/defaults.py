"""Defaults shared by the library and the commands, importable without torch or numpy.

Header-only commands (``info``) read these without paying for the numerical stack.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ENERGY", "SCALE_RANGE", "FLAG_LARGE_UPDATE", "FLAG_INTRUDERS", "UNIT_ROUNDOFF"]

DEFAULT_ENERGY = 0.95  # fraction of Σσ² a recommendation keeps (the τ of --energy)
SCALE_RANGE = (0.5, 2.0)  # the usual α/r (α/√r for rsLoRA) range; outside it a warning is given
# base-aware flags (lora_inspect.basemetrics; here so that views name them without importing torch)
FLAG_LARGE_UPDATE = "large_update"
FLAG_INTRUDERS = "intruders"
# unit roundoff u = 2^-p (p = significand bits incl. the hidden one) of each stored float dtype, by its
# safetensors name; the rounding bounds of every self-check (rewrite, convert) start from it
UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}
