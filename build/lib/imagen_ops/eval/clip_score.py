"""CLIP score (Hessel et al. 2021) with torchmetrics, for any local or hub CLIP model.

torchmetrics 1.9's `CLIPScore` accepts only hub names containing "openai" unless given a
callable returning (model, processor), and with transformers 5 it crashes on the output
objects `get_image_features` now returns (torchmetrics issue 3407). `load_clip` solves both:
it loads any CLIPModel directory or hub name and wraps it so both feature methods return
tensors. No CLIP weights ship offline; without a configured model there is no score.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CLIPFeatures", "clip_score", "load_clip"]

log = logging.getLogger(__name__)


class CLIPFeatures(nn.Module):
    """A CLIPModel whose `get_image_features` / `get_text_features` return tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out: object) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@functools.lru_cache(maxsize=2)
def load_clip(name_or_path: str, device: str | torch.device = "cpu"):
    """(wrapped model, processor) from a hub name or a local CLIPModel directory."""
    from transformers import CLIPModel, CLIPProcessor

    from imagen_ops.text.encoders import resolve_encoder_dir

    path = resolve_encoder_dir(name_or_path)
    model = CLIPModel.from_pretrained(path).eval().to(device)
    return CLIPFeatures(model), CLIPProcessor.from_pretrained(path)


def clip_score(
    images: np.ndarray,
    captions: Sequence[str],
    name_or_path: str,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> float:
    """Mean CLIP score (0-100) of uint8 images (N, H, W, 3) against their captions."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_clip(name_or_path, device)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        metric.update(chunk.to(device), list(captions[start : start + batch_size]))
    return float(metric.compute())
