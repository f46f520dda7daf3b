"""Dtype rules shared by the routers, the experts and the competition."""
from __future__ import annotations

import torch


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; keep float32/float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype when autocast is on for its device."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype
