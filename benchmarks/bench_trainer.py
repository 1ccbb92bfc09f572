"""The real training loop on prepared data, and its batch builder alone.

    python benchmarks/bench_trainer.py [--stage base] [--steps 30] [--rounds 3]
                                       [--workers 1 2] [--builder-only] [-S KEY=VALUE]

Needs `dvc repro encode_text` (artifacts/prepared, artifacts/text_cache).

1. The loop: the trainer's own batch builder and optimizer step (bf16, AdamW, EMA,
   clipping) for `steps` steps per round, alternating batches built inline and on a
   background thread; median images/s of each. On CUDA the trainer builds on background
   threads; on the CPU inline, because the threads' tensor ops compete with the step's
   OpenMP threads.
2. The builder alone: images/s that `prefetch` delivers with each number of `--workers`
   threads and nothing consuming but the loop (the most a GPU step can be fed), beside
   the builder inline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from imagen_ops.config import load_params
from imagen_ops.data.dataset import prefetch
from imagen_ops.pipeline import train_settings
from imagen_ops.train.trainer import Trainer, TrainPaths

from common import machine, parse_args, path_options, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", default="base")
    path_options(parser, "prepared", "cache")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--builder-only", action="store_true", help="skip the training loop")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parse_args(parser)
    params = load_params(args.params, args.set)
    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        paths = TrainPaths(
            Path(args.prepared),
            Path(args.cache),
            Path(tmp) / "out",
            Path(tmp) / "ck",
            Path(tmp) / "m.csv",
        )
        trainer = Trainer(train_settings(params, args.stage), paths, progress=False)
        batch = params.stages[args.stage].train.batch_size
        build = trainer._micro_batches
        sources: dict[str, Source] = {
            "inline" if w == 0 else f"{w} thread(s)": partial(prefetch, build, workers=w)
            for w in dict.fromkeys((0, *args.workers))
        }
        if not args.builder_only:
            loop = {"inline": sources["inline"], "background thread": partial(prefetch, build)}
            rates = median_rates(loop, trainer._optimize, args)
            print(f"### Training loop, stage {args.stage}, batch {batch}, {rounds(args)}")
            print(rate_table("batches built", rates, batch, "background thread") + "\n")
        rates = median_rates(sources, lambda s, micro: None, args)
        print(f"### Batch builder alone, stage {args.stage}, batch {batch}, {rounds(args)}")
        print(rate_table("built", rates, batch, "inline"))


Source = Callable[[range], Iterable[tuple[int, Any]]]


def rounds(args: argparse.Namespace) -> str:
    return f"{args.rounds} x {args.steps} steps"


def median_rates(
    sources: dict[str, Source], consume: Callable[[int, Any], object], args: argparse.Namespace
) -> dict[str, float]:
    """Median steps/s of each source of batches, the sources alternated within each round
    (the machine is shared and noisy), each on steps of its own."""
    speeds: dict[str, list[float]] = {mode: [] for mode in sources}
    step = 0
    for _ in range(args.rounds):
        for mode, source in sources.items():
            steps = range(step, step + args.steps)
            start = time.perf_counter()
            for s, micro in source(steps):
                consume(s, micro)
            speeds[mode].append(args.steps / (time.perf_counter() - start))
            step += args.steps
    return {mode: statistics.median(v) for mode, v in speeds.items()}


def rate_table(what: str, rates: dict[str, float], batch: int, base: str) -> str:
    rows = [[m, round(r * batch), round(r / rates[base], 2)] for m, r in rates.items()]
    return table([what, "images/s (median)", "ratio"], rows)


if __name__ == "__main__":
    main()
