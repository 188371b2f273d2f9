"""A first layer that standardises inputs with fixed (consortium-wide) statistics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Standardize(nn.Module):
    """``(x - mean) / std`` with buffers saved in the model, so consumers feed raw values.

    Parameters
    ----------
    stats : dict
        ``{"mean": [...], "std": [...]}`` per feature (tabular) or per channel (images).
    """

    mean: torch.Tensor  # buffers (register_buffer), declared for the type checker
    std: torch.Tensor

    def __init__(self, stats: dict[str, Any]) -> None:
        super().__init__()
        mean = torch.as_tensor(stats["mean"], dtype=torch.float32)
        std = torch.as_tensor(stats["std"], dtype=torch.float32)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise ``x`` (per feature, or per channel for (n, c, h, w) images)."""
        if x.dim() == 4:
            return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return (x - self.mean) / self.std
