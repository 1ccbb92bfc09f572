"""Resumable checkpoints, kept per fingerprint, with checksums and fallback.

    <root>/<fingerprint>/step_00000500/   model.safetensors  ema.safetensors  config.json
                                          state.pt  checksums.json

`<root>` is one stage's checkpoint folder; `<fingerprint>` (16 hex digits) names everything
a run depends on (data, settings, text encoder, warm start), so checkpoints of another
run, however many steps they have, are never resumed or pruned by this one. A checkpoint
folder appears by one rename, so a run killed at any moment leaves only complete
checkpoints; `checksums.json` (sha256 of every other file) catches one damaged later. The
newest valid checkpoint of the fingerprint is resumed; a damaged one is reported in one
line and the one before it is used. The last `keep_last` checkpoints of the fingerprint
are kept, and the folders of the `keep_runs` most recently used fingerprints.

`state.pt` holds the optimizer state, the step, the skipped-step counter, the metrics
history and the losses of the logging window it falls in; all other randomness is a
function of (seed, step), so the step is the whole position of the run. A process killed
while writing leaves a hidden `.step_*` folder, which the next run's writer removes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from imagen_ops.cascade import Stage
from imagen_ops.files import atomic_dir, sha256_file

__all__ = [
    "Checkpoint",
    "DamagedCheckpointError",
    "latest_valid",
    "load_checkpoint",
    "prune_runs",
    "remove_partial",
    "save_checkpoint",
    "touch",
]

log = logging.getLogger(__name__)
PREFIX = "step_"
CHECKSUMS = "checksums.json"


class DamagedCheckpointError(RuntimeError):
    """A checkpoint folder whose files are missing, altered or unreadable."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    weights: dict[str, dict[str, torch.Tensor]]  # file stem -> state dict
    state: dict[str, Any]


def _steps(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    stage: Stage,
    weights: dict[str, dict],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `<run_dir>/step_<step>` atomically, then drop all but its newest `keep_last`."""
    run_dir = Path(run_dir)
    path = run_dir / f"{PREFIX}{step:08d}"
    with atomic_dir(path) as tmp:
        stage.write(tmp, weights, {"step": step})
        torch.save(state, tmp / "state.pt")
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2, sort_keys=True))
    # only checkpoints up to this one count: a newer one is damaged (the run resumed
    # before it) and would otherwise push each new checkpoint out as soon as it is written
    for old in [p for p in _steps(run_dir) if p.name <= path.name][:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete what a process killed inside `save_checkpoint` left: `atomic_dir`'s hidden
    `.step_*.tmp` and `.step_*.old` folders, each a checkpoint's size, which nothing
    else reads or prunes. Only the run's one writer (rank 0) calls it, before it writes."""
    run_dir = Path(run_dir)
    partial = [*run_dir.glob(f".{PREFIX}*.tmp"), *run_dir.glob(f".{PREFIX}*.old")]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed a partly written checkpoint: %s", path)
    return partial


def load_checkpoint(path: str | Path) -> Checkpoint:
    """One checkpoint folder, verified against its checksums; DamagedCheckpointError if not."""
    path = Path(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        raise DamagedCheckpointError(f"{path}: no {CHECKSUMS}")
    try:
        sums = json.loads(sums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedCheckpointError(f"{path}: {CHECKSUMS} unreadable ({err})") from None
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(f"{path}: {name} is missing")
        if sha256_file(file) != expected:
            raise DamagedCheckpointError(f"{path}: {name} does not match its checksum")
    try:
        weights = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise DamagedCheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    bad = [f"{f}:{k}" for f, sd in weights.items() for k, v in sd.items() if not v.isfinite().all()]
    if bad:
        raise DamagedCheckpointError(f"{path}: non-finite values in {', '.join(bad[:3])}")
    return Checkpoint(path, weights, state)


def latest_valid(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint of a run that verifies; each damaged newer one is reported in
    one line and skipped (it is left in place for inspection)."""
    for path in reversed(_steps(Path(run_dir))):
        try:
            return load_checkpoint(path)
        except DamagedCheckpointError as err:
            log.warning("damaged checkpoint, falling back to the previous one: %s", err)
    return None


def prune_runs(root: str | Path, current: str, keep_runs: int) -> list[Path]:
    """Delete the folders of all but the `keep_runs` most recently used fingerprints
    (`current` always stays); returns what was deleted."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    runs.sort(key=lambda p: (p.name == current, p.stat().st_mtime), reverse=True)
    doomed = runs[keep_runs:]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed checkpoints of an earlier run: %s", path)
    return doomed


def touch(path: Path) -> None:
    """Mark a fingerprint folder as used now (the pruning order)."""
    path.mkdir(parents=True, exist_ok=True)
    os.utime(path)
