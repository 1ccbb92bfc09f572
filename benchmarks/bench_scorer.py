"""The contrastive scorer on a trained project (issue #14): validation and best-of-N.

    python benchmarks/bench_scorer.py [--models artifacts/models] [--scorer artifacts/scorer]
                                      [--per-category 32] [--n 1 2 4 8]

On the held-out prompts (the evaluate stage's balanced, interleaved selection), the base
stage alone at its resolution (reranking acts after the first stage):

1. validation: the scorer's cosine of each plain (N = 1) sample with its prompt against
   the exact oracle's verdict: AUC of correct vs incorrect and Spearman's rho;
2. best of N for each N: balanced alignment (and per category), KID against the same
   prompts' real images, and seconds per prompt, measured side by side in one run;
3. the scoring's share of best of N (largest N): the scorer called once per prompt, as
   `Cascade.sample` calls it (a pick must not depend on the other prompts), against one
   call over every candidate, in ms per prompt beside the sampling's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from imagen_ops.cascade import Cascade, candidate_scores, load_stage
from imagen_ops.config import load_params
from imagen_ops.eval.alignment import CATEGORIES, alignment_report, judge_all
from imagen_ops.eval.evaluate import held_out, scorer_cosines
from imagen_ops.eval.fid import InceptionFeatures, fid_kid
from imagen_ops.eval.ranking import auc, spearman
from imagen_ops.images import to_uint8
from imagen_ops.scorer import Scorer, load_scorer
from imagen_ops.text.encoders import TextEmbeddings

from common import machine, median_seconds, parse_args, path_options, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    path_options(parser, "models", "scorer", "prepared", "cache")
    parser.add_argument("--per-category", type=int, default=32)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parse_args(parser)
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
    scoring = scoring_cost(scorer, prompts.scorer_text, max(args.n), cascade.stages[0].resolution)
    scoring["sampling_ms_per_prompt"] = rows[-1]["s_per_prompt"] * 1e3
    print("\nscoring best of N, ms per prompt:", scoring)
    print("\nvalidation against the exact oracle (N = 1 samples):", validation)
    print("\n" + table(list(rows[0]), [list(r.values()) for r in rows]))
    if args.out:
        result = {"validation": validation, "rows": rows, "scoring": scoring}
        Path(args.out).write_text(json.dumps(result, indent=2))


@torch.no_grad()
def scoring_cost(scorer: Scorer, text: TextEmbeddings, n: int, resolution: int) -> dict:
    """ms per prompt to score n candidates each: one call per prompt (what best of N does,
    its text at its own width) against one call over all (the pixels do not matter)."""
    prompts = len(text)
    images = torch.rand(prompts * n, 3, resolution, resolution) * 2 - 1
    every = text[torch.arange(prompts).repeat_interleave(n)]
    per, one = (
        median_seconds(fn, repeats=5, warmup=1) / prompts * 1e3
        for fn in (
            lambda: candidate_scores(scorer, images, text, n),
            lambda: scorer.similarity(images, every),
        )
    )
    return {"n": n, "prompts": prompts, "per_prompt_calls": per, "one_call": one}


if __name__ == "__main__":
    main()
