"""Which CPU kernels make an image depend on its batch here, and what the remedies cost.

    python benchmarks/probe_batch_kernels.py [--params params.yaml]

A prompt and seed give the same pixels alone and in any batch only if no kernel's summation
order follows the batch (docs/architecture.md, "Determinism"). On this machine it prints:
- for the U-Net's linear shapes, the row counts whose rows differ from the same rows among
  64, for nn.Linear and for `models.layers.Linear` (pads under 16 rows);
- for attention with one query (the pooled text) and with 16, whether SDPA and the
  explicit product give an item the same alone and in a batch (`masked_attention`);
- for convolutions of the demo's sizes, whether an image is the same alone, in a batch of
  two and in one of eight (`Stage.denoiser` runs a lone image as two);
- for the text encoder's feed-forward shapes (MiniLM's), the row counts up to 300 whose rows
  differ from the same rows among 2048 (MKL's kernel follows the row count);
- for a few prompts, the stored float16 values that differ between the prompt alone and
  among 64 prompts: padded to the batch's longest (the first encoding), to the caption's
  own length rounded up to 8 tokens (`text.encoders.TOKEN_BUCKET`) in a pass as large as
  the batch (the second), and in passes of exactly `text.batch_size` (now);
- the network's time for one image and for two, per demo stage (the lone image's cost).
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from imagen_ops.cascade import Stage
from imagen_ops.config import load_params
from imagen_ops.diffusion.guidance import Conditioning
from imagen_ops.models.layers import Linear
from imagen_ops.models.unet import explicit_attention
from imagen_ops.text.encoders import TextEmbeddings, load_text_encoder

from common import machine, median_seconds, table

PROMPTS = [
    "a red circle",
    "three pink hearts",
    "a yellow star above a purple circle",
    "two blue squares to the left of a green triangle and a cyan star",
]


def linear_rows(layer: nn.Linear) -> list[int]:
    """Row counts 1..20 whose outputs differ from the same rows among 64."""
    x = torch.randn(64, layer.in_features)
    with torch.no_grad():
        full = layer(x)
        return [m for m in range(1, 21) if not torch.equal(layer(x[:m]), full[:m])]


def conv_batches(conv: nn.Conv2d, size: int) -> list[bool]:
    """Is image 0 the same alone and in a batch of 2, alone and in 8, in 2 and in 8?"""
    x = torch.randn(8, conv.in_channels, size, size)
    with torch.no_grad():
        one, two, eight = (conv(x[:n])[:1] for n in (1, 2, 8))
    return [torch.equal(one, two), torch.equal(one, eight), torch.equal(two, eight)]


def attention_batches(queries: int) -> list[str]:
    """For SDPA and the explicit product: how many of 6 items x 3 key lengths x 3 smaller
    batches (one, two, three items) differ from the batch of 6 (4 heads of 32, keys partly
    masked)?"""
    counts = []
    for attend in (_sdpa, explicit_attention):
        differ = cases = 0
        for keys in (9, 17, 80):
            q, k, v = (torch.randn(6, 4, n, 32) for n in (queries, keys, keys))
            mask = torch.arange(keys) < torch.randint(2, keys + 1, (6, 1, 1, 1))
            full = attend(q, k, v, mask)
            for i in range(6):
                for n in (1, 2, 3):
                    lo = max(0, i - n + 1)
                    part = attend(*(t[lo : lo + n].contiguous() for t in (q, k, v, mask)))
                    differ += not torch.equal(part[i - lo], full[i])
                    cases += 1
        counts.append(f"{differ} of {cases}")
    return counts


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def row_ranges(k: int, n: int) -> str:
    """Row counts 1..300 whose outputs differ from the same rows among 2048, as ranges."""
    layer, x = nn.Linear(k, n), torch.randn(2048, k)
    with torch.no_grad():
        full = layer(x)
        bad = [m for m in range(1, 301) if not torch.equal(layer(x[:m]), full[:m])]
    runs: list[list[int]] = []
    for m in bad:
        if runs and m == runs[-1][1] + 1:
            runs[-1][1] = m
        else:
            runs.append([m, m])
    return ", ".join(f"{a}-{b}" if a < b else f"{a}" for a, b in runs) or "none"


def stored_differences(encoder, prompts: list[str], mode: str) -> list[int]:
    """Per distinct prompt: stored values that differ between the prompt alone and among
    `prompts`, encoded padded to the longest, in passes as large as the batch, or now."""

    def encode(texts: list[str]) -> torch.Tensor:
        if mode == "batch pass":  # every pass as large as the batch: a copy sized to it,
            sized = copy.copy(encoder)  # sharing the model
            sized.cfg = encoder.cfg.model_copy(update={"batch_size": len(texts)})
            return sized.encode(texts).as_stored().tokens
        if mode != "longest":
            return encoder.encode(texts).as_stored().tokens
        batch = encoder.tokenizer(texts, padding="longest", return_tensors="pt")
        with torch.no_grad():
            h = encoder.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        return TextEmbeddings(h * mask[..., None], mask).as_stored().tokens

    together = encode(prompts)
    counts = []
    for k, prompt in enumerate(dict.fromkeys(prompts)):
        alone = encode([prompt])[0]
        counts.append(int((alone != together[k, : len(alone)]).sum()))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    torch.manual_seed(0)
    print(machine(), "\n")

    rows = []
    for k, n in [(384, 128), (128, 512), (64, 192), (256, 256)]:
        plain = nn.Linear(k, n)
        padded = Linear(k, n)
        padded.load_state_dict(plain.state_dict())
        rows.append([f"{k} -> {n}", linear_rows(plain) or "none", linear_rows(padded) or "none"])
    print(table(["linear", "nn.Linear: rows that differ", "layers.Linear"], rows), "\n")

    rows = []
    for cin, cout, size in [(6, 16, 32), (9, 32, 64), (32, 32, 16), (64, 64, 8), (128, 128, 8)]:
        alike = conv_batches(nn.Conv2d(cin, cout, 3, padding=1), size)
        rows.append([f"{cin} -> {cout}, {size} px", *("same" if a else "differs" for a in alike)])
    header = ["3x3 convolution", "alone vs in 2", "alone vs in 8", "in 2 vs in 8"]
    print(table(header, rows), "\n")

    rows = [[n, *attention_batches(n)] for n in (1, 16)]
    print(table(["attention queries", "SDPA: items that differ", "explicit"], rows), "\n")

    rows = [[f"{k} -> {n}", row_ranges(k, n)] for k, n in [(384, 1536), (1536, 384)]]
    print(table(["encoder linear", "row counts whose rows differ"], rows), "\n")

    encoder = load_text_encoder(params.text)
    modes = ("longest", "batch pass", "fixed pass")
    counts = [stored_differences(encoder, PROMPTS * 16, mode) for mode in modes]
    rows = [[p, *c] for p, *c in zip(PROMPTS, *counts, strict=True)]
    header = ["prompt", "padded to the longest", "own 8, pass of the batch", "own 8, fixed pass"]
    print(table(header, rows), "\n")

    rows = []
    for name, cfg in params.stages.items():
        stage = Stage.build(name, cfg, encoder.dim, params.lowres_of(name))
        stage.net.eval().requires_grad_(False)
        size, grid = stage.resolution, cfg.unet.layout_grid
        text = encoder.encode(PROMPTS[:1])
        cond = Conditioning(
            text.tokens,
            text.mask,
            torch.zeros(1, 3, size, size) if stage.lowres else None,
            torch.zeros(1) if stage.lowres else None,
            torch.zeros(1, 3, grid, grid) if cfg.unet.layout_condition == "mode" else None,
        )
        x, two = torch.randn(1, 3, size, size), cond.repeat2(cond)
        with torch.no_grad():
            one = median_seconds(partial(_forward, stage.net, x, cond), repeats=9)
            both = median_seconds(
                partial(_forward, stage.net, x.repeat(2, 1, 1, 1), two), repeats=9
            )
        rows.append([name, f"{1e3 * one:.1f}", f"{1e3 * both:.1f}", f"{both / one:.2f}"])
    print(table(["stage", "one image (ms)", "two (ms)", "ratio"], rows))


def _forward(net: nn.Module, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    logsnr = torch.zeros(len(x))
    return net(
        x, logsnr, cond.text, cond.mask, cond.lowres, cond.aug_logsnr, layout_key=cond.layout_key
    )


if __name__ == "__main__":
    main()
