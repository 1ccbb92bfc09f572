"""Resumable checkpoints: weights, EMA, config and the training state, written atomically.

    <root>/step_00000500/   model.safetensors  ema.safetensors  config.json  state.pt

A checkpoint folder appears by one rename, so a run killed at any moment leaves only
complete checkpoints; the last `keep_last` are kept. `state.pt` holds the optimizer state,
the step, the skipped-step counter, the metrics history and a fingerprint of everything
the run depends on, so a checkpoint of another configuration is never resumed. All other
randomness is a function of (seed, step), so the step is the whole position of the run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from imagen_ops.cascade import Stage
from imagen_ops.files import atomic_dir

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)
PREFIX = "step_"


def _steps(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save_checkpoint(
    root: str | Path,
    step: int,
    stage: Stage,
    weights: dict[str, dict],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `<root>/step_<step>` atomically, then drop all but the newest `keep_last`."""
    root = Path(root)
    path = root / f"{PREFIX}{step:08d}"
    with atomic_dir(path) as tmp:
        stage.write(tmp, weights, {"step": step})
        torch.save(state, tmp / "state.pt")
    for old in _steps(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(root: str | Path) -> Path | None:
    steps = _steps(Path(root))
    return steps[-1] if steps else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """(weights by file name, training state) of one checkpoint folder."""
    path = Path(path)
    weights = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return weights, state
