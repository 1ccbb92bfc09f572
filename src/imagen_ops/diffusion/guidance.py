"""Wrappers that turn one denoiser into another: guidance and thresholding.

A `Denoiser` maps (x_t, t) to a prediction of x0. Samplers only ever see a `Denoiser`, so
classifier-free guidance and thresholding compose outside them (k-diffusion's design):
thresholding x0 inside the wrapper is exactly "thresholding inside DPM-Solver++", whose
updates consume x0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from imagen_ops.choices import Choices

__all__ = [
    "THRESHOLDING",
    "CondDenoiser",
    "Conditioning",
    "Denoiser",
    "classifier_free_guidance",
    "dynamic_threshold",
    "thresholded",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""(x_t [B, C, H, W], t scalar tensor) -> x0 prediction [B, C, H, W]."""


@dataclass(frozen=True)
class Conditioning:
    """What a stage is conditioned on. An all-False text mask is the unconditional input."""

    text: Tensor  # (B, L, D) frozen encoder token embeddings
    mask: Tensor  # (B, L) bool, True for real tokens
    lowres: Tensor | None = None  # (B, 3, H, W) upsampled, noise-augmented low-res image
    aug_logsnr: Tensor | None = None  # (B,) log-SNR of the augmentation noise

    def without_text(self) -> Conditioning:
        return replace(self, mask=torch.zeros_like(self.mask))

    def repeat2(self, other: Conditioning) -> Conditioning:
        """Concatenate two conditionings along the batch (for one batched forward pass)."""

        def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b])

        return Conditioning(
            cat(self.text, other.text),
            cat(self.mask, other.mask),
            cat(self.lowres, other.lowres),
            cat(self.aug_logsnr, other.aug_logsnr),
        )


CondDenoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]
"""(x_t, t, conditioning) -> x0 prediction."""


def classifier_free_guidance(denoise: CondDenoiser, cond: Conditioning, weight: float) -> Denoiser:
    """x0 = x0_uncond + w (x0_cond - x0_uncond) (Ho & Salimans 2022); w = 1 is no guidance.

    Both predictions come from one forward pass over the doubled batch. Guidance in x0 is
    the same as in eps or v: the conversions are affine with the same coefficients.
    """
    if weight == 1.0:
        return lambda x, t: denoise(x, t, cond)
    both = cond.repeat2(cond.without_text())

    def guided(x: Tensor, t: Tensor) -> Tensor:
        x0_cond, x0_uncond = denoise(torch.cat([x, x]), t, both).chunk(2)
        return x0_uncond + weight * (x0_cond - x0_uncond)

    return guided


def dynamic_threshold(x0: Tensor, quantile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: s = max(quantile(|x0|, p), 1); clip to [-s, s]; / s.

    Large guidance weights push x0 predictions outside [-1, 1]; static clipping then
    saturates, dividing by s pulls saturated pixels inward instead (Saharia et al., 2.3).
    """
    s = torch.quantile(x0.flatten(1).abs().float(), quantile, dim=1).clamp(min=1.0)
    s = s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


THRESHOLDING: Choices[Callable[[Denoiser, float], Denoiser]] = Choices(
    "thresholding",
    {
        "none": lambda denoise, quantile: denoise,
        "static": lambda denoise, quantile: lambda x, t: denoise(x, t).clamp(-1.0, 1.0),
        "dynamic": lambda denoise, quantile: (
            lambda x, t: dynamic_threshold(denoise(x, t), quantile)
        ),
    },
)
"""Thresholding name -> (denoiser, quantile) -> the denoiser with its x0 thresholded."""


def thresholded(denoise: Denoiser, mode: str, quantile: float = 0.995) -> Denoiser:
    """Apply none, static ([-1, 1] clipping) or dynamic thresholding to every x0 prediction."""
    return THRESHOLDING[mode](denoise, quantile)
