"""What the layout head costs inside each training step of the base stage (issue #13).

    python benchmarks/bench_layout_speed.py [--params params.yaml] [--rounds 4]

The base stage's training step (forward, backward, AdamW; batch 32, bf16) with its
`layout_grid` and with the same stage without it, interleaved, medians of images/s. The
head's fit alone before the U-Net (train.layout) is not in these figures.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from imagen_ops.cascade import Stage
from imagen_ops.config import load_params

from bench_model import TEXT_DIM, train_speed
from common import machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    cfg = load_params(args.params).stages["base"]
    if not cfg.unet.layout_grid:
        raise SystemExit("the base stage has no layout head (stages.base.unet.layout_grid)")
    plain = cfg.model_copy(
        update={
            "unet": cfg.unet.model_copy(update={"layout_grid": 0, "layout_modes": 1}),
            "train": cfg.train.model_copy(update={"layout": {"steps": 0}}),
        }
    )
    print(f"machine: {machine()}\n")
    rates: dict[str, list[float]] = {"with the layout head": [], "without": []}
    for _ in range(args.rounds):
        for name, stage_cfg in zip(rates, (cfg, plain), strict=True):
            torch.manual_seed(0)
            stage = Stage.build("base", stage_cfg, TEXT_DIM, None)
            rates[name].append(train_speed(stage, 32, "bf16", False))
    for name, values in rates.items():
        print(f"{name}: {statistics.median(values):.1f} images/s ({[round(v) for v in values]})")
    ratio = statistics.median(rates["without"]) / statistics.median(rates["with the layout head"])
    print(f"without / with: {ratio:.2f}x")


if __name__ == "__main__":
    main()
