"""Cascades from anywhere: a folder of stage directories, a packaged cascade, or a logged
model (models:/NAME@ALIAS, models:/NAME/3, runs:/...).

Only a registry URI imports MLflow, and only when it is resolved: sampling from a folder
runs where MLflow is not installed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from imagen_ops.cascade import CASCADE_FILE, Cascade
from imagen_ops.config import RegistryConfig, SampleConfig, ServeConfig, TextConfig

__all__ = [
    "ARTIFACT",
    "cascade_dir",
    "download_cascade",
    "is_registry_uri",
    "load_cascade",
    "packaged_settings",
    "resolve_stage_dir",
]

ARTIFACT = "cascade"  # the artifact key under which a logged model holds its cascade
URI_SCHEMES = ("models:/", "runs:/")


def is_registry_uri(model: str) -> bool:
    return model.startswith(URI_SCHEMES)


def download_cascade(uri: str, registry: RegistryConfig | None = None) -> Path:
    """Local copy of a logged model's cascade; a one-line error when the store, the model
    or the alias does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from imagen_ops.registry.tracking import open_store, tracking_uri

    registry = registry or RegistryConfig()
    open_store(registry)
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        first = str(err.message).strip().splitlines()[0]
        raise FileNotFoundError(
            f"{uri}: not found in the MLflow store {tracking_uri(registry)} ({first}); see "
            f"the registered versions with `mlflow ui --backend-store-uri {tracking_uri(registry)}`"
        ) from None
    for candidate in (root / "artifacts" / ARTIFACT, root / ARTIFACT):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{uri} holds no imagen-ops cascade (no artifacts/{ARTIFACT})")


def load_cascade(
    model: str,
    stage_names: Sequence[str] | None = None,
    text: TextConfig | None = None,
    registry: RegistryConfig | None = None,
    device: str | torch.device = "cpu",
) -> Cascade:
    """A cascade from a registry URI, a packaged cascade directory (it names its stages and
    encoder), or a folder of stage directories ordered by `stage_names` (artifacts/models)."""
    return Cascade.from_dir(cascade_dir(model, registry), stage_names, text, device)


def cascade_dir(model: str, registry: RegistryConfig | None = None) -> Path:
    """The local folder of a cascade: `model` itself, or a registry URI's download."""
    return download_cascade(model, registry) if is_registry_uri(model) else Path(model)


def resolve_stage_dir(source: str, stage: str, registry: RegistryConfig | None = None) -> Path:
    """A trained stage's directory: itself, a cascade directory holding it, or a URI."""
    path = cascade_dir(source, registry)
    if (path / stage / "config.json").is_file():
        return path / stage
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"--init-from {source}: no stage {stage!r} there (no config.json)")


def packaged_settings(root: Path) -> tuple[SampleConfig, ServeConfig]:
    """The sampling defaults and serving limits a packaged cascade carries (the code's
    defaults for a folder of stages or a cascade packaged before they were carried)."""
    path = root / CASCADE_FILE
    spec = json.loads(path.read_text()) if path.is_file() else {}
    return (
        SampleConfig.model_validate(spec.get("sample", {})),
        ServeConfig.model_validate(spec.get("serve", {})),
    )
