"""Sampler and guidance studies on a trained base stage (issue: quality and speed).

    python benchmarks/study.py sampler  [--models artifacts/models] [--n 256]
    python benchmarks/study.py guidance [--models artifacts/models] [--n 256]

Both sample the base stage for the first N validation prompts (embeddings from the cache)
and score the images at the base resolution: exact shapes alignment, and KID against the
same prompts' real images (unbiased, with its standard deviation over subsets).

* sampler: ancestral, DDIM, DPM-Solver++(2M) and its SDE form at 10, 25 and 50 steps,
  with the guidance and thresholding of params.yaml; the reference is 250 ancestral steps.
* guidance: w in {1, 1.5, 2, 3, 5, 7} with static and dynamic thresholding, at the
  default sampler and steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from imagen_ops.cascade import Cascade, load_stage
from imagen_ops.config import load_params
from imagen_ops.data.prepare import PreparedData
from imagen_ops.diffusion.samplers import SAMPLERS
from imagen_ops.eval.evaluate import sample_images, score_images
from imagen_ops.eval.fid import InceptionFeatures
from imagen_ops.text.cache import EmbeddingCache

from common import machine, parse_args, path_options, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["sampler", "guidance"])
    parser.add_argument("--params", default="params.yaml")
    path_options(parser, "models", "prepared", "cache")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parse_args(parser)
    params = load_params(args.params)
    print(f"machine: {machine()}\n")

    prepared = PreparedData.open(Path(args.prepared))
    cache = EmbeddingCache.open(Path(args.cache), params.text, prepared.table["caption"].tolist())
    records = prepared.indices("val")[: args.n]
    captions = prepared.table["caption"].iloc[records].tolist()
    scenes = prepared.table["scene"].iloc[records].tolist()
    base_name = params.stage_names()[0]
    base = load_stage(Path(args.models) / base_name)
    cascade = Cascade([base], params.text)
    text, seeds = cache.lookup(records), [params.sample.seed + k for k in range(len(records))]
    extractor = InceptionFeatures()
    real = extractor(prepared.images(base.resolution)[records])
    settings0 = params.sample.for_stages([0], len(params.stages))

    if args.kind == "sampler":
        grid = [("ancestral", 250)] + [(s, n) for s in SAMPLERS for n in (10, 25, 50)]
        configs = [settings0.model_copy(update={"sampler": s, "steps": (n,)}) for s, n in grid]
    else:
        configs = [
            settings0.model_copy(update={"guidance": (w,), "thresholding": th})
            for th in ("static", "dynamic")
            for w in (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
        ]

    rows = []
    for settings in configs:
        start = time.perf_counter()
        images, _ = sample_images(cascade, text, settings, seeds, progress=False)
        seconds = (time.perf_counter() - start) / len(images)
        m = score_images(
            images, captions, scenes, real, extractor, params.eval, with_fid=False, device="cpu"
        )
        a = m["alignment"]
        rows.append(
            {
                "sampler": settings.sampler,
                "steps": settings.steps[0],
                "guidance": settings.guidance[0],
                "thresholding": settings.thresholding,
                "overall": a["overall"],
                "single": a["single"],
                "color": a["color_accuracy"],
                "kid_mean": m["kid_mean"],
                "kid_std": m["kid_std"],
                "s_per_image": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    keys = list(rows[0])
    print(
        f"\n### {args.kind} study, stage {base_name} ({base.resolution} px), {len(records)} "
        "validation prompts"
    )
    print(table(keys, [[r[k] for k in keys] for r in rows]))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
