"""The cascade as an MLflow pyfunc model (loading cascades lives in loading.py).

The logged model carries the cascade (every stage's config.json + EMA weights, and
cascade.json naming the stage order and the text encoder) as an artifact and this package
as code, so `mlflow models serve -m models:/imagen-ops@champion` needs nothing else.
predict: a DataFrame with a `prompt` column (optional `guidance`, `steps`, `seed`) ->
a DataFrame with `prompt`, `seed` and `image` (base64 PNG). A bad request raises
MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with HTTP 400.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagen_ops.cascade import Cascade
from imagen_ops.config import Params, SampleConfig, TextConfig
from imagen_ops.device import resolve_device
from imagen_ops.registry.loading import ARTIFACT

__all__ = ["ImagenModel", "ModelSpec", "package_cascade", "validate_request"]

log = logging.getLogger(__name__)

MAX_STEPS = 1000
MAX_GUIDANCE = 30.0
MAX_PROMPTS = 64


@dataclass(frozen=True)
class ModelSpec:
    """What the packaged model takes from params.yaml: the stage order, the text encoder
    and the sampling defaults the served model starts from."""

    stage_names: tuple[str, ...]
    text: TextConfig
    sample: SampleConfig

    @classmethod
    def from_params(cls, params: Params) -> ModelSpec:
        return cls(tuple(params.stage_names()), params.text, params.sample)


def package_cascade(models_dir: Path, spec: ModelSpec, out: Path) -> Path:
    """Copy each stage's config and EMA weights into `out` and write cascade.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name in spec.stage_names:
        src = models_dir / name
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} is not a trained stage (run `dvc repro train_{name}`)")
        (out / name).mkdir(exist_ok=True)
        for fname in ("config.json", "ema.safetensors"):
            shutil.copy2(src / fname, out / name / fname)
    Cascade.from_dir(out, spec.stage_names, spec.text).write_manifest(out)
    return out


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def validate_request(frame: Any, defaults: SampleConfig) -> list[dict[str, Any]]:
    """Rows of (prompt, guidance, steps, seed) from a request DataFrame, or a clear error."""
    if "prompt" not in frame.columns:
        raise _bad_request(f"the request needs a 'prompt' column (got {list(frame.columns)})")
    if not 1 <= len(frame) <= MAX_PROMPTS:
        raise _bad_request(f"send 1 to {MAX_PROMPTS} prompts per request, got {len(frame)}")
    rows = []
    for i, rec in enumerate(frame.to_dict("records")):
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad_request(f"row {i}: 'prompt' must be non-empty text")
        guidance = _number(rec.get("guidance"), None, i, "guidance")
        steps = _number(rec.get("steps"), None, i, "steps")
        seed = _number(rec.get("seed"), defaults.seed + i, i, "seed")
        if guidance is not None and not 0.0 <= guidance <= MAX_GUIDANCE:
            raise _bad_request(f"row {i}: guidance must be in [0, {MAX_GUIDANCE}], got {guidance}")
        if steps is not None and not (float(steps).is_integer() and 1 <= steps <= MAX_STEPS):
            raise _bad_request(
                f"row {i}: steps must be an integer in [1, {MAX_STEPS}], got {steps}"
            )
        if not float(seed).is_integer():
            raise _bad_request(f"row {i}: seed must be an integer, got {seed}")
        rows.append(
            {
                "prompt": prompt.strip(),
                "guidance": guidance,
                "steps": None if steps is None else int(steps),
                "seed": int(seed),
            }
        )
    return rows


def _number(value: Any, default: float | None, row: int, name: str) -> float | None:
    if value is None or (isinstance(value, float) and value != value):  # missing or NaN
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _bad_request(f"row {row}: {name} must be a number, got {value!r}") from None


def _png_base64(image: Any) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


try:  # the class needs MLflow's base class; the rest of this module does not
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - MLflow is a declared dependency
    PythonModel = object


class ImagenModel(PythonModel):
    """pyfunc wrapper: prompts in, base64 PNG images out."""

    def __init__(self, sample: dict[str, Any] | None = None):
        self.sample = sample or {}

    def load_context(self, context) -> None:
        self.cascade = Cascade.from_dir(context.artifacts[ARTIFACT], device=resolve_device("auto"))
        self.settings = SampleConfig.model_validate(self.sample)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from imagen_ops.images import to_uint8

        rows = validate_request(model_input, self.settings)
        images = []
        for row in rows:  # one at a time: each row may carry its own guidance and steps
            settings = self.settings
            if row["steps"] is not None:
                settings = settings.model_copy(update={"steps": row["steps"]})
            if row["guidance"] is not None:
                settings = settings.with_base_guidance(row["guidance"], len(self.cascade.stages))
            images.append(
                to_uint8(self.cascade.sample([row["prompt"]], settings, [row["seed"]]))[0]
            )
        return pd.DataFrame(
            {
                "prompt": [r["prompt"] for r in rows],
                "seed": [r["seed"] for r in rows],
                "image": [_png_base64(im) for im in images],
            }
        )
