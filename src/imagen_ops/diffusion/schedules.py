"""Noise schedules written as log-SNR functions of continuous time t in [0, 1].

Notation (variance-preserving diffusion, Kingma et al. 2021, "Variational Diffusion Models"):

    x_t = alpha_t * x_0 + sigma_t * eps,      alpha_t^2 + sigma_t^2 = 1
    logsnr(t) = log(alpha_t^2 / sigma_t^2),   strictly decreasing in t
    alpha_t^2 = sigmoid(logsnr),              sigma_t^2 = sigmoid(-logsnr)

Everything else (alpha, sigma, time grids, the samplers' step sizes) derives from the one
function t -> logsnr, so a schedule is three lines and cannot be inconsistent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from imagen_ops.choices import Choices

if TYPE_CHECKING:
    from imagen_ops.config import DiffusionConfig

__all__ = [
    "SCHEDULES",
    "SPACINGS",
    "Schedule",
    "alpha_sigma",
    "cosine_schedule",
    "linear_schedule",
    "make_schedule",
    "resolution_shift",
    "time_grid",
]

Schedule = Callable[[Tensor], Tensor]
"""t in [0, 1] -> log-SNR, elementwise."""


def alpha_sigma(logsnr: Tensor, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Signal and noise scales of a log-SNR (alpha^2 + sigma^2 = 1 by construction).

    With `like` (a batch of images), per-example scales are shaped (B, 1, ..., 1) to
    broadcast against it."""
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    if like is not None:
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha, sigma = alpha.view(shape), sigma.view(shape)
    return alpha, sigma


def cosine_schedule(
    logsnr_min: float = -15.0, logsnr_max: float = 15.0, shift: float = 0.0
) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal 2021) clipped to [logsnr_min, logsnr_max].

    alpha_t = cos(pi t / 2) gives logsnr = -2 log tan(pi t / 2); the clip maps t linearly
    onto the angles whose log-SNR lies in range. `shift` adds a constant: simple diffusion's
    resolution shift (Hoogeboom et al. 2023).
    """
    a_min = math.atan(math.exp(-0.5 * logsnr_max))
    a_max = math.atan(math.exp(-0.5 * logsnr_min))

    def logsnr(t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(a_min + t * (a_max - a_min))) + shift

    return logsnr


def linear_schedule(
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_steps: int = 1000,
    logsnr_min: float = -15.0,
    logsnr_max: float = 15.0,
) -> Schedule:
    """The DDPM linear-beta schedule (Ho et al. 2020) in continuous time.

    The discrete alpha_bar_n = prod_i (1 - beta_i) becomes -log alpha_t^2 =
    N * integral_0^t -log(1 - beta(u)) du with beta(u) linear from beta_start to beta_end;
    the integral has the closed form G(beta(t)) - G(beta_start), G(b) = ((1-b) log(1-b) + b)
    / (beta_end - beta_start). Then logsnr = -log(expm1(-log alpha_t^2)), clipped to range.
    The difference of G cancels nearly all digits at small t, so it is taken in float64
    (in float32 it gives NaN at t = 1e-6, and a log-SNR 0.3 off at 1e-5).
    """
    slope = beta_end - beta_start

    def primitive(b: Tensor) -> Tensor:
        return ((1 - b) * torch.log1p(-b) + b) / slope

    def logsnr(t: Tensor) -> Tensor:
        t64 = t.double()
        b_start = torch.as_tensor(beta_start, dtype=torch.float64, device=t.device)
        neg_log_abar = num_steps * (primitive(b_start + t64 * slope) - primitive(b_start))
        out = (-torch.log(torch.expm1(neg_log_abar))).clamp(logsnr_min, logsnr_max)
        return out.to(t.dtype)

    return logsnr


def resolution_shift(resolution: int, reference: int) -> float:
    """Shift of the cosine log-SNR for an image size: 2 log(reference / size).

    Larger images keep more signal at the same noise level (neighbouring pixels average the
    noise away), so they need proportionally more noise (simple diffusion, section 3.1).
    """
    return 2.0 * math.log(reference / resolution)


SCHEDULES: Choices[Callable[[DiffusionConfig, int], Schedule]] = Choices(
    "schedule",
    {
        "cosine": lambda cfg, size: cosine_schedule(cfg.logsnr_min, cfg.logsnr_max),
        "shifted_cosine": lambda cfg, size: cosine_schedule(
            cfg.logsnr_min, cfg.logsnr_max, resolution_shift(size, cfg.shift_reference)
        ),
        "linear": lambda cfg, size: linear_schedule(
            logsnr_min=cfg.logsnr_min, logsnr_max=cfg.logsnr_max
        ),
    },
)
"""Schedule name -> builder from a stage's diffusion settings and its resolution."""


def make_schedule(cfg: DiffusionConfig, resolution: int) -> Schedule:
    """The schedule a stage trains and samples with."""
    return SCHEDULES[cfg.schedule](cfg, resolution)


def _time_of_logsnr(schedule: Schedule, target: Tensor, iters: int = 64) -> Tensor:
    """Invert a (decreasing) schedule by bisection: works for any schedule, exact to 1e-15."""
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule(mid) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def _uniform_time(steps: int, schedule: Schedule) -> Tensor:
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def _uniform_logsnr(steps: int, schedule: Schedule) -> Tensor:
    ends = schedule(torch.tensor([1.0, 0.0], dtype=torch.float64))
    ts = _time_of_logsnr(schedule, torch.linspace(ends[0], ends[1], steps + 1, dtype=torch.float64))
    ts[0], ts[-1] = 1.0, 0.0
    return ts


SPACINGS: Choices[Callable[[int, Schedule], Tensor]] = Choices(
    "spacing", {"time": _uniform_time, "logsnr": _uniform_logsnr}
)
"""Time-grid spacing: "time" is uniform in t; "logsnr" uniform in log-SNR between the
endpoints (the DPM-Solver authors' choice for low-resolution pixel models)."""


def time_grid(steps: int, schedule: Schedule, spacing: str = "time") -> list[float]:
    """`steps + 1` descending times from 1 to 0 for a sampler taking `steps` steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return SPACINGS[spacing](steps, schedule).tolist()
