"""PNG charts of the pipeline's tables: the report embeds them, DVC shows them as image plots.

Image plots are what `dvc plots show` renders without JavaScript (its Vega plots load their
library from a CDN), so the pages open offline. Charts are pure functions of their rows, and
the PNG carries no timestamp or version chunk, so identical reruns write identical bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from imagen_ops.files import atomic_path

__all__ = ["chart_path", "loss_chart", "save_chart", "sweep_chart"]


def chart_path(table: str | Path) -> Path:
    """Where the chart of a CSV table goes: beside it, with the .png suffix."""
    return Path(table).with_suffix(".png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_image(fig: Any) -> Image.Image:
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def save_chart(image: Image.Image, path: Path) -> None:
    """Write a chart atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def sweep_chart(sweep: Sequence[dict[str, Any]]) -> Image.Image:
    """Alignment and KID against the guidance weight (the paper's trade-off curve)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ws = [r["guidance"] for r in sweep]
    if any(r["alignment.balanced"] is not None for r in sweep):
        alignment = [r["alignment.balanced"] for r in sweep]
        ax.plot(ws, alignment, "o-", color="tab:blue", label="alignment")
    ax.set_xlabel("guidance weight w (base stage)")
    ax.set_ylabel("alignment, balanced (higher is better)")
    if any(r["kid_mean"] is not None for r in sweep):
        ax2 = ax.twinx()
        ax2.errorbar(
            ws,
            [r["kid_mean"] for r in sweep],
            yerr=[r["kid_std"] for r in sweep],
            fmt="s--",
            color="tab:red",
            label="KID",
        )
        ax2.set_ylabel("KID (lower is better)")
        handles, labels = ax.get_legend_handles_labels()
        more, more_labels = ax2.get_legend_handles_labels()
        ax.legend(handles + more, labels + more_labels, loc="best", fontsize=8)
    ax.set_title("guidance sweep")
    return _to_image(fig)


def loss_chart(rows: Sequence[dict[str, float]], title: str) -> Image.Image:
    """Training loss (log scale) and learning rate against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    points = [(r["step"], r["loss"]) for r in rows if math.isfinite(r["loss"])]
    ax.plot([s for s, _ in points], [v for _, v in points], color="tab:blue", label="loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], ":", color="tab:gray", label="lr")
    ax2.set_ylabel("learning rate")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = ax2.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, loc="upper right", fontsize=8)
    ax.set_title(title)
    return _to_image(fig)
