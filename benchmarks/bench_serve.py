"""Serving under load: status codes, latency percentiles and memory of `mlflow models serve`.

Runs the suite's load test (tests/test_registry.py::test_mlflow_models_serve_under_load:
200 requests, 4 at a time, mixing good, malformed, over-budget and past-deadline ones
against the tiny test cascade) and prints its figures as a table for BENCHMARKS.md.

    python benchmarks/bench_serve.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, table

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_registry.py::test_mlflow_models_serve_under_load"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "load.json"
        env = {**os.environ, "IMAGEN_OPS_LOAD_REPORT": str(report)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        summary = json.loads(report.read_text())
    print(machine())
    print(
        f"{summary['requests']} requests in {summary['wall_s']} s; server RSS "
        f"{summary['rss_mb_start']} MiB after warm-up, {summary['rss_mb_end']} MiB after"
    )
    rows = [
        [kind, s["n"], "/".join(map(str, s["status"])), s["p50_ms"], s["p95_ms"], s["max_ms"]]
        for kind in ("good", "bad", "deadline")
        for s in [summary[kind]]
    ]
    print(table(["requests", "n", "status", "p50 ms", "p95 ms", "max ms"], rows))


if __name__ == "__main__":
    main()
