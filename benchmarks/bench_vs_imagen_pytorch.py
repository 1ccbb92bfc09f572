"""Training speed against lucidrains/imagen-pytorch at equal model size, side by side.

    pip install --no-deps --target benchmarks/.lucid imagen-pytorch==2.1.0 einops beartype \
        kornia kornia-rs ema-pytorch accelerate pytorch-warmup lion-pytorch
    python benchmarks/bench_vs_imagen_pytorch.py [--lucid benchmarks/.lucid] [--stage base]

Both train one stage on the same batch of random 32 px images and precomputed 384-d text
embeddings (no text encoder inside the step, for either): imagen-pytorch's
`Imagen(unets=[Unet(...)])(images, text_embeds=..., text_masks=...)` loss, backward and
AdamW, against imagen-ops' `diffusion_loss` with the params.yaml stage, backward and
AdamW. The imagen-pytorch U-Net width is chosen so its parameter count matches ours
within 15%; both are reported with their parameter counts and FLOPs, in fp32 and under
bf16 autocast, with the median of interleaved repeats.

imagen-pytorch needs two shims to import here: torchvision (it imports
`torchvision.transforms` at the top of its model file; no CPU torchvision wheel imports
beside torch 2.13) gets an empty stand-in module, and its `get_encoded_dim` default
argument fetches a T5 config from the hub at import time, so `T5Config.from_pretrained`
returns a local t5-v1_1-base-sized config.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from imagen_ops.cascade import Stage
from imagen_ops.config import load_params
from imagen_ops.data.dataset import Batch
from imagen_ops.models.summary import count_flops
from imagen_ops.text.encoders import TextEmbeddings
from imagen_ops.train.loss import TrainingNoise, diffusion_loss

from common import machine, table

TEXT_DIM, TEXT_LEN, BATCH = 384, 13, 32


def import_imagen_pytorch(path: Path):
    sys.path.insert(0, str(path))
    import transformers
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached False before the stand-in exists
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tv.transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    sys.modules.setdefault("torchvision", tv)
    sys.modules.setdefault("torchvision.transforms", tv.transforms)

    transformers.T5Config.from_pretrained = classmethod(
        lambda cls, *a, **k: transformers.T5Config(d_model=768)
    )
    import imagen_pytorch

    return imagen_pytorch


def lucid_model(ip, ours_params: int, size: int, attn: tuple[bool, ...], efficient: bool):
    """An imagen-pytorch Imagen whose U-Net has about `ours_params` parameters."""
    best = None
    for dim in range(16, 129, 8):
        unet = ip.Unet(
            dim=dim,
            dim_mults=(1, 2, 4),
            num_resnet_blocks=(1, 2, 2),
            layer_attns=attn,
            layer_cross_attns=attn,
            text_embed_dim=TEXT_DIM,
            attn_heads=2,
            attn_dim_head=32,
            memory_efficient=efficient,
        )
        n = sum(p.numel() for p in unet.parameters())
        if best is None or abs(n - ours_params) < abs(best[1] - ours_params):
            best = (dim, n, unet)
    dim, n, unet = best
    imagen = ip.Imagen(
        unets=(unet,),
        image_sizes=(size,),
        text_embed_dim=TEXT_DIM,
        timesteps=1000,
        cond_drop_prob=0.1,
        pred_objectives="v",
        min_snr_loss_weight=True,
        auto_normalize_img=False,
    )
    return imagen, dim, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lucid", default="benchmarks/.lucid")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", default="base")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    ip = import_imagen_pytorch(Path(args.lucid))
    params = load_params(args.params)
    cfg = params.stages[args.stage]
    if params.lowres_of(args.stage) is not None:
        raise SystemExit("compare a base stage (no low-res conditioning)")
    print(f"machine: {machine()}\n")
    rows = []
    for efficient in (True, False):  # Efficient U-Net layout in both, then the standard one
        unet = {"efficient": efficient, "layout_grid": 0, "layout_modes": 1}  # no layout head there
        stage_cfg = cfg.model_copy(update={"unet": cfg.unet.model_copy(update=unet)})
        rows += compare(ip, args.stage, stage_cfg, efficient, args.repeats)
    print(
        f"### Training step, stage {args.stage} ({cfg.resolution} px), batch {BATCH}, "
        "median of interleaved repeats"
    )
    print(
        table(
            [
                "layout",
                "precision",
                "implementation",
                "params",
                "GFLOP/fwd",
                "images/s",
                "speed-up",
            ],
            rows,
        )
    )


def compare(ip, name: str, cfg, efficient: bool, repeats: int) -> list[list[object]]:
    """Rows of one layout: imagen-pytorch and imagen-ops in fp32 and bf16 autocast."""
    ours = Stage.build(name, cfg, TEXT_DIM, None)
    n_ours = sum(p.numel() for p in ours.net.parameters())
    attn = tuple(
        a or c for a, c in zip(cfg.unet.self_attention, cfg.unet.cross_attention, strict=True)
    )
    imagen, dim, n_lucid = lucid_model(ip, n_ours, cfg.resolution, attn, efficient)
    unet = imagen.unets[0]

    g = torch.Generator().manual_seed(0)
    size = cfg.resolution
    images = torch.rand(BATCH, 3, size, size, generator=g) * 2 - 1
    tokens = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    batch = Batch(images, None, TextEmbeddings(tokens, mask))
    noise = TrainingNoise(
        torch.rand(BATCH, generator=g),
        torch.randn_like(images),
        torch.rand(BATCH, generator=g) > 0.1,
    )
    opt_ours = torch.optim.AdamW(ours.net.parameters(), lr=1e-4, fused=True)
    opt_lucid = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)

    def step_ours(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(ours, ours.net, batch, noise)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_lucid(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = imagen(images, text_embeds=tokens, text_masks=mask, unet_number=1)
        loss.backward()
        opt_lucid.step()
        opt_lucid.zero_grad(set_to_none=True)

    layout = "efficient" if efficient else "standard"
    lucid_name = f"imagen-pytorch 2.1.0 (dim={dim})"
    rows = []
    for bf16 in (False, True):
        times: dict[str, list[float]] = {"ours": [], "lucid": []}
        for fn in (step_ours, step_lucid):  # warm-up
            fn(bf16)
            fn(bf16)
        for _ in range(repeats):  # interleaved, so drifts in machine load hit both
            for key, fn in (("ours", step_ours), ("lucid", step_lucid)):
                start = time.perf_counter()
                fn(bf16)
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        precision = "bf16 autocast" if bf16 else "fp32"
        rows.append(
            [
                layout,
                precision,
                lucid_name,
                f"{n_lucid / 1e6:.2f}M",
                round(count_flops_lucid(unet, size) / 1e9, 2),
                round(BATCH / med["lucid"], 1),
                "1.00",
            ]
        )
        rows.append(
            [
                layout,
                precision,
                "imagen-ops",
                f"{n_ours / 1e6:.2f}M",
                round(count_flops(ours.net, size, TEXT_DIM, TEXT_LEN) / 1e9, 2),
                round(BATCH / med["ours"], 1),
                f"{med['lucid'] / med['ours']:.2f}",
            ]
        )
    return rows


def count_flops_lucid(unet, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(
            torch.randn(1, 3, size, size),
            torch.rand(1),
            text_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM),
            text_mask=torch.ones(1, TEXT_LEN, dtype=torch.bool),
        )
    return counter.get_total_flops()


if __name__ == "__main__":
    main()
