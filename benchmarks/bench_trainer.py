"""The real training loop on prepared data: batches built inline vs on a background thread.

    python benchmarks/bench_trainer.py [--stage base] [--steps 30] [--rounds 3]

Needs `dvc repro encode_text` (artifacts/prepared, artifacts/text_cache). Runs the
trainer's own batch builder and optimizer step (bf16, AdamW, EMA, clipping) for `steps`
steps per round, alternating the two ways of building batches, and prints the median
images/s of each. On CUDA the trainer uses the background thread; on the CPU it builds
batches inline, because the thread's tensor ops compete with the step's OpenMP threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from imagen_ops.config import load_params
from imagen_ops.data.dataset import prefetch
from imagen_ops.pipeline import train_settings
from imagen_ops.train.trainer import Trainer, TrainPaths

from common import machine, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", default="base")
    parser.add_argument("--prepared", default="artifacts/prepared")
    parser.add_argument("--cache", default="artifacts/text_cache")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    params = load_params(args.params)
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
        speeds: dict[str, list[float]] = {"inline": [], "background thread": []}
        step = 0
        for _ in range(args.rounds):
            for mode in speeds:
                steps = range(step, step + args.steps)
                batches = (
                    prefetch(trainer._micro_batches, steps)
                    if mode != "inline"
                    else ((s, trainer._micro_batches(s)) for s in steps)
                )
                start = time.perf_counter()
                for s, micro in batches:
                    trainer._optimize(s, micro)
                speeds[mode].append(args.steps * batch / (time.perf_counter() - start))
                step += args.steps
    base = statistics.median(speeds["background thread"])
    print(
        f"### Training loop, stage {args.stage}, batch {batch}, {args.rounds} x {args.steps} steps"
    )
    print(
        table(
            ["batches built", "images/s (median)", "ratio"],
            [
                [mode, round(statistics.median(v), 1), round(statistics.median(v) / base, 2)]
                for mode, v in speeds.items()
            ],
        )
    )


if __name__ == "__main__":
    main()
