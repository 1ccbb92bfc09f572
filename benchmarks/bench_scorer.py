"""The contrastive scorer on a trained project (issue #14): validation and best-of-N.

    python benchmarks/bench_scorer.py [--models artifacts/models] [--scorer artifacts/scorer]
                                      [--per-category 32] [--n 1 2 4 8]

On the held-out prompts (the evaluate stage's balanced, interleaved selection), the base
stage alone at its resolution (reranking acts after the first stage):

1. validation: the scorer's cosine of each plain (N = 1) sample with its prompt against
   the exact oracle's verdict: AUC of correct vs incorrect and Spearman's rho;
2. best of N for each N: balanced alignment (and per category), KID against the same
   prompts' real images, and seconds per prompt, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from imagen_ops.cascade import Cascade, load_stage
from imagen_ops.config import load_params
from imagen_ops.eval.alignment import CATEGORIES, alignment_report, judge_all
from imagen_ops.eval.evaluate import held_out, scorer_cosines
from imagen_ops.eval.fid import InceptionFeatures, fid_kid
from imagen_ops.eval.ranking import auc, spearman
from imagen_ops.images import to_uint8
from imagen_ops.scorer import load_scorer

from common import machine, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", default="artifacts/models")
    parser.add_argument("--scorer", default="artifacts/scorer")
    parser.add_argument("--prepared", default="artifacts/prepared")
    parser.add_argument("--cache", default="artifacts/text_cache")
    parser.add_argument("--per-category", type=int, default=32)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    params = load_params(args.params)
    print(f"machine: {machine()}\n")

    cfg = params.eval.model_copy(update={"per_category": args.per_category})
    scorer = load_scorer(args.scorer)
    prompts = held_out(Path(args.prepared), Path(args.cache), params.text, cfg, scorer.text_layer)
    scenes = [json.loads(s) for s in prompts.scenes]
    base_name = params.stage_names()[0]
    cascade = Cascade([load_stage(Path(args.models) / base_name)], params.text, scorer)
    settings = params.sample.for_stages([0], len(params.stages))
    seeds = [settings.seed + k for k in range(len(prompts.records))]
    extractor = InceptionFeatures()
    real = extractor(prompts.real_images(cascade.stages[0].resolution))

    rows, validation = [], {}
    for n in args.n:
        start = time.perf_counter()
        images = to_uint8(
            cascade.sample(
                prompts.text, settings.updated(rerank=n), seeds, scorer_text=prompts.scorer_text
            )
        )
        seconds = (time.perf_counter() - start) / len(images)
        judged = judge_all(list(images), scenes)
        report = alignment_report(list(images), scenes, judged)
        kid = fid_kid(real, extractor(images), with_fid=False)
        rows.append(
            {
                "N": n,
                "balanced": report["balanced"],
                **{c: report[c] for c in CATEGORIES},
                "kid": kid["kid_mean"],
                "s_per_prompt": seconds,
            }
        )
        if n == 1:
            cosine = scorer_cosines(scorer, images, prompts.scorer_text)
            correct = np.array([j.correct for j in judged])
            validation = {
                "images": len(images),
                "correct": int(correct.sum()),
                "auc": auc(cosine, correct),
                "spearman": spearman(cosine, correct),
            }
        print(f"N = {n}: {rows[-1]}", flush=True)
    print("\nvalidation against the exact oracle (N = 1 samples):", validation)
    print("\n" + table(list(rows[0]), [list(r.values()) for r in rows]))
    if args.out:
        Path(args.out).write_text(json.dumps({"validation": validation, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
