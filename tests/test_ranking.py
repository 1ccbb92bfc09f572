"""AUC and Spearman against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from imagen_ops.eval.ranking import auc, spearman


def test_auc() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # a tie counts half
    assert auc(np.array([1.0, 2.0]), np.array([1, 1])) is None


def test_spearman() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # ranks (1, 2, 3) vs (1.5, 1.5, 3): Pearson of the ranks
    assert spearman(np.array([1, 2, 3]), np.array([0, 0, 1])) == pytest.approx(0.8660254)
    assert spearman(np.array([1, 2, 3]), np.array([5, 5, 5])) is None
