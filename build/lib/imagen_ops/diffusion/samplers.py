"""Samplers: short functions over a denoiser, independent of the network.

Every sampler has the form `sample_x(denoise, x, ts, schedule, ...)`: `denoise(x, t)`
predicts x0 (guidance and thresholding are already folded in, see guidance.py), `x` is
the starting noise at ts[0] = 1 and `ts` the descending time grid ending at 0. Each step
calls `callback(i, t, x, x0)` with the same keys, so progress bars, previews and logging
attach without touching solver code. Step coefficients are computed in float64.

Notation: alpha, sigma and logsnr as in schedules.py; lambda = logsnr / 2 = log(alpha/sigma)
is the half log-SNR of the DPM-Solver papers (Lu et al. 2022). The last step, to t = 0,
returns the final x0 prediction (the clean end of the trajectory).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from imagen_ops.choices import Choices
from imagen_ops.diffusion.guidance import Denoiser
from imagen_ops.diffusion.schedules import Schedule, alpha_sigma

__all__ = [
    "SAMPLERS",
    "NoiseSource",
    "evaluated_times",
    "sample",
    "sample_ancestral",
    "sample_ddim",
    "sample_dpmpp_2m",
]

Callback = Callable[[int, float, Tensor, Tensor], None]


class NoiseSource:
    """Standard normal noise from one generator per image, so image k does not depend on
    the batch it is sampled in (EDM's per-seed generators)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def __call__(self, shape: Sequence[int]) -> Tensor:
        """A (len(seeds), *shape) tensor: one draw per generator."""
        draws = [torch.randn(tuple(shape), generator=g) for g in self.generators]
        return torch.stack(draws).to(self.device)


def _coeffs(schedule: Schedule, t: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) at time t, in float64."""
    logsnr = schedule(torch.tensor(t, dtype=torch.float64))
    alpha, sigma = alpha_sigma(logsnr)
    return float(alpha), float(sigma), float(logsnr) / 2


def _t(x: Tensor, t: float) -> Tensor:
    return torch.tensor(t, dtype=torch.float32, device=x.device)


def evaluated_times(ts: Sequence[float]) -> list[float]:
    """The times every sampler here calls `denoise` at on the grid `ts`, as the float32 the
    denoiser sees (`_t`): all but the final 0, whose step returns the x0 before it."""
    return torch.tensor(ts[:-1], dtype=torch.float32).tolist()


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    ts: Sequence[float],
    schedule: Schedule,
    *,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) with stochasticity eta; eta = 1 is ancestral DDPM sampling.

    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z,  eps_hat = (x_t - alpha_t x0) / sigma_t,
    c = eta (sigma_s / sigma_t) sqrt(1 - alpha_t^2 / alpha_s^2). At eta = 1, c^2 is the
    variance of the posterior q(x_s | x_t, x0) and the mean is its mean: ancestral sampling.
    """
    if eta > 0 and noise is None:
        raise ValueError("sample_ddim with eta > 0 needs a NoiseSource")
    for i, (t, s) in enumerate(itertools.pairwise(ts)):
        x0 = denoise(x, _t(x, t))
        if callback is not None:
            callback(i, t, x, x0)
        if s == 0:
            return x0
        a_t, sig_t, _ = _coeffs(schedule, t)
        a_s, sig_s, _ = _coeffs(schedule, s)
        eps = (x - a_t * x0) / sig_t
        c = eta * (sig_s / sig_t) * math.sqrt(max(0.0, 1 - (a_t / a_s) ** 2))
        x = a_s * x0 + math.sqrt(max(0.0, sig_s**2 - c**2)) * eps
        if c > 0:
            x = x + c * noise(x.shape[1:])
    return x


def sample_ancestral(
    denoise: Denoiser,
    x: Tensor,
    ts: Sequence[float],
    schedule: Schedule,
    *,
    noise: NoiseSource,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020): x_s ~ q(x_s | x_t, x0_hat), the posterior."""
    return sample_ddim(denoise, x, ts, schedule, eta=1.0, noise=noise, callback=callback)


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    ts: Sequence[float],
    schedule: Schedule,
    *,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, data prediction.

    With h = lambda_s - lambda_t, the first-order step is exact for a constant x0:
        x_s = (sigma_s / sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-(1 + eta) h}) D
              + sigma_s sqrt(1 - e^{-2 eta h}) z,
    and the second order replaces D = x0_t by the linear extrapolation
        D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h.
    eta = 0 is the ODE solver; eta = 1 is its SDE form ("2M SDE"), whose first-order step
    is exactly the ancestral posterior step, so it keeps ancestral sampling's error
    correction with a second-order drift.
    """
    if eta > 0 and noise is None:
        raise ValueError("sample_dpmpp_2m with eta > 0 needs a NoiseSource")
    x0_prev, h_prev = None, None
    for i, (t, s) in enumerate(itertools.pairwise(ts)):
        x0 = denoise(x, _t(x, t))
        if callback is not None:
            callback(i, t, x, x0)
        if s == 0:
            return x0
        _, sig_t, lam_t = _coeffs(schedule, t)
        a_s, sig_s, lam_s = _coeffs(schedule, s)
        h = lam_s - lam_t
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sig_s / sig_t) * math.exp(-eta * h) * x - (a_s * math.expm1(-(1 + eta) * h)) * d
        if eta > 0:
            x = x + sig_s * math.sqrt(-math.expm1(-2 * eta * h)) * noise(x.shape[1:])
        x0_prev, h_prev = x0, h
    return x


SAMPLERS: Choices[tuple[Callable[..., Tensor], float | None]] = Choices(
    "sampler",
    {
        "ancestral": (sample_ddim, 1.0),
        "ddim": (sample_ddim, None),
        "dpmpp_2m": (sample_dpmpp_2m, 0.0),
        "dpmpp_2m_sde": (sample_dpmpp_2m, 1.0),
    },
)
"""Sampler name -> (solver, eta): a number fixes the solver's stochasticity, None takes the
caller's `eta` (DDIM's). Ancestral sampling is DDIM at eta = 1; "2M SDE" is 2M at eta = 1."""


def sample(
    name: str,
    denoise: Denoiser,
    x: Tensor,
    ts: Sequence[float],
    schedule: Schedule,
    *,
    noise: NoiseSource,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """Run the sampler called `name` (a key of SAMPLERS)."""
    solver, fixed_eta = SAMPLERS[name]
    eta = eta if fixed_eta is None else fixed_eta
    return solver(denoise, x, ts, schedule, eta=eta, noise=noise, callback=callback)
