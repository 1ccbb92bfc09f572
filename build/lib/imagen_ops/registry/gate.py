"""The paired promotion gate: champion and challenger sampled on the golden prompt set.

Both cascades run in this process with the same sampling settings and the same per-prompt
seeds, so a prompt's two images differ only by the weights; the exact oracle judges each,
and `promotion.paired_decide` turns the paired verdicts into a decision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagen_ops.cascade import Cascade
from imagen_ops.config import SampleConfig
from imagen_ops.eval.evaluate import sample_images
from imagen_ops.eval.golden import golden_verdicts

__all__ = ["golden_correct"]

log = logging.getLogger(__name__)


def golden_correct(
    cascade: Cascade, rows: Sequence[dict[str, Any]], settings: SampleConfig, label: str
) -> np.ndarray:
    """Per-prompt correctness of `cascade` on the golden rows (their prompts and seeds)."""

    def sample(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return sample_images(cascade, cascade.encode(prompts), settings, seeds, progress=False)[0]

    verdicts = golden_verdicts(sample, rows)
    log.info("golden set, %s: %d of %d correct", label, int(verdicts.sum()), len(verdicts))
    return verdicts
