"""Exponential moving average of the weights, with a warm-up for short runs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """EMA weights w_ema <- d w_ema + (1 - d) w, d = min(decay, (1 + k) / (10 + k)).

    The warm-up (TensorFlow's `num_updates` rule) keeps the average from dragging the
    random initialisation through the first thousand steps of a short run.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """One multi-tensor lerp over the floating-point tensors (one kernel launch per
        group on a GPU, where a loop launches one per tensor; the same sums per tensor)."""
        d = self.decay_at(step)
        emas, weights = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                emas.append(self.params[k])
                weights.append(v.detach().float())
            else:
                self.params[k].copy_(v)
        torch._foreach_lerp_(emas, weights, 1 - d)

    def state_dict(self) -> dict[str, Tensor]:
        return self.params

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.params) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        self.params = {
            k: v.detach().clone().float().to(self.params[k].device) for k, v in state.items()
        }
