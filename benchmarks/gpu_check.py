"""A short GPU check: train each stage of a recipe briefly in bf16, sample, print throughput.

    python benchmarks/gpu_check.py [--params params.yaml] [--recipe configs/gpu.yaml] [--steps 30]

Runs on random data (no data set, no text encoder: 384-d random token embeddings), so it
needs only torch on the GPU machine. For each stage: training images/s in bf16 with
channels_last (and torch.compile when the recipe asks for it), the model FLOP utilisation
against the card's dense bf16 peak, peak memory, and cascade sampling seconds per image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from imagen_ops.cascade import Cascade, Stage
from imagen_ops.config import deep_merge, parse_params
from imagen_ops.data.dataset import Batch
from imagen_ops.models.summary import count_flops
from imagen_ops.text.encoders import TextEmbeddings
from imagen_ops.train.loss import TrainingNoise, diffusion_loss

from common import machine, table

TEXT_DIM, TEXT_LEN = 384, 16
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--recipe", default="configs/gpu.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    raw = yaml.safe_load(Path(args.params).read_text())
    if args.recipe:
        raw = deep_merge(raw, yaml.safe_load(Path(args.recipe).read_text()))
    params = parse_params(raw, args.recipe or args.params)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"machine: {machine()}\n")

    rows, stages = [], []
    for name, cfg in params.stages.items():
        tc = cfg.train
        stage = Stage.build(name, cfg, TEXT_DIM, params.lowres_of(name))
        stage.net.to(dev)
        fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
        stage.net.to(memory_format=fmt)
        model = torch.compile(stage.net) if tc.compile else stage.net
        opt = torch.optim.AdamW(stage.net.parameters(), lr=tc.lr, fused=True)
        size, n = tc.crop or cfg.resolution, tc.batch_size
        images = (torch.rand(n, 3, size, size, device=dev) * 2 - 1).to(memory_format=fmt)
        low = None
        if stage.lowres:
            low = (
                torch.rand(
                    n,
                    3,
                    size * stage.lowres // cfg.resolution,
                    size * stage.lowres // cfg.resolution,
                    device=dev,
                )
                * 2
                - 1
            )
        text = TextEmbeddings(
            torch.randn(n, TEXT_LEN, TEXT_DIM, device=dev),
            torch.ones(n, TEXT_LEN, dtype=torch.bool, device=dev),
        )
        noise = TrainingNoise(
            torch.rand(n, device=dev),
            torch.randn_like(images),
            torch.ones(n, dtype=torch.bool, device=dev),
            torch.rand(n, device=dev) * 0.5 if low is not None else None,
            torch.randn_like(images) if low is not None else None,
        )
        batch = Batch(images, low, text)

        def step(model=model, stage=stage, batch=batch, noise=noise, opt=opt) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = diffusion_loss(stage, model, batch, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        start = time.perf_counter()
        for _ in range(5):  # warm-up (and compilation)
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        flops = count_flops(stage.net.float().cpu(), size, TEXT_DIM, TEXT_LEN, True) * n
        stage.net.to(dev)
        peak = peak_flops()
        mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a"
        rows.append(
            [
                name,
                size,
                n,
                round(n / seconds),
                round(flops / seconds / 1e12, 1),
                mfu,
                round(torch.cuda.max_memory_allocated() / 2**30, 1),
                round(warm, 1),
            ]
        )
        stages.append(stage)
    print(
        table(["stage", "px", "batch", "images/s", "TFLOP/s", "MFU", "peak GiB", "warm-up s"], rows)
    )

    cascade = Cascade(stages, params.text)
    n = 64
    text = TextEmbeddings(
        torch.randn(n, TEXT_LEN, TEXT_DIM), torch.ones(n, TEXT_LEN, dtype=torch.bool)
    )
    for s in stages:
        s.net.eval()
    settings = params.sample.model_copy(update={"precision": "bf16"})
    cascade.sample(text[:2], settings)
    torch.cuda.synchronize()
    start = time.perf_counter()
    cascade.sample(text, settings)
    torch.cuda.synchronize()
    print(
        f"\nsampling the cascade: {(time.perf_counter() - start) / n * 1e3:.1f} ms per image "
        f"({settings.sampler}, {settings.steps} steps, batch {n})"
    )


if __name__ == "__main__":
    main()
