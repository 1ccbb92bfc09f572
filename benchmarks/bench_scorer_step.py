"""The scorer's training step on this machine: each choice against its alternative, interleaved.

    python benchmarks/bench_scorer_step.py [--params params.yaml] [--rounds 12]

Random images at the base stage's resolution and random token embeddings (MiniLM's width,
14 tokens), the params.yaml scorer. Forward + backward of the image tower with NCHW and
with NHWC (channels_last, what `ImageTower` uses) input, and of the text head over the
batch's captions and hard negatives in two passes and in one, and over every row against
each distinct row once (30% of rows repeat, as in the demo's steps): `train_scorer` embeds
distinct rows in one pass. Then the whole step in fp32, what `train_scorer` runs, against
the same step under bf16 autocast.
The two sides of a pair alternate within each round, which goes first alternating too: on
a shared 2-core host separate runs drift by more than these differences. Then the whole
step (`_loss`, backward, AdamW): its 3,000 steps are most of #14's "<= 2 min".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from imagen_ops.config import load_params
from imagen_ops.scorer import Scorer
from imagen_ops.text.encoders import TextEmbeddings
from imagen_ops.train.scorer import _embed_rows, _loss

from common import machine, median_seconds, table

TOKENS, WIDTH = 14, 384  # the demo's longest caption in MiniLM tokens; MiniLM's width
DISTINCT = 0.7  # share of distinct rows among a demo step's captions and hard negatives


def interleaved(a: Callable[[], object], b: Callable[[], object], rounds: int) -> list[float]:
    """Per round, median time of b over median time of a (8 calls each, after one)."""
    ratios = []
    for r in range(rounds):
        times: dict[int, list[float]] = {0: [], 1: []}
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            fn = (a, b)[side]
            fn()
            for _ in range(8):
                start = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - start)
        ratios.append(statistics.median(times[1]) / statistics.median(times[0]))
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = params.scorer
    resolution = next(iter(params.stages.values())).resolution  # the base stage's
    torch.manual_seed(0)
    model = Scorer(cfg, resolution, WIDTH)
    b, k = cfg.batch_size, cfg.hard_negatives
    images = torch.rand(b, 3, resolution, resolution) * 2 - 1
    n = b * (1 + k)
    distinct = int(DISTINCT * n)
    lengths = torch.randint(6, TOKENS + 1, (distinct, 1))
    pool = TextEmbeddings(torch.randn(distinct, TOKENS, WIDTH), torch.arange(TOKENS) < lengths)
    rows = torch.cat([torch.arange(distinct), torch.randint(distinct, (n - distinct,))])
    rows = rows[torch.randperm(n)]
    text = pool[rows]
    tower = model.image

    def image(fmt: torch.memory_format) -> None:
        tower.head(tower.body(images.contiguous(memory_format=fmt)).flatten(1)).sum().backward()

    def text_passes(split: bool) -> None:
        parts = [text[:b], text[b:]] if split else [text]
        sum(model.embed_text(part).sum() for part in parts).backward()

    def distinct_rows() -> torch.Tensor:
        return _embed_rows(model, lambda r: pool[torch.from_numpy(r)], rows.numpy())

    one, two = f"{b * (1 + k)} captions in one pass", f"{b} + {b * k} in two"
    pairs = [  # (what, the alternative, what the code does)
        (
            "image tower: NHWC / NCHW input",
            lambda: image(torch.contiguous_format),
            lambda: image(torch.channels_last),
        ),
        (f"text head: {one} / {two}", lambda: text_passes(True), lambda: text_passes(False)),
        (
            f"text head: {len(rows.unique())} distinct rows / all {n}",
            lambda: text_passes(False),
            lambda: distinct_rows().sum().backward(),
        ),
    ]
    results = []
    for name, before, now in pairs:
        ratios = interleaved(before, now, args.rounds)
        faster = sum(r < 1 for r in ratios)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        results.append([name, statistics.median(ratios), f"{faster} of {len(ratios)}", spread])

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(bf16: bool = False) -> None:
        ids = rows[:b].numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(model, images, distinct_rows(), ids, cfg.hard_negative_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ratios = interleaved(lambda: step(bf16=True), step, args.rounds)
    faster = sum(r < 1 for r in ratios)
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
    name = "whole step: fp32 / bf16 autocast"
    results.append([name, statistics.median(ratios), f"{faster} of {len(ratios)}", spread])
    ms = 1000 * median_seconds(step, repeats=30)
    print(f"machine: {machine()}\n")
    print(f"scorer step, batch {b}, {k} hard negatives each, {resolution} px:\n")
    print(table(["forward + backward", "time ratio (median)", "faster in", "range"], results))
    total = cfg.steps * ms / 1000
    print(f"\nwhole step (train_scorer's): {ms:.1f} ms; {cfg.steps} steps: {total:.0f} s")


if __name__ == "__main__":
    main()
