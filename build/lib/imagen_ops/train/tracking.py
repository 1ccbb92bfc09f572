"""Where training metrics go: always a CSV and its chart (DVC), optionally a tracker.

The trainer talks to the small `Tracker` interface; the MLflow implementation lives in
`imagen_ops.registry.tracking` and imports MLflow lazily, so training runs on machines
without MLflow.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from imagen_ops.charts import chart_path, loss_chart, save_chart
from imagen_ops.files import write_text_atomic

__all__ = ["MetricsCSV", "NullTracker", "Tracker"]


class Tracker(Protocol):
    enabled: bool  # False: nothing is kept, so the trainer skips work done only for it

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: Image.Image, name: str) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking disabled."""

    enabled = False

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Image.Image, name: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MetricsCSV:
    """Rows of metrics, rewritten atomically as a whole (the history is part of a checkpoint,
    so a resumed run's CSV continues where the checkpoint left it)."""

    def __init__(self, path: str | Path, rows: list[dict[str, float]] | None = None):
        self.path, self.rows = Path(path), list(rows or [])

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())

    def write_chart(self, title: str) -> None:
        """The loss curve beside the CSV (DVC's image plot of the stage; renders offline)."""
        if self.rows:
            save_chart(loss_chart(self.rows, title), chart_path(self.path))
