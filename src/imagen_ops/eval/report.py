"""The evaluation report: a guidance-sweep chart and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["add_header", "sweep_chart", "write_report"]

HEADER_END = "<!-- end of header -->"


def sweep_chart(sweep: list[dict[str, Any]]) -> Image.Image:
    """Alignment and KID against the guidance weight (the paper's trade-off curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ws = [r["guidance"] for r in sweep]
    if any(r["alignment"] is not None for r in sweep):
        ax.plot(ws, [r["alignment"] for r in sweep], "o-", color="tab:blue", label="alignment")
    ax.set_xlabel("guidance weight w (base stage)")
    ax.set_ylabel("alignment (higher is better)")
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


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
        if isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, _fmt(value)))
    return rows


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
    out_dir: Path, metrics: dict[str, Any], sweep: list[dict[str, Any]], grid: Image.Image
) -> None:
    """Write sweep.png and report.html (images embedded, so the page travels alone)."""
    chart = sweep_chart(sweep) if sweep else None
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
<h2>Metrics</h2><table>{table}</table>
<h2>Guidance sweep</h2>{chart_img}<table><tr>{sweep_head}</tr>{sweep_rows}</table>
</body></html>
"""
    (out_dir / "report.html").write_text(page)
