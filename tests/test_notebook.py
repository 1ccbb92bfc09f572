"""notebooks/walkthrough.ipynb runs top to bottom on a tiny registered model (so it cannot rot)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from .conftest import register_params, tiny_params, write_metrics, write_params

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def _perturbed(models: Path, out: Path) -> Path:
    """A second cascade: the same stages with slightly other weights (another digest)."""
    shutil.copytree(models, out)
    for weights in out.glob("*/ema.safetensors"):
        state = load_file(str(weights))
        save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    return out


@pytest.mark.integration
def test_walkthrough_notebook_runs_on_a_registered_model(
    tiny_data, tiny_models, tmp_path, monkeypatch
) -> None:
    import nbclient
    import nbformat
    from mlflow.tracking._tracking_service import utils

    from imagen_ops.pipeline import train_settings
    from imagen_ops.registry.register import RegisterPaths
    from imagen_ops.registry.tracking import training_tracker
    from imagen_ops.train.trainer import Trainer, TrainPaths

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    monkeypatch.setenv("IMAGEN_OPS_PROJECT", str(tmp_path))
    write_params(tmp_path / "params.yaml")
    params = tiny_params()

    # a tracked training run (its loss curve is what the notebook plots)
    tracker = training_tracker(params.registry, "base")
    paths = TrainPaths(
        tiny_data["prepared"], tiny_data["cache"], *(tmp_path / n for n in ("m", "c", "t.csv"))
    )
    Trainer(train_settings(params, "base"), paths, tracker=tracker, progress=False).fit()
    tracker.close()

    # champion (better metrics) and a different challenger that did not beat it
    (tmp_path / "eval").mkdir()
    other = _perturbed(tiny_models, tmp_path / "other")
    for models, score in ((tiny_models, 0.9), (other, 0.1)):
        metrics = write_metrics(tmp_path / "metrics.json", models, score)
        register_params(params, RegisterPaths(tmp_path, models, metrics, tmp_path / "eval"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # grids: champion samples, stronger guidance, champion and challenger; the loss curve
    assert len(images) >= 5, text
    assert "'champion': 1" in text and "'challenger': 2" in text
    assert "champion: " in text and "challenger: " in text and " correct" in text
    assert "alignment.balanced" in text  # the champion run's metrics
