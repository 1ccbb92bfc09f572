"""The scorer's training step on this machine: where its time goes, layouts side by side.

    python benchmarks/bench_scorer_step.py [--params params.yaml] [--repeats 15]

Random images at the base stage's resolution and random token embeddings (MiniLM's width,
14 tokens), the params.yaml scorer: forward + backward of the image tower with NCHW and
with NHWC (channels_last, what `ImageTower` uses) input, of the text head over the batch's
captions and hard negatives in two passes and in one (what `train_scorer` does), and the
whole step (`_loss`, backward, AdamW). The scorer's 3,000 steps are #14's "<= 2 min".
"""

from __future__ import annotations

import argparse

import torch

from imagen_ops.config import load_params
from imagen_ops.scorer import Scorer
from imagen_ops.text.encoders import TextEmbeddings
from imagen_ops.train.scorer import _loss

from common import machine, median_seconds, table

TOKENS, WIDTH = 14, 384  # the demo's longest caption in MiniLM tokens; MiniLM's width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = params.scorer
    resolution = next(iter(params.stages.values())).resolution  # the base stage's
    torch.manual_seed(0)
    model = Scorer(cfg, resolution, WIDTH)
    b, k = cfg.batch_size, cfg.hard_negatives
    images = torch.rand(b, 3, resolution, resolution) * 2 - 1
    lengths = torch.randint(6, TOKENS + 1, (b * (1 + k), 1))
    text = TextEmbeddings(torch.randn(b * (1 + k), TOKENS, WIDTH), torch.arange(TOKENS) < lengths)
    tower = model.image

    def image(fmt: torch.memory_format) -> None:
        tower.head(tower.body(images.contiguous(memory_format=fmt)).flatten(1)).sum().backward()

    def text_passes(split: bool) -> None:
        parts = [text[:b], text[b:]] if split else [text]
        sum(model.embed_text(part).sum() for part in parts).backward()

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step() -> None:
        loss = _loss(model, images, text, torch.arange(b).numpy(), cfg.hard_negative_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = [
        ["image tower, NCHW input", lambda: image(torch.contiguous_format)],
        ["image tower, NHWC input (ImageTower)", lambda: image(torch.channels_last)],
        [f"text head, {b} + {b * k} captions in two passes", lambda: text_passes(True)],
        [f"text head, {b * (1 + k)} captions in one pass (now)", lambda: text_passes(False)],
        ["whole step (train_scorer's)", step],
    ]
    ms = [1000 * median_seconds(fn, args.repeats) for _, fn in rows]
    print(f"machine: {machine()}\n")
    print(f"scorer step, batch {b}, {k} hard negatives each, {resolution} px (median ms):\n")
    timed = [[name, t] for (name, _), t in zip(rows, ms, strict=True)]
    print(table(["forward + backward", "ms"], timed))
    print(f"\nNHWC / NCHW: {ms[1] / ms[0]:.2f}; one pass / two: {ms[3] / ms[2]:.2f}")
    print(f"{cfg.steps} steps at the whole step's median: {cfg.steps * ms[4] / 1000:.0f} s")


if __name__ == "__main__":
    main()
