"""``.bin`` state dicts: read only through ``torch.load(weights_only=True)`` — pickled code never runs — and
turned into numpy arrays at once (bf16 as :data:`lora_inspect.arrays.BF16` bits). torch is the engine here
and is imported only when a ``.bin`` is opened.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .. import validate
from ..errors import InspectError
from ..units import noun
from .tensors import TensorInfo, TensorSource, first_line, name_ok

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["StateDictSource", "load_bin"]


class StateDictSource(TensorSource):
    """In-memory arrays (a ``.bin`` read with ``weights_only=True``, converted from torch at once)."""

    def __init__(self, path: Path, state: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
        from ..arrays import st_dtype

        self.path = path
        self._state = state
        self.metadata = metadata or {}
        self.tensors = {}
        for k, t in state.items():
            try:
                dt = st_dtype(t)
            except ValueError:
                raise InspectError(f"{path}: tensor {k!r} has unsupported dtype {t.dtype}") from None
            self.tensors[k] = TensorInfo(k, dt, tuple(t.shape), t.nbytes)

    def raw(self, key: str) -> np.ndarray:
        self._known(key)
        return self._state[key]


def _plain_tensor(path: Path, key: object, value: object) -> np.ndarray:
    """One entry of a loaded ``.bin``: a string key and a dense CPU tensor (a Parameter is unwrapped), as
    a numpy array (bf16 as its bits)."""
    import torch

    from ..arrays import from_torch

    if not isinstance(key, str):
        raise InspectError(f"{path}: state dict key {validate.show_value(key)} is not a string")
    name_ok(path, key)
    if isinstance(value, dict):
        raise InspectError(f"{path}: entry {key!r} is a nested dict, not a tensor (a checkpoint holding a state "
                           "dict? save the state dict itself)")
    if not isinstance(value, torch.Tensor):
        raise InspectError(f"{path}: entry {key!r} is {type(value).__name__}, not a tensor")
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise InspectError(f"{path}: tensor {key!r} is a tensor subclass ({type(value).__name__}); only plain tensors are read")
    if value.layout != torch.strided:
        raise InspectError(f"{path}: tensor {key!r} is stored {str(value.layout).removeprefix('torch.')} "
                           "(sparse tensors are not read; save it dense)")
    if value.is_quantized or value.is_meta or value.device.type != "cpu":
        what = "quantized" if value.is_quantized else f"on device {value.device.type}"
        raise InspectError(f"{path}: tensor {key!r} is {what}; only plain CPU tensors are read")
    if str(value.dtype).removeprefix("torch.") not in _BIN_DTYPES:
        raise InspectError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}")
    return from_torch(value)


# what a ``.bin`` tensor may be (torch's names): the dtypes numpy holds, and bf16 as its bits
_BIN_DTYPES = ("bool", "uint8", "int8", "int16", "float16", "bfloat16", "int32", "float32", "int64", "float64")


def load_bin(path: Path) -> StateDictSource:
    """Read a pickled state dict without executing code (``weights_only=True``): only string keys and
    plain dense tensors are accepted; anything else is one line naming the key."""
    import torch

    try:
        with validate.open_regular(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": not the user's concern
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
    except InspectError:
        raise
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise InspectError(
                f"{path}: refused: the pickle asks to run code or build objects that are not tensors "
                "(only plain tensors are loaded; convert it with a trusted tool to .safetensors)"
            ) from e
        raise InspectError(f"{path}: not a readable PyTorch state dict ({first_line(e)})") from e
    if not isinstance(state, dict):
        raise InspectError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    if len(state) > validate.MAX_TENSORS:
        raise InspectError(f"{path}: {len(state)} {noun(len(state), 'tensor')} in one file (limit {validate.MAX_TENSORS})")
    return StateDictSource(path, {k: _plain_tensor(path, k, v) for k, v in state.items()})
