"""Does the model read words or a template? The held-out scenes under other captions (#13).

    python benchmarks/probe_captions.py [--models artifacts/models] [--per-category 64]
                                        [--seed 0] [--out rows.json]

The evaluate stage's held-out scenes (its balanced selection), each sampled under captions
that describe the same scene in other words, judged against the scene by the exact
evaluator. The base stage alone at its resolution, as `bench_scorer.py` does (what a
cascade gets wrong is decided there: BENCHMARKS, "Where the demo's remaining errors are
made"). Rows:

- `template`: the generator's template caption (phrasing 0), encoded afresh (the cache's
  row, up to rounding, for data without `data.synth.caption_variety`);
- `phrasings`: the generator's other phrasings ("left of", "and also", "exactly three"),
  the ones `caption_variety` trains on, in turn;
- `order`: the same words in the other order: binding's two objects swapped, position's
  relation inverted with its objects ("a blue square to the right of a red circle"). Both
  forms occur in training, on other scenes;
- `reworded`: words the generator never writes: "one", "with", digits, "on the left of",
  "over", "under".

Every image of a scene keeps the scene's seed, so the rows differ by the caption alone.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from imagen_ops.cascade import Cascade, load_stage
from imagen_ops.config import load_params
from imagen_ops.data.shapes import (
    NUMBERS,
    OPPOSITE,
    PHRASINGS,
    RELATIONS,
    Scene,
    caption_for,
)
from imagen_ops.eval.alignment import CATEGORIES, alignment_report, judge_all
from imagen_ops.eval.evaluate import held_out
from imagen_ops.images import to_uint8

from common import machine, parse_args, path_options, table

REWORDED_RELATIONS = {
    "left_of": "on the left of",
    "right_of": "on the right of",
    "above": "over",
    "below": "under",
}


def order(scene: Scene) -> str:
    """The scene's template caption with its two objects named the other way round."""
    if scene.category not in ("binding", "position"):
        return caption_for(scene)
    a, b = scene.objects
    relation = OPPOSITE[scene.relation] if scene.relation else None
    return caption_for(replace(scene, objects=(b, a), relation=relation))


def reworded(scene: Scene) -> str:
    """The template caption with its one structural word replaced by one it never has."""
    caption, obj = caption_for(scene), scene.objects[0]
    if scene.category == "single":
        return f"one {obj.color} {obj.shape}"
    if scene.category == "binding":
        return caption.replace(" and ", " with ", 1)
    if scene.category == "counting":
        return caption.replace(NUMBERS[len(scene.objects)], str(len(scene.objects)), 1)
    return caption.replace(RELATIONS[scene.relation], REWORDED_RELATIONS[scene.relation], 1)


def phrasings(scene: Scene, k: int) -> str:
    return caption_for(replace(scene, phrasing=1 + k % (PHRASINGS[scene.category] - 1)))


CAPTIONS: dict[str, Callable[[Scene, int], str]] = {
    "template": lambda scene, k: caption_for(scene),
    "phrasings": phrasings,
    "order": lambda scene, k: order(scene),
    "reworded": lambda scene, k: reworded(scene),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    path_options(parser, "models", "prepared", "cache")
    parser.add_argument("--per-category", type=int, default=64)
    parser.add_argument("--seed", type=int, help="default: sample.seed")
    parser.add_argument("--rows", nargs="+", default=list(CAPTIONS), choices=list(CAPTIONS))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parse_args(parser)
    params = load_params(args.params)
    print(f"machine: {machine()}\n")

    cfg = params.eval.model_copy(update={"per_category": args.per_category})
    prompts = held_out(Path(args.prepared), Path(args.cache), params.text, cfg)
    specs = [json.loads(s) for s in prompts.scenes]
    scenes = [replace(Scene.from_dict(s), phrasing=0) for s in specs]
    cascade = Cascade([load_stage(Path(args.models) / params.stage_names()[0])], params.text)
    settings = params.sample.for_stages([0], len(params.stages))
    if args.seed is not None:
        settings = settings.updated(seed=args.seed)
    seeds = [settings.seed + k for k in range(len(scenes))]

    rows: list[dict[str, Any]] = []
    for name in args.rows:
        captions = [CAPTIONS[name](s, k) for k, s in enumerate(scenes)]
        images = list(to_uint8(cascade.sample(captions, settings, seeds)))
        report = alignment_report(images, specs, judge_all(images, specs))
        rows.append({"captions": name, "balanced": report["balanced"]})
        rows[-1].update({c: report[c] for c in CATEGORIES})
        rows[-1]["single_exact"] = report["single_exact"]
        print(f"{name}: {rows[-1]}  e.g. {captions[1]!r}, {captions[3]!r}", flush=True)
    print("\n" + table(list(rows[0]), [list(r.values()) for r in rows]))
    if args.out:
        Path(args.out).write_text(json.dumps({"seed": settings.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
