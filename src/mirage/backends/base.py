"""What the back ends that load their weights lazily share: where they compute, fixed when they are made
(a loaded module may come and go, e.g. freed between stages, so it cannot be asked)."""
from __future__ import annotations

import torch


class Placed:
    """`device` and `dtype` of a back end, read-only, from `_device` and `_dtype` set in its __init__."""

    _device: torch.device
    _dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype
