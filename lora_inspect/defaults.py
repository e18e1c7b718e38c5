"""Defaults shared by the library and the commands, importable without torch or numpy.

Header-only commands (``info``) read these without paying for the numerical stack.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ENERGY", "SCALE_RANGE", "FLAG_LARGE_UPDATE", "FLAG_INTRUDERS"]

DEFAULT_ENERGY = 0.95  # fraction of Σσ² a recommendation keeps (the τ of --energy)
SCALE_RANGE = (0.5, 2.0)  # the usual α/r (α/√r for rsLoRA) range; outside it a warning is given
# base-aware flags (lora_inspect.basemetrics; here so that views name them without importing torch)
FLAG_LARGE_UPDATE = "large_update"
FLAG_INTRUDERS = "intruders"
