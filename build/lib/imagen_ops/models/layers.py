"""Layers whose output rows do not depend on the batch they come in.

CPU kernels pick their summation order by shape, so an image sampled alone and the same
image among others would round apart (docs/architecture.md, "Determinism").
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIN_ROWS", "Linear", "linear"]

MIN_ROWS = 16


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear whose output rows do not depend on how many rows come with them.

    MKL's sgemm takes other kernels for a few rows (on an AVX-512 AMD EPYC: fewer than 12
    and not a multiple of 4) whose sums round differently, and the noise embedding and FiLM
    layers see one row per image; a short input is zero-padded to MIN_ROWS rows, so a
    seed's image is the same at every batch size, bit for bit.
    """
    rows = x.numel() // x.shape[-1]
    if rows >= MIN_ROWS:
        return F.linear(x, weight, bias)
    padded = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, MIN_ROWS - rows))
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear through `linear`: its rows do not depend on the batch."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
