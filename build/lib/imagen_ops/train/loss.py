"""The training objective of a stage: diffuse the batch, predict, weigh the error.

All randomness of a training example (noise level, noise, text dropout, augmentation level
and noise) is drawn from that example's own generator, seeded by (seed, step, position in
the global batch). A step's loss is therefore the same whether the global batch runs in
one process, in several ranks, or after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from imagen_ops.cascade import Stage, augment_lowres
from imagen_ops.data.dataset import Batch
from imagen_ops.diffusion.objectives import loss_weight, target
from imagen_ops.diffusion.schedules import alpha_sigma
from imagen_ops.models.unet import layout_loss

__all__ = ["TrainingNoise", "diffusion_loss", "draw_noise"]


@dataclass(frozen=True)
class TrainingNoise:
    t: Tensor  # (B,) diffusion time
    eps: Tensor  # (B, 3, H, W)
    keep_text: Tensor  # (B,) bool; False drops the caption (classifier-free guidance)
    t_aug: Tensor | None = None  # (B,) SR stages: augmentation level of the low-res image
    aug_eps: Tensor | None = None  # (B, 3, H, W) SR stages: augmentation noise

    def to(self, device: torch.device) -> TrainingNoise:
        def move(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.to(device, non_blocking=True)

        return TrainingNoise(
            move(self.t), move(self.eps), move(self.keep_text), move(self.t_aug), move(self.aug_eps)
        )


def draw_noise(
    stage: Stage,
    gens: Sequence[torch.Generator],
    positions: Tensor,
    global_batch: int,
    offset: float,
    shape: Sequence[int],
) -> TrainingNoise:
    """Per-example randomness. Times are stratified over the global batch,
    t_i = frac(offset + i / B) (the low-discrepancy sampler of Kingma et al. 2021), which
    lowers the variance of the loss at no cost."""
    cfg = stage.config.diffusion
    t = torch.frac(offset + positions.double() / global_batch).float()
    eps, keep, t_aug, aug_eps = [], [], [], []
    for g in gens:
        eps.append(torch.randn(tuple(shape), generator=g))
        keep.append(torch.rand((), generator=g) >= cfg.cond_drop_prob)
        if stage.lowres is not None:
            t_aug.append(torch.rand((), generator=g) * cfg.noise_aug_max)
            aug_eps.append(torch.randn(tuple(shape), generator=g))
    sr = stage.lowres is not None
    return TrainingNoise(
        t,
        torch.stack(eps),
        torch.stack(keep),
        torch.stack(t_aug) if sr else None,
        torch.stack(aug_eps) if sr else None,
    )


def diffusion_loss(stage: Stage, net: nn.Module, batch: Batch, noise: TrainingNoise) -> Tensor:
    """Weighted squared error of the stage's objective, averaged over the batch."""
    cfg = stage.config.diffusion
    schedule = stage.schedule
    x0 = batch.images
    logsnr = schedule(noise.t)
    alpha, sigma = alpha_sigma(logsnr, like=x0)
    x_t = alpha * x0 + sigma * noise.eps
    mask = batch.text.mask & noise.keep_text[:, None]
    lowres = aug_logsnr = None
    if stage.lowres is not None:
        lowres, aug_logsnr = augment_lowres(
            batch.lowres, x0.shape[-1], noise.t_aug, schedule, noise.aug_eps
        )
    grid = stage.config.unet.layout_grid
    key = x0 if stage.config.unet.layout_condition == "mode" else None
    out = net(
        x_t,
        logsnr,
        batch.text.tokens,
        mask,
        lowres,
        aug_logsnr,
        layout_key=key,
        return_layout=bool(grid),
    )
    layout_error = 0.0
    if grid:
        out, layout = out
        layout_error = layout_loss(layout, x0)
    err = (out.float() - target(x0, noise.eps, alpha, sigma, cfg.objective)).pow(2).mean((1, 2, 3))
    weight = loss_weight(logsnr, cfg.objective, cfg.loss_weighting, cfg.min_snr_gamma)
    return (weight * err).mean() + layout_error
