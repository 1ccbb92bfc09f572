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
import torch.nn.functional as F
from torch import Tensor

from imagen_ops.choices import Choices

__all__ = [
    "THRESHOLDING",
    "CondDenoiser",
    "Conditioning",
    "Denoiser",
    "classifier_free_guidance",
    "dynamic_threshold",
    "guides",
    "keep_known",
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
    layout_key: Tensor | None = None  # (B, 3, h, w): its nearest layout mode (UNet, mode)

    def without_text(self) -> Conditioning:
        return replace(self, mask=torch.zeros_like(self.mask))

    def with_text(self, text: Tensor, mask: Tensor) -> Conditioning:
        return replace(self, text=text, mask=mask)

    def repeat2(self, other: Conditioning) -> Conditioning:
        """Concatenate two conditionings along the batch (for one batched forward pass);
        the shorter text is padded with masked-out zero tokens."""

        def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b])

        length = max(self.text.shape[1], other.text.shape[1])

        def pad(c: Conditioning) -> tuple[Tensor, Tensor]:
            extra = length - c.text.shape[1]
            return F.pad(c.text, (0, 0, 0, extra)), F.pad(c.mask, (0, extra), value=False)

        (text_a, mask_a), (text_b, mask_b) = pad(self), pad(other)
        return Conditioning(
            torch.cat([text_a, text_b]),
            torch.cat([mask_a, mask_b]),
            cat(self.lowres, other.lowres),
            cat(self.aug_logsnr, other.aug_logsnr),
            cat(self.layout_key, other.layout_key),
        )


CondDenoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]
"""(x_t, t, conditioning) -> x0 prediction."""


def classifier_free_guidance(
    denoise: CondDenoiser,
    cond: Conditioning,
    weight: float,
    uncond: Conditioning | None = None,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Denoiser:
    """x0 = x0_uncond + w (x0_cond - x0_uncond) (Ho & Salimans 2022); w = 1 is no guidance.

    `uncond` defaults to the text-free input the stage was trained with (dropped text); a
    negative prompt's conditioning there steers away from it. Both predictions come from
    one forward pass over the doubled batch. Guidance in x0 is the same as in eps or v:
    the conversions are affine with the same coefficients.

    Guidance applies at diffusion times lo <= t <= hi of `interval` (t = 1 is pure noise)
    and elsewhere the conditional prediction alone stands, in one pass over the batch:
    guidance at high noise places and binds the objects, at low noise it only moves the
    image away from the data (Kynkäänniemi et al. 2024; BENCHMARKS: the guidance interval).
    """
    if weight == 1.0:
        return lambda x, t: denoise(x, t, cond)
    both = cond.repeat2(cond.without_text() if uncond is None else uncond)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if not guides(weight, interval, float(t)):
            return denoise(x, t, cond)
        x0_cond, x0_uncond = denoise(torch.cat([x, x]), t, both).chunk(2)
        return x0_uncond + weight * (x0_cond - x0_uncond)

    return guided


def guides(weight: float, interval: tuple[float, float], t: float) -> bool:
    """Whether `classifier_free_guidance` runs the unconditional pass too at time t (two
    network passes over the batch instead of one): what a step costs (Cascade.work)."""
    lo, hi = interval
    # the denoiser's t is float32: 0.6 arrives as 0.6000000238, so widen by float32's step
    tol = 2 * float(torch.finfo(torch.float32).eps)
    return weight != 1.0 and lo - tol <= t <= hi + tol


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


def keep_known(denoise: Denoiser, known: Tensor, generate: Tensor) -> Denoiser:
    """Inpainting: every x0 prediction takes the known pixels where `generate` is False.

    The sampler's next state is built from x0, so the known region of x_t follows a
    trajectory of the known image (the replacement method of Song et al. 2021, applied to
    x0 as RePaint applies it to x_t) while the network fills in the rest around it; the
    last step returns x0, which holds the known pixels exactly."""
    return lambda x, t: torch.where(generate, denoise(x, t), known)
