"""Does the layout head use its modes? (issue #13, stages.base.unet.layout_modes)

    python benchmarks/bench_layout_modes.py --modes 1 4 8 [--params params.yaml] [--images 1024]

Fits the base stage's layout head alone, as `train.layout` does at the start of a run
(Trainer._fit_layout), once per value of `layout_modes`, then reads it on the first
`--images` training scenes: how many modes are the nearest for at least one image, the
nearest mode's squared error per cell value, the mixture mean's error, and the caption
weights' entropy (ln K: the caption leaves the choice open). Needs the prepared data and
the text cache (`dvc repro encode_text`).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagen_ops.config import load_params
from imagen_ops.models.unet import layout_target, mode_errors
from imagen_ops.pipeline import train_settings
from imagen_ops.train.trainer import Trainer, TrainPaths

from common import machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print("| modes | used | nearest mode's error | mixture mean's error | weight entropy | fit s |")
    print("|---|---|---|---|---|---|")
    for modes in args.modes:
        params = load_params(args.params, [*args.set, f"stages.base.unet.layout_modes={modes}"])
        if not params.stages["base"].unet.layout_grid:
            raise SystemExit("the base stage has no layout head (stages.base.unet.layout_grid)")
        with tempfile.TemporaryDirectory() as tmp:
            paths = TrainPaths(
                prepared=Path(params.paths.prepared),
                cache=Path(params.paths.text_cache),
                out=Path(tmp, "out"),
                checkpoints=Path(tmp, "checkpoints"),
                metrics=Path(tmp, "metrics.csv"),
            )
            trainer = Trainer(train_settings(params, "base"), paths, progress=False)
            start = time.perf_counter()
            trainer._fit_layout()
            seconds = time.perf_counter() - start
        n = min(args.images, len(trainer.data.records))
        batch = trainer.data.load(np.arange(n)).to(trainer.device)
        with torch.no_grad():
            prior = trainer.net.layout.eval()(batch.text.tokens.float(), batch.text.mask)
            cells = layout_target(batch.images, prior.means.shape[-1])
            error = mode_errors(prior, batch.images)
            used = int((torch.bincount(error.argmin(1), minlength=modes) > 0).sum())
            weights = prior.logits.float().softmax(1)
            entropy = float(-(weights * weights.clamp_min(1e-12).log()).sum(1).mean())
            mean_error = float((prior.mean() - cells).square().mean())
        print(
            f"| {modes} | {used} of {modes} | {float(error.min(1).values.mean()):.4f} "
            f"| {mean_error:.4f} | {entropy:.2f} ({math.log(modes):.2f}) | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
