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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from imagen_ops.choices import Choices

__all__ = ["LOSS_WEIGHTINGS", "OBJECTIVES", "Objective", "loss_weight", "target", "to_eps", "to_x0"]


@dataclass(frozen=True)
class Objective:
    """What a network predicts: how its output maps to x0, what it is trained towards, and
    the weight on the x0 error that an unweighted loss on it implies."""

    to_x0: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (out, x_t, alpha, sigma)
    target: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x0, eps, alpha, sigma)
    x0_weight: Callable[[Tensor], Tensor]  # snr -> weight


OBJECTIVES: Choices[Objective] = Choices(
    "objective",
    {
        "v": Objective(
            to_x0=lambda out, x_t, alpha, sigma: alpha * x_t - sigma * out,
            target=lambda x0, eps, alpha, sigma: alpha * eps - sigma * x0,
            x0_weight=lambda snr: snr + 1,
        ),
        "eps": Objective(
            to_x0=lambda out, x_t, alpha, sigma: (x_t - sigma * out) / alpha,
            target=lambda x0, eps, alpha, sigma: eps,
            x0_weight=lambda snr: snr,
        ),
        "x0": Objective(
            to_x0=lambda out, x_t, alpha, sigma: out,
            target=lambda x0, eps, alpha, sigma: x0,
            x0_weight=torch.ones_like,
        ),
    },
)


def to_x0(out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, objective: str) -> Tensor:
    """Network output -> prediction of the clean image."""
    return OBJECTIVES[objective].to_x0(out, x_t, alpha, sigma)


def to_eps(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise implied by an x0 prediction."""
    return (x_t - alpha * x0) / sigma


def target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, objective: str) -> Tensor:
    """What the network should output for (x0, eps) at this noise level."""
    return OBJECTIVES[objective].target(x0, eps, alpha, sigma)


LOSS_WEIGHTINGS: Choices[Callable[[Tensor, float, Objective], Tensor]] = Choices(
    "loss weighting",
    {
        "none": lambda snr, gamma, objective: torch.ones_like(snr),
        "min_snr": lambda snr, gamma, objective: snr.clamp(max=gamma) / objective.x0_weight(snr),
        "truncated_min_snr": lambda snr, gamma, objective: (
            snr.clamp(min=1.0, max=gamma) / objective.x0_weight(snr)
        ),
    },
)
"""Loss weighting name -> (snr, gamma, objective) -> weight on the objective's squared error:
"none" leaves the objective's own weighting, "min_snr" makes the x0 weight min(snr, gamma),
"truncated_min_snr" clamps it to [1, gamma]: min-SNR's cap with the floor of Salimans & Ho
(2022)'s truncated SNR weighting, max(snr, 1), so the high noise levels where the layout
is decided keep an x0 weight of 1 instead of ~snr (0.02 at log-SNR -4)."""


def loss_weight(logsnr: Tensor, objective: str, weighting: str, gamma: float = 5.0) -> Tensor:
    """Weight on the objective's squared error so the implied x0 weight is the chosen one."""
    return LOSS_WEIGHTINGS[weighting](logsnr.exp(), gamma, OBJECTIVES[objective])
