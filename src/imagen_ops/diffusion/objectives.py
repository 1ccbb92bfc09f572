"""What the network predicts (eps, x0 or v) and how the loss weighs noise levels.

With x_t = alpha x0 + sigma eps (schedules.py notation):

    eps-prediction:  x0 = (x_t - sigma * eps) / alpha
    x0-prediction:   x0 = out
    v-prediction:    v = alpha * eps - sigma * x0   (Salimans & Ho 2022),  x0 = alpha x_t - sigma v

The squared errors are multiples of each other: |eps_hat - eps|^2 = snr |x0_hat - x0|^2 and
|v_hat - v|^2 = (snr + 1) |x0_hat - x0|^2. Each weighting is therefore one weight on the
x0 error, divided by the objective's own factor. Min-SNR-gamma (Hang et al. 2023) weighs
the x0 error by min(snr, gamma).

`to_x0` is the only place that maps network output to x0; the loss and every sampler use it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Objective", "loss_weight", "target", "to_eps", "to_x0"]

Objective = Literal["eps", "x0", "v"]


def to_x0(out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, objective: Objective) -> Tensor:
    """Network output -> prediction of the clean image."""
    if objective == "v":
        return alpha * x_t - sigma * out
    if objective == "eps":
        return (x_t - sigma * out) / alpha
    if objective == "x0":
        return out
    raise ValueError(f"unknown objective {objective!r}; choose eps, x0 or v")


def to_eps(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise implied by an x0 prediction."""
    return (x_t - alpha * x0) / sigma


def target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, objective: Objective) -> Tensor:
    """What the network should output for (x0, eps) at this noise level."""
    if objective == "v":
        return alpha * eps - sigma * x0
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    raise ValueError(f"unknown objective {objective!r}; choose eps, x0 or v")


def _native_x0_weight(snr: Tensor, objective: Objective) -> Tensor:
    """The x0-space weight an unweighted loss on `objective` implies."""
    return {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[objective]


def loss_weight(logsnr: Tensor, objective: Objective, weighting: str, gamma: float = 5.0) -> Tensor:
    """Weight on the objective's squared error so the implied x0 weight is the chosen one."""
    if weighting == "none":
        return torch.ones_like(logsnr)
    if weighting == "min_snr":
        snr = logsnr.exp()
        return snr.clamp(max=gamma) / _native_x0_weight(snr, objective)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose none or min_snr")
