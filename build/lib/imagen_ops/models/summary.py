"""Parameter counts and FLOPs of each stage's U-Net (`imagen-ops model summary`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from imagen_ops.config import StageConfig
from imagen_ops.models.unet import UNet

__all__ = ["count_flops", "summarize"]


def count_flops(
    net: UNet, resolution: int, text_dim: int, text_length: int, train_step: bool = False
) -> int:
    """FLOPs of one forward pass (or forward + backward) for one image, counted by torch."""
    x = torch.randn(1, 3, resolution, resolution)
    kwargs = {}
    if net.super_resolution:
        kwargs = {"lowres": torch.randn_like(x), "aug_logsnr": torch.zeros(1)}
    if net.cfg.layout_condition == "mode":
        kwargs["layout_key"] = torch.zeros_like(x)
    text = torch.randn(1, text_length, text_dim)
    mask = torch.ones(1, text_length, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x, torch.zeros(1), text, mask, **kwargs)
        if train_step:
            out.square().mean().backward()
    return counter.get_total_flops()


def summarize(
    stages: Mapping[str, StageConfig], text_dim: int = 384, text_length: int = 16
) -> list[dict[str, Any]]:
    """One row per stage of a cascade (in order; all but the first are super-resolution):
    resolution, parameters, GFLOPs per image forward and train step."""
    rows = []
    for i, (name, stage) in enumerate(stages.items()):
        net = UNet(
            stage.unet,
            text_dim=text_dim,
            super_resolution=i > 0,
            objective=stage.diffusion.objective,
        )
        size = stage.train.crop or stage.resolution
        rows.append(
            {
                "stage": name,
                "resolution": stage.resolution,
                "params": sum(p.numel() for p in net.parameters()),
                "gflops_forward": count_flops(net, stage.resolution, text_dim, text_length) / 1e9,
                "gflops_train_step": count_flops(net, size, text_dim, text_length, True) / 1e9,
            }
        )
    return rows
