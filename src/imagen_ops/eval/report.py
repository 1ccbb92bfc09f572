"""The evaluation report: one self-contained HTML page (images embedded)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from imagen_ops.charts import sweep_chart
from imagen_ops.eval.alignment import FAILURES

__all__ = ["add_header", "write_report"]

HEADER_END = "<!-- end of header -->"


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(value: Any) -> str:
    """A cell: 4 significant digits, n/a for a missing value, lists comma-separated."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        if key == "failures":  # a table of its own
            continue
        if isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, _fmt(value)))
    return rows


def _failure_table(metrics: dict[str, Any]) -> str:
    """Failure reasons (columns) per category (rows): how many prompts failed that way."""
    alignment = metrics.get("alignment") or {}
    failures = alignment.get("failures")
    if not failures:
        return ""
    head = "".join(f"<th>{html.escape(r)}</th>" for r in ("category", "n", "accuracy", *FAILURES))
    rows = "".join(
        f"<tr><td>{html.escape(cat)}</td><td>{alignment.get(f'n_{cat}')}</td>"
        f"<td>{html.escape(_fmt(alignment.get(cat)))}</td>"
        + "".join(f"<td>{counts.get(r, 0)}</td>" for r in FAILURES)
        + "</tr>"
        for cat, counts in failures.items()
    )
    return f"<h2>Alignment failures</h2><table><tr>{head}</tr>{rows}</table>"


def _header_rows(fields: dict[str, Any]) -> str:
    return "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in fields.items()
    )


def add_header(page: str, fields: dict[str, Any]) -> str:
    """The report with more identity rows on top (registration adds the model version,
    commit, data version and date, which the DVC-tracked report cannot know or must not
    hold: it stays byte-identical on identical reruns)."""
    return page.replace(HEADER_END, _header_rows(fields) + HEADER_END, 1)


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    sweep: list[dict[str, Any]],
    grid: Image.Image,
    chart: Image.Image | None = None,
) -> None:
    """Write sweep.png and report.html (images embedded, so the page travels alone)."""
    if chart is None and sweep:
        chart = sweep_chart(sweep)
    if chart is not None:
        chart.save(out_dir / "sweep.png")
    table = "\n".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _rows(metrics)
    )
    sweep_rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in r) + "</tr>" for r in sweep
    )
    header = _header_rows(
        {
            "model (sha256 of the weights)": metrics.get("model_sha256"),
            "scorer (sha256)": metrics.get("scorer_sha256"),
            "evaluation set (sha256)": metrics.get("eval_set_sha256"),
            "images": metrics.get("num_images"),
            "resolution": metrics.get("resolution"),
        }
    )
    sweep_head = "".join(f"<th>{html.escape(c)}</th>" for c in (sweep[0] if sweep else []))
    chart_img = f'<img src="{_data_uri(chart)}" alt="guidance sweep">' if chart else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>imagen-ops evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{padding:2px 10px;border-bottom:1px solid #ddd}}</style></head><body>
<h1>imagen-ops evaluation</h1>
<table>{header}{HEADER_END}</table>
<h2>Samples</h2><img src="{_data_uri(grid)}" alt="sample grid">
{_failure_table(metrics)}
<h2>Metrics</h2><table>{table}</table>
<h2>Guidance sweep</h2>{chart_img}<table><tr>{sweep_head}</tr>{sweep_rows}</table>
</body></html>
"""
    (out_dir / "report.html").write_text(page)
