"""Run the retraining flow on the schedule of params.yaml (`schedule` section).

    python -m flows.serve            # a long-running process that runs the flow on schedule
    python -m flows.serve --deploy   # register a deployment on the work pool `schedule.work_pool`

`--deploy` is for scale: `prefect work-pool create imagen-ops-process --type process` once,
then `prefect worker start --pool imagen-ops-process` on each machine that should run it (a
`docker` or `kubernetes` pool runs the workers on GPU nodes instead). The deployment runs
one flow run at a time whichever worker takes it (a later one waits): the project lock and
the champion alias's compare-and-set lock are files on one machine. The deployment names
the project by this machine's absolute path (its `project` parameter and code source), so
every worker needs the project at that path (a shared mount, or the same checkout path);
the serving process also runs one flow run at a time. The cron, its time zone, the
deployment's name and the pool are read from params.yaml and nowhere else.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows.retrain import PARAMS, retrain
from imagen_ops.config import ScheduleConfig, load_params

ENTRYPOINT = "flows/retrain.py:retrain"


def deployment_options(cfg: ScheduleConfig, project: Path) -> dict[str, Any]:
    """The name, schedule, parameters and tags both ways of running share."""
    from prefect.schedules import Cron

    return {
        "name": cfg.deployment,
        "schedule": Cron(cfg.cron, timezone=cfg.timezone),
        "parameters": {"project": str(project.resolve())},
        "tags": ["imagen-ops", "retrain"],
    }


def deploy(project: Path) -> Any:
    """Register the deployment on `schedule.work_pool`; returns its id."""
    cfg = load_params(project / PARAMS).schedule
    source = retrain.from_source(source=str(project.resolve()), entrypoint=ENTRYPOINT)
    return source.deploy(
        work_pool_name=cfg.work_pool,
        concurrency_limit=1,  # across machines: their locks are local files
        print_next_steps=False,
        **deployment_options(cfg, project),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".")
    parser.add_argument(
        "--deploy", action="store_true", help="deploy to schedule.work_pool instead of serving"
    )
    args = parser.parse_args()
    project = Path(args.project)
    if args.deploy:
        deploy(project)
    else:
        cfg = load_params(project / PARAMS).schedule
        # one run at a time: a run due while another runs waits instead of failing on the lock
        retrain.serve(limit=1, **deployment_options(cfg, project))


if __name__ == "__main__":
    main()
