"""The champion / challenger gate: pure logic, no MLflow, so it is tested exhaustively.

Two gates. The paired gate (the default where a golden prompt set exists): champion and
challenger are sampled on the same golden prompts with the same seeds, the exact oracle
marks each image correct or not, and the challenger is promoted only if its accuracy is
higher by more than `margin` and an exact one-sided McNemar test on the discordant pairs
rejects "no better" at the configured confidence. The metric gate (data without scene
specs): a dotted key of reports/metrics.json, "auto" meaning the balanced shapes alignment
when the evaluation has one, otherwise FID; whether higher is better follows from the
name (FID and KID are distances).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Decision", "decide", "lookup_metric", "mcnemar_p", "paired_decide", "primary_metric"]

LOWER_IS_BETTER = ("fid", "kid")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None
    greater_is_better: bool
    margin: float
    test: str = "threshold"  # or "mcnemar" (the paired gate)
    p_value: float | None = None
    n: int | None = None  # golden prompts both models were sampled on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lookup_metric(metrics: dict[str, Any], name: str) -> float | None:
    """Value of a dotted key (e.g. alignment.balanced), None when absent or null."""
    node: Any = metrics
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None else float(node)


def primary_metric(metrics: dict[str, Any], configured: str = "auto") -> tuple[str, float, bool]:
    """(name, value, greater_is_better) of the metric that decides promotions."""
    if configured == "auto":
        configured = (
            "alignment.balanced"
            if lookup_metric(metrics, "alignment.balanced") is not None
            else "fid"
        )
    value = lookup_metric(metrics, configured)
    if value is None:
        raise KeyError(
            f"metric {configured!r} is not in the evaluation's metrics "
            f"(top-level keys: {sorted(metrics)}); set registry.primary_metric"
        )
    greater = not any(configured.split(".")[-1].startswith(p) for p in LOWER_IS_BETTER)
    return configured, value, greater


def decide(
    metric: str,
    challenger: float,
    champion: float | None,
    greater_is_better: bool,
    margin: float = 0.0,
    champion_version: str | None = None,
) -> Decision:
    """Promote when there is no champion, the champion was never measured on `metric`, or
    the challenger is better by more than `margin`."""
    if champion is None:
        reason = (
            "no champion yet"
            if champion_version is None
            else f"champion version {champion_version} has no {metric}: promoted"
        )
        return Decision(True, reason, metric, challenger, None, greater_is_better, margin)
    gain = challenger - champion if greater_is_better else champion - challenger
    better = gain > margin
    direction = "higher" if greater_is_better else "lower"
    reason = (
        f"challenger {metric}={challenger:.4g} vs champion {champion:.4g} "
        f"({direction} is better, margin {margin:g}): "
        + ("promoted" if better else "champion kept")
    )
    return Decision(better, reason, metric, challenger, champion, greater_is_better, margin)


def mcnemar_p(wins: int, losses: int) -> float:
    """One-sided exact McNemar p-value: P[X >= wins] for X ~ Binomial(wins + losses, 1/2),
    where wins (losses) count prompts only the challenger (only the champion) got right."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def paired_decide(
    champion: np.ndarray,
    challenger: np.ndarray,
    confidence: float,
    margin: float = 0.0,
    metric: str = "golden.accuracy",
) -> Decision:
    """The paired gate on per-prompt correctness of the two models (same prompts, seeds)."""
    champion, challenger = np.asarray(champion, bool), np.asarray(challenger, bool)
    if champion.shape != challenger.shape or champion.ndim != 1 or not len(champion):
        raise ValueError(f"paired verdicts need equal, non-empty 1-d arrays ({champion.shape})")
    wins = int(np.sum(challenger & ~champion))
    losses = int(np.sum(champion & ~challenger))
    a, b = float(challenger.mean()), float(champion.mean())
    p = mcnemar_p(wins, losses)
    alpha = 1.0 - confidence
    promote = a - b > margin and p <= alpha
    reason = (
        f"golden set (N={len(champion)}): challenger {a:.3f} vs champion {b:.3f}, "
        f"{wins} prompts won / {losses} lost, McNemar p={p:.3g} "
        f"(needs <= {alpha:.3g} and a gain > {margin:g}): "
        + ("promoted" if promote else "champion kept")
    )
    return Decision(promote, reason, metric, a, b, True, margin, "mcnemar", p, len(champion))
