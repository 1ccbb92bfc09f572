"""MLflow tracking: the store, the experiment, and the trainer's `Tracker`."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

from PIL import Image

from imagen_ops.config import RegistryConfig

__all__ = [
    "KIND_TAG",
    "PARENT_RUN_ENV",
    "MLflowTracker",
    "configure",
    "end_stale_runs",
    "follow_moved_store",
    "open_store",
    "sqlite_file",
    "tracking_uri",
    "training_tracker",
]

log = logging.getLogger(__name__)

KIND_TAG = "imagen_ops.kind"
"""A run tag: what made the run (`retrain`: a flow run; `train`: a stage's training)."""

PARENT_RUN_ENV = "IMAGEN_OPS_PARENT_RUN_ID"
"""When set (by the retraining flow), training runs nest under this MLflow run."""


def tracking_uri(cfg: RegistryConfig) -> str:
    """The store's URI: MLFLOW_TRACKING_URI wins over params.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def sqlite_file(cfg: RegistryConfig) -> Path | None:
    """The database file of a sqlite store; None for a server or another database."""
    uri = tracking_uri(cfg)
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def follow_moved_store(cfg: RegistryConfig) -> str | None:
    """Re-point a local store's artifact URIs after its project folder was moved.

    MLflow records absolute artifact locations (file:///old/project/mlflow/artifacts/...).
    When the experiment's recorded location no longer exists and the configured
    `artifact_root` (relative to the project) is elsewhere, every recorded URI and path
    under the old root is rewritten to the new one, in one transaction. Only the project's
    own store moves with it: the database and the artifact root inside the working
    directory, and the old root where the artifact root sat in the old project (a team's
    store elsewhere, opened from a project, is never re-pointed to this machine's folder).
    A location that still exists is never touched. Returns the old root when something was
    rewritten."""
    database = sqlite_file(cfg)
    if database is None or not database.is_file() or "://" in cfg.artifact_root:
        return None
    project, new_path = Path.cwd().resolve(), Path(cfg.artifact_root).resolve()
    if not (database.resolve().is_relative_to(project) and new_path.is_relative_to(project)):
        return None
    inside = new_path.relative_to(project).parts
    with sqlite3.connect(database) as db:
        row = db.execute(
            "SELECT artifact_location FROM experiments WHERE name = ?", (cfg.experiment,)
        ).fetchone()
        recorded = row[0] if row else None
        if not recorded or not recorded.startswith("file://"):
            return None
        old_path = Path(urllib.parse.unquote(urllib.parse.urlparse(recorded).path))
        if old_path == new_path or old_path.exists() or not new_path.is_dir():
            return None
        if old_path.parts[-len(inside) :] != inside:
            return None
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [c[1] for c in db.execute(f'PRAGMA table_info("{table}")') if _texty(c[2])]
            for column in columns:
                for old, new in ((recorded, new_path.as_uri()), (str(old_path), str(new_path))):
                    db.execute(
                        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                        f'WHERE substr("{column}", 1, ?) = ?',
                        (new, len(old) + 1, len(old), old),
                    )
    log.warning(
        "the MLflow store moved: artifact locations under %s now point to %s", old_path, new_path
    )
    return str(old_path)


def _texty(sql_type: str) -> bool:
    return any(t in sql_type.upper() for t in ("CHAR", "TEXT", "CLOB"))


def _use_store(cfg: RegistryConfig) -> None:
    """mlflow.set_tracking_uri(`tracking_uri`), a sqlite file made absolute (MLflow caches
    a store by its URI: a relative one would name the first project's database in a
    process that moves on to another), without MLflow's side effect of exporting
    MLFLOW_TRACKING_URI: that variable is the user's override, and once MLflow had set
    it every later project in the process (a serving flow, a notebook) used this store."""
    import mlflow

    database, before = sqlite_file(cfg), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(
        tracking_uri(cfg) if database is None else f"sqlite:///{database.resolve()}"
    )
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def open_store(cfg: RegistryConfig) -> None:
    """Point MLflow at an existing store to read from it; creates nothing (a missing
    sqlite file is an error that says how to get one)."""

    uri, database = tracking_uri(cfg), sqlite_file(cfg)
    if database is not None and not database.is_file():
        raise FileNotFoundError(
            f"no MLflow store at {uri}: nothing is registered there yet (run `make demo` in "
            "the project) or point MLFLOW_TRACKING_URI at the team's store"
        )
    follow_moved_store(cfg)
    _use_store(cfg)


def configure(cfg: RegistryConfig) -> str:
    """Point MLflow at the store (MLFLOW_TRACKING_URI wins over params.yaml) and make sure
    the experiment exists with its artifacts under `artifact_root` (a local folder only for
    a local store: a tracking server stores them where it is configured to, e.g. proxied
    `mlflow-artifacts:/`); returns its id."""
    import mlflow

    if (database := sqlite_file(cfg)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        follow_moved_store(cfg)
    _use_store(cfg)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location: str | None = cfg.artifact_root
    if "://" not in cfg.artifact_root:
        # a folder beside a local store; a tracking server keeps its own (proxied) default
        local = sqlite_file(cfg) is not None
        location = Path(cfg.artifact_root).resolve().as_uri() if local else None
    return mlflow.create_experiment(cfg.experiment, artifact_location=location)


class MLflowTracker:
    """Logs one training run; nested under the flow's run when PARENT_RUN_ENV is set."""

    enabled = True

    def __init__(self, cfg: RegistryConfig, run_name: str, tags: dict[str, str]):
        import mlflow

        self._mlflow = mlflow
        experiment_id = configure(cfg)
        parent = os.environ.get(PARENT_RUN_ENV)
        self.run = mlflow.MlflowClient().create_run(
            experiment_id,
            run_name=run_name,
            tags={**tags, **({"mlflow.parentRunId": parent} if parent else {})},
        )
        self.client = mlflow.MlflowClient()
        self.run_id = self.run.info.run_id
        log.info("MLflow run %s (%s)", self.run_id, run_name)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        )

    def log_image(self, image: Image.Image, name: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=name)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def start_run(cfg: RegistryConfig, run_name: str, tags: dict[str, str]) -> str:
    """Create an MLflow run (left open for others to log into) and return its id."""
    from mlflow import MlflowClient

    experiment_id = configure(cfg)
    return MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def training_tracker(cfg: RegistryConfig, stage: str) -> MLflowTracker:
    return MLflowTracker(cfg, f"train-{stage}", {"imagen_ops.stage": stage, KIND_TAG: "train"})


def end_stale_runs(cfg: RegistryConfig, kind: str) -> list[str]:
    """Mark KILLED every RUNNING run of `kind` and every RUNNING run nested under a run of
    `kind`, whether that one is still RUNNING or has ended: a training process killed
    alone (the OOM killer) leaves its run RUNNING under a flow run that went on.

    Call it only while holding the retraining lock: then no such run is alive, and one
    still RUNNING belongs to a flow run that was killed, or a stage it outlived."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    experiment_id = configure(cfg)  # first: a client made before it would use MLflow's default
    client = MlflowClient()
    kinds: dict[str, str | None] = {}

    def kind_of(run_id: str) -> str | None:
        if run_id not in kinds:
            try:
                kinds[run_id] = client.get_run(run_id).data.tags.get(KIND_TAG)
            except MlflowException:  # a parent deleted since
                kinds[run_id] = None
        return kinds[run_id]

    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        parent = run.data.tags.get("mlflow.parentRunId")
        if run.data.tags.get(KIND_TAG) == kind or (parent and kind_of(parent) == kind):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended
