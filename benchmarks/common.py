"""Shared helpers of the benchmark scripts: machine description and robust timing."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from imagen_ops.config import load_params
from imagen_ops.device import cpu_name


def machine() -> str:
    """One line naming the machine, for BENCHMARKS.md."""
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {gpu}, {time.strftime('%Y-%m-%d')}"
    )


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn()` after warm-up calls (the machine is shared and noisy)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""

    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


PATH_OPTIONS = {
    "prepared": "prepared",
    "cache": "text_cache",
    "models": "models",
    "scorer": "scorer",
}
"""A benchmark's path option -> the params.yaml `paths` key that owns its default."""


def path_options(parser: argparse.ArgumentParser, *flags: str) -> None:
    """Add `--<flag>` for each of `flags` (PATH_OPTIONS), defaulting to params.yaml's paths."""
    for flag in flags:
        parser.add_argument(f"--{flag}", type=Path, help=f"default: paths.{PATH_OPTIONS[flag]}")


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`parser.parse_args()`, each path option left out taken from `--params`' paths
    section (with `-S` overrides), as the imagen-ops commands do: PathsConfig owns every
    pipeline path."""
    args = parser.parse_args()
    paths = load_params(args.params, getattr(args, "set", None) or []).paths
    for flag, key in PATH_OPTIONS.items():
        if getattr(args, flag, "") is None:
            setattr(args, flag, Path(getattr(paths, key)))
    return args
