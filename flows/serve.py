"""Serve the retraining flow on the cron schedule from params.yaml (`schedule` section).

    python -m flows.serve            # a long-running process that runs the flow on schedule

For scale, deploy the same flow to a work pool instead (see prefect.yaml): a `process`
pool on one machine, or `docker` / `kubernetes` pools whose workers run on GPU nodes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.retrain import retrain
from imagen_ops.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    schedule = load_params(Path(args.project) / args.params).schedule
    retrain.serve(
        name=schedule.deployment,
        cron=schedule.cron,
        parameters={"project": str(Path(args.project).resolve()), "params_file": args.params},
        tags=["imagen-ops", "retrain"],
    )


if __name__ == "__main__":
    main()
