"""Channels-last against NCHW training on the CPU: the GroupNorm kernels, then the real loop.

    python benchmarks/bench_channels_last.py [--stage base] [--steps 25] [--rounds 4]
                                             [-S KEY=VALUE]

Needs `dvc repro encode_text` (artifacts/prepared, artifacts/text_cache).

1. GroupNorm forward + backward at the base stage's activation shapes (batch 32), in
   float32 and bfloat16: torch's kernel on NCHW input, on channels-last input, and
   `models.unet.GroupNorm`, which normalizes channels-last bfloat16 CPU input in NCHW.
2. The trainer's own loop (batches built inline, bf16 where the host has it, AdamW, EMA,
   clipping) with `train.channels_last` false and true, alternating within each round:
   median images/s of each and their ratio. The two loops train the same initial weights
   on the same batches; their weights part only by rounding.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from imagen_ops.config import load_params
from imagen_ops.data.dataset import prefetch
from imagen_ops.models.unet import GroupNorm
from imagen_ops.pipeline import train_settings
from imagen_ops.train.trainer import Trainer, TrainPaths

from bench_trainer import Source, median_rates, rate_table, rounds
from common import machine, median_seconds, parse_args, path_options, table

SHAPES = [(64, 32), (128, 16), (256, 8)]  # (channels, side) of the base's levels


def norm_ms(norm: nn.Module, x: Tensor) -> float:
    x = x.detach().requires_grad_()
    grad = torch.randn_like(x)
    return 1000 * median_seconds(lambda: norm(x).backward(grad), repeats=20, warmup=3)


def norm_rows() -> list[list[object]]:
    rows = []
    for channels, side in SHAPES:
        fast, plain = GroupNorm(32, channels), nn.GroupNorm(32, channels)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(32, channels, side, side).to(dtype)
            nhwc = x.contiguous(memory_format=torch.channels_last)
            rows.append(
                [
                    f"32 x {channels} x {side} x {side}",
                    str(dtype).removeprefix("torch."),
                    round(norm_ms(plain, x), 2),
                    round(norm_ms(plain, nhwc), 2),
                    round(norm_ms(fast, nhwc), 2),
                ]
            )
    return rows


def loop(trainer: Trainer) -> Source:
    def run(steps: range):
        for step, micro in prefetch(trainer._micro_batches, steps, workers=0):
            yield step, trainer._optimize(step, micro)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", default="base")
    path_options(parser, "prepared", "cache")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parse_args(parser)
    print(f"machine: {machine()}\n")
    print("### GroupNorm forward + backward (ms, median of 20)")
    heads = ["activations", "dtype", "NCHW", "channels-last", "channels-last, unet.GroupNorm"]
    print(table(heads, norm_rows()) + "\n")

    key = f"stages.{args.stage}.train.channels_last"
    with tempfile.TemporaryDirectory() as tmp:
        sources: dict[str, Source] = {}
        for value in ("false", "true"):
            params = load_params(args.params, [*args.set, f"{key}={value}"])
            out = Path(tmp) / value
            paths = TrainPaths(
                Path(args.prepared), Path(args.cache), out / "m", out / "ck", out / "m.csv"
            )
            trainer = Trainer(train_settings(params, args.stage), paths, progress=False)
            sources[f"channels_last {value}"] = loop(trainer)
        batch = params.stages[args.stage].train.batch_size
        rates = median_rates(sources, _ignore, args)
    print(f"### Training loop, stage {args.stage}, batch {batch}, {rounds(args)}")
    print(rate_table("train.channels_last", rates, batch, "channels_last false"))


def _ignore(step: int, result: object) -> None:
    """The loop's own optimizer step is the work; nothing else consumes it."""


if __name__ == "__main__":
    main()
