"""bf16 autocast vs fp32 on this CPU: a conv stack and the real training step.

    python benchmarks/bench_precision.py [--params params.yaml] [--stage base] [--steps 10]

Whether bf16 pays depends on the CPU: oneDNN computes it natively with AVX512-BF16 / AMX
and emulates it on AVX2-only CPUs. `precision: auto` (device.py) picks bf16 only where
it is native; this prints what each choice costs here, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from imagen_ops.config import load_params
from imagen_ops.device import native_bf16
from imagen_ops.pipeline import train_settings
from imagen_ops.train.trainer import Trainer, TrainPaths

from common import machine, parse_args, path_options, table


def conv_ms(bf16: bool, rounds: int = 5) -> float:
    """Median ms of one conv + GroupNorm + SiLU forward (64 ch, 32 px, batch 32)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.GroupNorm(8, 64), torch.nn.SiLU()
    )
    x = torch.randn(32, 64, 32, 32)
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(x)
        for _ in range(rounds):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def train_images_per_s(args: argparse.Namespace, precision: str) -> float:
    params = load_params(args.params, [f"stages.{args.stage}.train.precision={precision}"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = TrainPaths(
            Path(args.prepared), Path(args.cache), Path(tmp) / "o", Path(tmp) / "c", Path(tmp) / "m"
        )
        trainer = Trainer(train_settings(params, args.stage), paths, progress=False)
        trainer._optimize(0, trainer._micro_batches(0))  # warm-up
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            trainer._optimize(step, trainer._micro_batches(step))
        seconds = time.perf_counter() - start
    return args.steps * params.stages[args.stage].train.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", default="base")
    path_options(parser, "prepared", "cache")
    parser.add_argument("--steps", type=int, default=10)
    args = parse_args(parser)
    print(f"machine: {machine()}; native bf16: {native_bf16(torch.device('cpu'))}\n")
    rows = []
    for precision in ("fp32", "bf16"):
        rows.append(
            [
                precision,
                round(conv_ms(precision == "bf16"), 1),
                round(train_images_per_s(args, precision), 1),
            ]
        )
    print(table(["precision", "conv stack ms", f"train {args.stage} images/s"], rows))


if __name__ == "__main__":
    main()
