"""Training and sampling speed of the default stages (issue: diffusion core, trainer).

    python benchmarks/bench_model.py [--params params.yaml] [--batch 32]

Prints markdown tables: training step images/s per stage and precision / memory format,
sampling seconds per image against steps for each sampler, batched classifier-free
guidance against two forward passes, and CPU attention kernels.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from imagen_ops.cascade import Cascade, Stage
from imagen_ops.config import load_params
from imagen_ops.data.dataset import Batch
from imagen_ops.diffusion.guidance import Conditioning, classifier_free_guidance
from imagen_ops.models.summary import count_flops
from imagen_ops.models.unet import explicit_attention
from imagen_ops.text.encoders import TextEmbeddings
from imagen_ops.train.loss import TrainingNoise, diffusion_loss

from common import machine, median_seconds, table

TEXT_DIM, TEXT_LEN = 384, 13


def fake_batch(stage: Stage, n: int, channels_last: bool) -> tuple[Batch, TrainingNoise]:
    g = torch.Generator().manual_seed(0)
    size = stage.resolution
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    low = None
    if stage.lowres:
        low = F.interpolate(images, size=stage.lowres, mode="area")
    text = TextEmbeddings(
        torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g), torch.ones(n, TEXT_LEN, dtype=torch.bool)
    )
    noise = TrainingNoise(
        torch.rand(n, generator=g),
        torch.randn_like(images),
        torch.ones(n, dtype=torch.bool),
        torch.rand(n, generator=g) * 0.5 if low is not None else None,
        torch.randn_like(images) if low is not None else None,
    )
    return Batch(images, low, text).to(torch.device("cpu"), channels_last), noise


def train_speed(stage: Stage, n: int, precision: str, channels_last: bool) -> float:
    net = stage.net.train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    batch, noise = fake_batch(stage, n, channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion_loss(stage, net, batch, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = median_seconds(step, repeats=5)
    net.to(memory_format=torch.contiguous_format)
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    params = load_params(args.params)
    print(f"machine: {machine()}\n")

    stages = [
        Stage.build(name, cfg, TEXT_DIM, params.lowres_of(name))
        for name, cfg in params.stages.items()
    ]
    rows = []
    for stage in stages:
        gflops = count_flops(stage.net, stage.resolution, TEXT_DIM, TEXT_LEN, True) / 1e9
        for precision in ("fp32", "bf16"):
            for cl in (False, True):
                ips = train_speed(stage, args.batch, precision, cl)
                rows.append(
                    [
                        stage.name,
                        stage.resolution,
                        precision,
                        cl,
                        round(ips, 1),
                        round(ips * gflops, 1),
                    ]
                )
    print("### Training step (forward + backward + AdamW), batch", args.batch)
    print(table(["stage", "px", "precision", "channels_last", "images/s", "GFLOP/s"], rows))

    cascade = Cascade(stages, params.text)
    for s in stages:
        s.net.eval()
    n = 8
    text = TextEmbeddings(
        torch.randn(n, TEXT_LEN, TEXT_DIM), torch.ones(n, TEXT_LEN, dtype=torch.bool)
    )
    rows = []
    for precision in ("fp32", "bf16"):
        for sampler in ("ancestral", "ddim", "dpmpp_2m"):
            for steps in (10, 25, 50):
                settings = params.sample.model_copy(
                    update={"sampler": sampler, "steps": steps, "precision": precision}
                )
                sec = median_seconds(
                    lambda st=settings: cascade.sample(text, st), repeats=3, warmup=1
                )
                rows.append([precision, sampler, steps, round(sec / n, 3)])
    print(
        "\n### Sampling the whole cascade (seconds per image, batch 8, guidance",
        params.sample.guidance,
        ")",
    )
    print(table(["precision", "sampler", "steps", "s/image"], rows))

    base = stages[0]
    x = torch.randn(16, 3, base.resolution, base.resolution)
    cond = Conditioning(
        torch.randn(16, TEXT_LEN, TEXT_DIM), torch.ones(16, TEXT_LEN, dtype=torch.bool)
    )
    t = torch.tensor(0.5)
    denoise = base.denoiser()
    with torch.no_grad():
        batched = median_seconds(lambda: classifier_free_guidance(denoise, cond, 3.0)(x, t))
        two = median_seconds(lambda: (denoise(x, t, cond), denoise(x, t, cond.without_text())))
    print("\n### Classifier-free guidance, base stage, 16 images: one batched pass vs two")
    print(
        table(
            ["method", "ms"],
            [
                ["batched [cond; uncond]", round(batched * 1e3, 1)],
                ["two passes", round(two * 1e3, 1)],
            ],
        )
    )

    rows = []
    for lq, lk, heads in ((256, 14, 2), (64, 14 + 64, 4)):
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(32, heads, lq, 32, dtype=dtype, requires_grad=True)
            k = torch.randn(32, heads, lk, 32, dtype=dtype, requires_grad=True)
            v = torch.randn(32, heads, lk, 32, dtype=dtype, requires_grad=True)
            mask = torch.ones(32, lk, dtype=torch.bool)
            mask[:, -3:] = False
            explicit = median_seconds(
                lambda q=q, k=k, v=v, m=mask: (
                    explicit_attention(q, k, v, m[:, None, None, :]).float().sum().backward()
                )
            )
            sdpa = median_seconds(
                lambda q=q, k=k, v=v, m=mask: (
                    F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])
                    .float()
                    .sum()
                    .backward()
                )
            )
            rows.append(
                [
                    f"{lq}x{lk}",
                    str(dtype).split(".")[-1],
                    round(sdpa * 1e3, 2),
                    round(explicit * 1e3, 2),
                ]
            )
    print("\n### Attention forward + backward on CPU, batch 32 (ms)")
    print(table(["queries x keys", "dtype", "SDPA", "explicit"], rows))


if __name__ == "__main__":
    main()
