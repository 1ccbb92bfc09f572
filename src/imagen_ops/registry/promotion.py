"""The champion / challenger gate: pure logic, no MLflow, so it is tested exhaustively.

The primary metric is a dotted key of reports/metrics.json. "auto" means the overall
shapes alignment when the evaluation has one (synthetic data), otherwise FID. Whether
higher is better follows from the metric's name (FID and KID are distances).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Decision", "decide", "lookup_metric", "primary_metric"]

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lookup_metric(metrics: dict[str, Any], name: str) -> float | None:
    """Value of a dotted key (e.g. alignment.overall), None when absent or null."""
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
            "alignment.overall"
            if lookup_metric(metrics, "alignment.overall") is not None
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
