"""Synthetic data and text-cache throughput (issues: foundation, text encoders).

    python benchmarks/bench_data.py [--scenes 20000] [--captions 2000]

Scenes per second of the shapes generator at 64 px (render + PNG encode, all cores),
the whole `data synth` ingest path, and captions per second of the default text encoder
with the size of its cache per 10,000 captions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from imagen_ops.config import IngestConfig, SynthConfig, TextConfig
from imagen_ops.data.ingest import ingest
from imagen_ops.data.shapes import synth_scenes
from imagen_ops.data.sources import synth_source
from imagen_ops.text.cache import build_cache
from imagen_ops.text.encoders import load_text_encoder

from common import machine, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=20_000)
    parser.add_argument("--captions", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")

    cfg = SynthConfig(n=args.scenes, resolution=64)
    start = time.perf_counter()
    count = sum(1 for _ in synth_scenes(cfg, workers=args.workers))
    render = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = ingest(
            synth_source(cfg, workers=args.workers),
            Path(tmp) / "data",
            IngestConfig(),
            progress=False,
        )
        full = time.perf_counter() - start
    print(
        table(
            ["step", "scenes", "seconds", "scenes/s"],
            [
                ["render + PNG (generator)", count, round(render, 1), round(count / render)],
                [
                    "data synth (render + validate + write)",
                    report.kept,
                    round(full, 1),
                    round(report.kept / full),
                ],
            ],
        )
    )

    encoder = load_text_encoder(TextConfig())
    captions = [r.caption for r in synth_scenes(SynthConfig(n=args.captions, seed=1), workers=0)]
    unique = list(dict.fromkeys(captions))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = build_cache(captions, encoder, Path(tmp) / "cache", progress=False)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (Path(tmp) / "cache").iterdir())
    per_10k = size / len(captions) * 10_000 / 2**20
    dense = 10_000 * encoder.max_length * encoder.dim * 2 / 2**20
    print(
        f"\n### Text encoder {encoder.name} ({encoder.dim}-d), {len(captions)} captions, "
        f"{len(unique)} distinct, stored length {manifest['stored_length']} tokens"
    )
    print(
        table(
            ["measure", "value"],
            [
                ["distinct captions encoded per second", round(len(unique) / seconds, 1)],
                ["captions served per second (with dedup)", round(len(captions) / seconds, 1)],
                ["cache MiB per 10,000 captions (this data)", round(per_10k, 2)],
                [f"dense fp16 at max_length {encoder.max_length}, MiB per 10,000", round(dense, 1)],
            ],
        )
    )
    assert np.isfinite(per_10k)


if __name__ == "__main__":
    main()
