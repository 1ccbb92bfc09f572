"""The FID Inception on this machine: images/s in each memory format, side by side.

    python benchmarks/bench_fid.py [--images 64] [--batch-size 32] [--repeats 5]

InceptionFeatures permutes NHWC uint8 images to (N, C, H, W), which leaves them
channels_last in memory (interpolate keeps the layout): the layout oneDNN's CPU
convolutions run natively. This prints both layouts' throughput in one run, and how far
apart their features are (float32 sums in another order, ~1e-5 on features of ~1), so a
change that made the input NCHW-contiguous (a `.contiguous()`) would show its cost here.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from imagen_ops.eval.fid import inception_path

from common import machine, median_seconds, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    net = torch.jit.load(str(inception_path())).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 64, 64), generator=generator).float()
    x = (F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 128) / 128
    formats = {"contiguous (NCHW)": torch.contiguous_format, "channels_last": torch.channels_last}

    @torch.no_grad()
    def features(fmt: torch.memory_format) -> torch.Tensor:
        batches = x.split(args.batch_size)
        return torch.cat([net(b.contiguous(memory_format=fmt)) for b in batches])

    outputs = {name: features(fmt) for name, fmt in formats.items()}  # also the warm-up
    reference = outputs["contiguous (NCHW)"]
    rows = []
    for name, fmt in formats.items():
        seconds = median_seconds(lambda fmt=fmt: features(fmt), repeats=args.repeats, warmup=0)
        rows.append([name, args.images / seconds, (outputs[name] - reference).abs().max().item()])
    print(machine())
    print(table(["input format", "images/s", "max |feature - NCHW's|"], rows))


if __name__ == "__main__":
    main()
