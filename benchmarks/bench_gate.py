"""The paired promotion gate's error rates on real models.

    python benchmarks/bench_gate.py --champion DIR --challenger DIR [--seeds 20] [--per-category 8]

For each of `--seeds` golden sets (same generator, seeds 0..K-1), both cascades are sampled
on the set's prompts with its per-prompt seeds and the gate decides, exactly as
`imagen-ops register` does (registry/gate.py, promotion.paired_decide). With the same
folder for both, the rate of promotions is the false-promotion rate; with a weaker
champion, it is the gate's power. Identical weights give identical images, so when the
two folders are the same cascade one sampling pass per set serves both arms.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from imagen_ops.cascade import Cascade, cascade_digest
from imagen_ops.config import load_params
from imagen_ops.eval.golden import make_golden
from imagen_ops.registry.gate import golden_correct
from imagen_ops.registry.promotion import paired_decide

from common import machine, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--champion", required=True)
    parser.add_argument("--challenger", required=True)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--per-category", type=int, default=8)
    args = parser.parse_args()
    params = load_params(args.params)
    names, cfg = params.stage_names(), params.registry
    same = cascade_digest(args.champion, names) == cascade_digest(args.challenger, names)
    champion = Cascade.from_dir(Path(args.champion), names, params.text)
    challenger = champion if same else Cascade.from_dir(Path(args.challenger), names, params.text)
    print(f"machine: {machine()}; same weights: {same}\n")
    rows, promoted = [], 0
    for seed in range(args.seeds):
        golden = make_golden(args.per_category, seed=1000 * seed)
        theirs = golden_correct(champion, golden, params.sample, "champion")
        mine = theirs if same else golden_correct(challenger, golden, params.sample, "challenger")
        d = paired_decide(theirs, mine, cfg.confidence, cfg.margin)
        promoted += d.promote
        rows.append(
            [seed, len(golden), round(d.champion, 3), round(d.challenger, 3), d.p_value, d.promote]
        )
    print(table(["golden seed", "N", "champion", "challenger", "p", "promoted"], rows))
    gains = [r[3] - r[2] for r in rows]
    print(
        f"\npromoted {promoted}/{args.seeds} (confidence {cfg.confidence}, margin {cfg.margin});"
        f" median gain {statistics.median(gains):.3f}"
    )


if __name__ == "__main__":
    main()
