"""Build LyCORIS networks with lycoris-lora itself and measure their true ΔW through ``forward``
(the consumers' semantics), for ``tests/test_lycoris*.py``. Imported only after
``pytest.importorskip("lycoris")``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Tiny(torch.nn.Module):
    """A linear (in 24 → out 36) and a 3×3 conv without padding (8 → 12 channels)."""

    def __init__(self, lin: tuple[int, int] = (24, 36), conv: tuple[int, int] = (8, 12)) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(*lin)
        self.conv = torch.nn.Conv2d(conv[0], conv[1], 3, padding=0)


def make_network(algo: str, seed: int, *, dim: int = 4, alpha: float = 2.0, model: Tiny | None = None,
                 **kwargs):
    """(model, base copy, network) with every network parameter randomised (so ΔW ≠ 0), float64."""
    from lycoris import LycorisNetwork, create_lycoris

    torch.manual_seed(seed)
    model = (model or Tiny()).double()
    base = copy.deepcopy(model)
    LycorisNetwork.apply_preset({"target_module": [], "target_name": ["lin", "conv"]})
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, conv_dim=dim, conv_alpha=alpha, algo=algo,
                         **kwargs)
    net.apply_to()
    net = net.double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
            if name.endswith("dora_scale"):
                p.abs_().add_(0.5)
    return model, base, net


def save(net, path: Path) -> Path:
    net.save_weights(str(path), torch.float64, {})
    return path


@torch.no_grad()
def forward_delta(model: Tiny, base: Tiny, name: str) -> torch.Tensor:
    """ΔW₂d (out, in·kh·kw) = (wrapped forward − base forward) on the unit inputs, less the change at
    x = 0 (a bias change: ``full``'s ``diff_b``), float64."""
    mod, ref = getattr(model, name), getattr(base, name)
    if isinstance(ref, torch.nn.Linear):
        x = torch.eye(ref.in_features, dtype=torch.float64)
    else:
        n = ref.in_channels * 9
        x = torch.eye(n, dtype=torch.float64).reshape(n, ref.in_channels, 3, 3)
    z = torch.zeros_like(x[:1])
    return ((mod(x) - ref(x)) - (mod(z) - ref(z))).reshape(x.shape[0], -1).T


def base_weight(model: Tiny, name: str) -> torch.Tensor:
    w = getattr(model, name).weight.detach()
    return w.reshape(w.shape[0], -1)


def dora_delta(w: torch.Tensor, delta: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """W' − W for DoRA (LyCORIS ``apply_weight_decompose``): W' = ds·(W+ΔW)/‖W+ΔW‖, the norm per output
    row when ``ds`` is (out, 1[, 1, 1]), per input channel (over out and the kernel) when (1, in[, 1, 1])."""
    wp = w + delta
    if ds.shape[0] == w.shape[0] and ds.numel() == w.shape[0]:
        return ds.reshape(-1, 1) * wp / wp.norm(dim=1, keepdim=True) - w
    n_in = ds.numel()
    wp3 = wp.reshape(wp.shape[0], n_in, -1)
    return (ds.reshape(1, -1, 1) * wp3 / wp3.norm(dim=(0, 2)).reshape(1, -1, 1)).reshape(wp.shape) - w
