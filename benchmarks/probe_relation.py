"""How many steps of layout signal does it take to learn where "left of" puts things? (#13)

    python benchmarks/probe_relation.py readout [--steps 3000] [--layer K] [--seed S]
        [--all-categories] [--batch 32] [--lr 1e-3]
    python benchmarks/probe_relation.py head [--params P] [-S key=value] [--batch 64] ...
    python benchmarks/probe_relation.py unet [--steps 1000] [--logsnr -6 -4] [-S key=value]

Both probes train on the position scenes of the prepared training split alone (with
`--all-categories`, on every scene, as the base stage's layout head does), with their
cached token embeddings (text.layer), and report every `--every` steps `relation`: the
signed first-half minus second-half color contrast of the prediction along each held-out
prompt's axis (bench_relation.contrast), as a fraction of the training images' contrast.
0 is a bag of words (the words' places ignored), 1 the data's layout.

- `readout`: a layout head (models/unet.py LayoutHead: the U-Net's text path,
  TextConditioning, here with the base U-Net's `text_layers` where the model's head has 1,
  read by cross-attention from 16 learned queries, one per cell of a 4 x 4 grid),
  regressing the images' 4 x 4 mean. The frozen tokens (of `--layer`, one the cache
  holds) carry the relation if this learns it.
- `head`: the base stage's own layout head, as its U-Net builds it (width embedding_dim,
  attention_head_dim, layout_modes; params.yaml or a recipe merged with --params and -S),
  read through its mixture's mean: does the stage's head leave the plateau in its
  train.layout steps?
- `unet`: the base stage's U-Net (params.yaml, overridable with -S like the CLI), its
  output taken as x0 and trained on the x0 error at log-SNR uniform in `--logsnr` alone, where
  the noisy image holds almost no layout and the caption must supply it (the denoiser's
  optimum there is the conditional mean). Relation is read from its x0 prediction at
  log-SNR -4 around the training images' mean image (4 noise draws).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagen_ops.config import load_params
from imagen_ops.data.prepare import PreparedData
from imagen_ops.diffusion.schedules import alpha_sigma
from imagen_ops.images import from_uint8
from imagen_ops.models.unet import LayoutHead, UNet, layout_loss
from imagen_ops.text.cache import EmbeddingCache

from bench_relation import contrast
from common import machine, parse_args, path_options

GRID = 4  # the readout's cells per side


def split_scenes(
    prepared: PreparedData,
    scenes: list[dict],
    cache: EmbeddingCache,
    split: str,
    res: int,
    layer: int | None,
    categories: set[str],
) -> tuple[Tensor, Tensor, Tensor, list[dict]]:
    """Images, tokens, mask and scenes of one split's scenes of `categories`."""
    rows = np.array([i for i in prepared.indices(split) if scenes[i]["category"] in categories])
    text = cache.lookup(rows, layer)
    images = from_uint8(prepared.images(res)[rows])
    return images, text.tokens.float(), text.mask, [scenes[i] for i in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("probe", choices=["readout", "head", "unet"])
    parser.add_argument("--params", default="params.yaml")
    path_options(parser, "prepared", "cache")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--logsnr", type=float, nargs=2, default=(-6.0, -4.0))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--all-categories", action="store_true", help="train on every scene, not position only"
    )
    parser.add_argument("--layer", type=int, help="the cache's encoder layer (text.layer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parse_args(parser)
    params = load_params(args.params, args.set)
    print(f"machine: {machine()}\n")
    torch.manual_seed(args.seed)

    stage = params.stages[params.stage_names()[0]]
    prepared, cache = PreparedData.open(Path(args.prepared)), EmbeddingCache.open(args.cache)
    scenes = [json.loads(s) for s in prepared.table["scene"]]
    position = {"position"}
    trained = {s["category"] for s in scenes} if args.all_categories else position
    x, text, mask, train_scenes = split_scenes(
        prepared, scenes, cache, "train", stage.resolution, args.layer, trained
    )
    x_val, text_val, mask_val, val_scenes = split_scenes(
        prepared, scenes, cache, "val", stage.resolution, args.layer, position
    )
    relations = [i for i, s in enumerate(train_scenes) if s["category"] == "position"]
    data = float(contrast(x[relations], [train_scenes[i] for i in relations]).mean())

    if args.probe == "readout":
        net: nn.Module = LayoutHead(cache.dim, 128, 32, GRID, text_layers=stage.unet.text_layers)
        x = F.avg_pool2d(x, stage.resolution // GRID)
        steps = args.steps or 3000
    elif args.probe == "head":
        if not stage.unet.layout_grid:
            raise SystemExit("the base stage has no layout head: set its unet.layout_grid")
        own = UNet(
            stage.unet,
            text_dim=cache.dim,
            super_resolution=False,
            objective=stage.diffusion.objective,
        )
        net = own.layout
        x = F.avg_pool2d(x, stage.resolution // stage.unet.layout_grid)
        steps = args.steps or stage.train.layout.steps
    else:
        # the U-Net's own attention, without the layout head
        plain = stage.unet.model_copy(update={"layout_grid": 0, "layout_modes": 1})
        net = UNet(plain, text_dim=cache.dim, super_resolution=False)
        steps = args.steps or 1000
    opt = torch.optim.AdamW(net.parameters(), args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    lo, hi = args.logsnr
    mean_image = x.mean(0)
    print(f"{args.probe}: {len(x)} training scenes ({sorted(trained)}), data contrast {data:.3f}")
    start = time.perf_counter()
    for step in range(steps + 1):
        if step % args.every == 0:
            relation = evaluate(net, args.probe, mean_image, x_val, text_val, mask_val)
            fraction = float(contrast(relation, val_scenes).mean()) / data
            print(
                f"step {step:5d}  relation {fraction:+.3f}  ({time.perf_counter() - start:.0f} s)"
            )
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        x0, tokens, tokens_mask = x[idx], text[idx], mask[idx]
        if args.probe != "unet":
            loss = layout_loss(net(tokens, tokens_mask), x0)
        else:
            logsnr = lo + (hi - lo) * torch.rand(args.batch, generator=gen)
            alpha, sigma = alpha_sigma(logsnr, like=x0)
            x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=gen)
            loss = F.mse_loss(net(x_t, logsnr, tokens, tokens_mask), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(
    net: nn.Module, probe: str, mean_image: Tensor, x: Tensor, text: Tensor, mask: Tensor
) -> Tensor:
    """The probe's prediction for each held-out caption (x: their images, for the shape)."""
    if probe != "unet":
        return net(text, mask).mean()
    logsnr = torch.full((len(x),), -4.0)
    alpha, sigma = alpha_sigma(logsnr, like=x)
    gen = torch.Generator().manual_seed(1)
    draws = [alpha * mean_image + sigma * torch.randn(x.shape, generator=gen) for _ in range(4)]
    return sum(net(x_t, logsnr, text, mask) for x_t in draws) / len(draws)


if __name__ == "__main__":
    main()
