"""PNG charts: beside their table, identical bytes for identical rows, no version stamp."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from imagen_ops.charts import chart_path, loss_chart, save_chart, sweep_chart


def test_chart_path_is_beside_the_table() -> None:
    assert chart_path("reports/train_base.csv") == Path("reports/train_base.png")


def test_loss_chart_is_deterministic_and_skips_non_finite(tmp_path) -> None:
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 50)]
    rows[10]["loss"] = math.nan  # a skipped window is a gap, not a crash
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    save_chart(loss_chart(rows, "stage base"), first)
    save_chart(loss_chart(rows, "stage base"), second)
    assert first.read_bytes() == second.read_bytes()
    assert b"Software" not in first.read_bytes()  # no matplotlib version in tracked bytes
    image = np.asarray(Image.open(first).convert("RGB"))
    assert image.shape == (320, 500, 3) and (image != 255).any()


def test_sweep_chart_draws_both_curves() -> None:
    sweep = [
        {"guidance": w, "alignment.balanced": a, "kid_mean": k, "kid_std": 0.01}
        for w, a, k in ((1.0, 0.2, 0.1), (3.0, 0.5, 0.2))
    ]
    image = np.asarray(sweep_chart(sweep)).astype(int)
    blue = (abs(image - (31, 119, 180)).sum(-1) < 30).sum()  # tab:blue: alignment
    red = (abs(image - (214, 39, 40)).sum(-1) < 30).sum()  # tab:red: KID
    assert blue > 50 and red > 50
