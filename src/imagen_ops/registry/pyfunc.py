"""The cascade as an MLflow pyfunc model (loading cascades lives in loading.py).

The logged model is code, not a pickle (MLflow models-from-code: `served_model.py` names
`ImagenModel`), plus the cascade as an artifact: every stage's config.json + EMA weights
and cascade.json with the stage order, the text encoder, the sampling defaults and the
serving limits. `mlflow models serve -m models:/imagen-ops@champion` needs nothing else.

predict: a DataFrame with a `prompt` column and optional columns named like the
`sample` settings (`negative_prompt`, `seed`, `steps`, `guidance`, `guidance_interval`,
`strength`, `sampler`, `rerank`) plus `image` / `mask` (base64 image files: alone an
image is super-resolved, with `strength` it starts image-to-image, with `mask` it is
inpainted) -> a DataFrame with
`prompt`, `seed` and `image` (base64 PNG). Rows with equal settings are sampled in batches.
A bad request (an unknown column, or any MLflow `params`, included), or one over the work
budget, raises MlflowException(INVALID_PARAMETER_VALUE) (HTTP 400) before any work;
sampling past `serve.timeout_s` stops with DEADLINE_EXCEEDED (HTTP 504).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from imagen_ops.cascade import SCORER_DIR, Cascade, check_prompt, image_roles
from imagen_ops.config import SEED, ConfigError, Params, SampleConfig, ServeConfig, TextConfig
from imagen_ops.device import resolve_device
from imagen_ops.images import image_pixels
from imagen_ops.registry.loading import ARTIFACT, packaged_settings
from imagen_ops.scorer import load_scorer

__all__ = [
    "IMAGE_COLUMNS",
    "REQUEST_COLUMNS",
    "SETTING_COLUMNS",
    "DeadlineExceeded",
    "ImagenModel",
    "ModelSpec",
    "Row",
    "generate",
    "package_cascade",
    "request_frame",
    "validate_request",
]

log = logging.getLogger(__name__)

SETTING_COLUMNS = (
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "guidance_interval",
    "strength",
    "sampler",
    "rerank",
)
IMAGE_COLUMNS = ("image", "mask")
REQUEST_COLUMNS = ("prompt", *SETTING_COLUMNS, *IMAGE_COLUMNS)  # `prompt` alone is required


@dataclass(frozen=True)
class ModelSpec:
    """What the packaged model takes from params.yaml: the stage order, the text encoder,
    the sampling defaults and the serving limits."""

    stage_names: tuple[str, ...]
    text: TextConfig
    sample: SampleConfig
    serve: ServeConfig

    @classmethod
    def from_params(cls, params: Params) -> ModelSpec:
        return cls(tuple(params.stage_names()), params.text, params.sample, params.serve)


def package_cascade(
    models_dir: Path, spec: ModelSpec, out: Path, scorer: Path | None = None
) -> Path:
    """Copy each stage's config and EMA weights (and the `scorer`, for best-of-N
    reranking) into `out` and write cascade.json."""
    out.mkdir(parents=True, exist_ok=True)
    if scorer is not None:
        load_scorer(scorer)  # a clear error for a folder that holds no scorer
        shutil.copytree(scorer, out / SCORER_DIR, dirs_exist_ok=True)
    for name in spec.stage_names:
        src = models_dir / name
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} is not a trained stage (run `dvc repro train_{name}`)")
        (out / name).mkdir(exist_ok=True)
        for fname in ("config.json", "ema.safetensors"):
            shutil.copy2(src / fname, out / name / fname)
    Cascade.from_dir(out, spec.stage_names, spec.text).write_manifest(
        out,
        sample=spec.sample.model_dump(mode="json"),
        serve=spec.serve.model_dump(mode="json"),
    )
    return out


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _deadline_exceeded(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED

    return MlflowException(message, error_code=DEADLINE_EXCEEDED)


class DeadlineExceeded(Exception):  # noqa: N818 -- a signal between steps, not a bug
    """Raised between denoising steps once a request's deadline has passed."""


@dataclass(frozen=True)
class Row:
    """One validated request row."""

    prompt: str
    settings: SampleConfig
    image: torch.Tensor | None = None  # image-to-image / inpainting start
    mask: torch.Tensor | None = None
    lowres: torch.Tensor | None = None  # super-resolution input


def validate_request(
    frame: Any, defaults: SampleConfig, limits: ServeConfig, cascade: Cascade | None = None
) -> list[Row]:
    """Rows of a request DataFrame, or an HTTP 400 error that says what to change.

    Prompts get the caption checks of ingestion; settings columns go through
    `SampleConfig.updated` (the ranges of params.yaml's `sample` keys); row k's seed
    defaults to `sample.seed + k`. With `cascade`, the request's work is checked against
    `serve.max_work` before any sampling."""
    columns = [str(c) for c in frame.columns]
    unknown = [c for c in columns if c not in REQUEST_COLUMNS]
    if unknown:
        raise _bad_request(
            f"unknown column{'s' if len(unknown) > 1 else ''} {unknown}: a request has "
            f"'prompt' and may have {list(REQUEST_COLUMNS[1:])}"
        )
    if "prompt" not in columns:
        raise _bad_request(f"the request needs a 'prompt' column (got {columns})")
    if not 1 <= len(frame) <= limits.max_prompts:
        raise _bad_request(
            f"send 1 to {limits.max_prompts} prompts per request (serve.max_prompts), "
            f"got {len(frame)}"
        )
    records = frame.to_dict("records")
    files = {
        (i, k): _file(rec.get(k), k, i) for i, rec in enumerate(records) for k in IMAGE_COLUMNS
    }
    pixels = sum(image_pixels(data) or 0 for data in files.values() if data is not None)
    if pixels > limits.max_image_pixels:  # from the headers: nothing decoded yet
        raise _bad_request(
            f"the request's images hold {pixels:,} pixels, over the limit of "
            f"{limits.max_image_pixels:,} (serve.max_image_pixels): send smaller images"
        )
    rows = []
    for i, rec in enumerate(records):
        try:
            prompt = check_prompt(_text(_value(rec.get("prompt"))))
        except ValueError as err:
            raise _bad_request(f"row {i}: prompt: {err}") from None
        given = {k: _value(rec.get(k)) for k in SETTING_COLUMNS}
        given["negative_prompt"] = _text(given["negative_prompt"])
        if isinstance(given["seed"], float) and abs(given["seed"]) >= 2**53:
            raise _bad_request(  # pandas makes a column with empty cells float64
                f"row {i}: seed {given['seed']:.0f} is not exact: a seed column with empty "
                "cells holds floats, exact below 2**53; give every row its seed"
            )
        given["seed"] = defaults.seed + i if given["seed"] is None else given["seed"]
        try:
            settings = defaults.updated(**given)
        except ConfigError as err:
            raise _bad_request(f"row {i}: {'; '.join(err.problems)}") from None
        try:
            images = (_image(files[i, k], k, i) for k in IMAGE_COLUMNS)
            strength = None if given["strength"] is None else settings.strength  # parsed
            roles = image_roles(*images, strength)
        except ValueError as err:
            raise _bad_request(f"row {i}: {err}") from None
        if cascade is not None and settings.rerank > 1 and cascade.scorer is None:
            raise _bad_request(f"row {i}: rerank needs a scorer, and this model carries none")
        rows.append(Row(prompt, settings, *roles))
    if cascade is not None:
        work = 0.0
        for members in sampled_together(rows):  # as generate samples them
            first = rows[members[0]]
            try:
                work += cascade.work(
                    first.settings,
                    len(members),
                    widths=cascade.widths([rows[k].prompt for k in members]),
                    from_image=first.image is not None,
                    lowres_size=None if first.lowres is None else first.lowres.shape[-1],
                )
            except ValueError as err:  # settings this cascade cannot run
                raise _bad_request(f"row {members[0]}: {err}") from None
        if work > limits.max_work:
            raise _bad_request(
                f"the request needs {work:,.0f} pixel-steps, over the limit of "
                f"{limits.max_work:,.0f} (serve.max_work): send fewer prompts or steps"
            )
    return rows


def request_frame(model_input: Any) -> Any:
    """A request as a DataFrame. With no input schema MLflow hands its JSON formats over
    as it parsed them: `dataframe_split` / `dataframe_records` as a table, `inputs` and
    `instances` as a dict of numpy arrays by column (0-d where one value was given, 2-D
    where each row holds a per-stage list), a bare object as a dict of Python values.

    A dict whose prompt is one value is one row (a list in it: per-stage values). Else each
    list or array is a column, a row per item, and a single value applies to every row; a
    single `seed` means what `--seed` means to the CLI and `sample.seed` to Python: row k
    gets seed + k."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        if _ndim(model_input.get("prompt")) == 0:
            return pd.DataFrame([{k: _value(v) for k, v in model_input.items()}])
        n = len(model_input["prompt"])
        columns = {}
        for key, value in model_input.items():
            if _ndim(value) == 0:
                value = _value(value)
                seed = _seed(value) if key == "seed" else None
                columns[key] = [value] * n if seed is None else [seed + k for k in range(n)]
            elif len(value) == n:
                columns[key] = list(value)  # a 2-D array's rows: per-stage lists
            else:
                raise _bad_request(
                    f"the request's columns do not form a table: 'prompt' has {n} values, "
                    f"{key!r} {len(value)}"
                )
        return pd.DataFrame(columns)
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return pd.DataFrame.from_records(model_input)
    raise _bad_request(
        f"a request is a table of rows with a 'prompt' column, got {type(model_input).__name__}"
    )


def _seed(value: Any) -> int | None:
    """One seed as the `seed` setting reads it ("7" and 7.0 are 7), None if it is none:
    then every row gets the value and names the problem."""
    try:
        return None if value is None else SEED.validate_python(value)
    except ValidationError:
        return None


def _ndim(value: Any) -> int:
    """0 for one value (a numpy 0-d array included), else the dimensions of a list or
    array (a list counts as one: its items are the rows)."""
    if isinstance(value, list | tuple):
        return 1
    return getattr(value, "ndim", 0)


def _value(value: Any) -> Any:
    """A request cell: None for missing / NaN, numpy scalars as Python values."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays (a per-stage list)
        return value.tolist()
    return value


def _text(value: Any) -> Any:
    """A prompt cell: a CSV request's "1984" arrives as the number 1984."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _file(value: Any, column: str, row: int) -> bytes | None:
    """A base64 image cell's bytes (None where empty), or HTTP 400."""
    value = _value(value)
    if value is None or value == "":
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise _bad_request(f"row {row}: '{column}' must be a base64-encoded image file") from None


def _image(data: bytes | None, column: str, row: int) -> torch.Tensor | None:
    """A cell's image file decoded (`read_image`), or HTTP 400 with the reason."""
    from imagen_ops.data.ingest import Rejected
    from imagen_ops.images import read_image

    if data is None:
        return None
    try:
        return read_image(data, mask=column == "mask")
    except Rejected as err:
        raise _bad_request(f"row {row}: '{column}': {err}") from None


def _png_base64(image: Any) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sampled_together(rows: list[Row]) -> list[list[int]]:
    """Indices of the rows sampled in one call, in batches: equal settings (but the seed)
    and image sizes."""

    def key(row: Row) -> str:
        shapes = [None if t is None else tuple(t.shape) for t in (row.image, row.mask, row.lowres)]
        return row.settings.model_copy(update={"seed": 0}).model_dump_json() + str(shapes)

    groups: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        groups.setdefault(key(row), []).append(k)
    return list(groups.values())


def generate(
    cascade: Cascade, rows: list[Row], deadline: float | None = None, progress: bool = False
) -> list[Any]:
    """uint8 images for validated rows, in order, sampled in the groups of
    `sampled_together`; `deadline` (time.monotonic) stops sampling between denoising steps."""
    from imagen_ops.images import to_uint8

    def check_deadline(*_: Any) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded

    images: list[Any] = [None] * len(rows)
    for members in sampled_together(rows):
        first = rows[members[0]]
        stack = [
            None
            if getattr(first, name) is None
            else torch.cat([getattr(rows[k], name) for k in members])
            for name in ("image", "mask", "lowres")
        ]
        out = cascade.sample(
            [rows[k].prompt for k in members],
            first.settings,
            [rows[k].settings.seed for k in members],
            image=stack[0],
            mask=stack[1],
            lowres=stack[2],
            callback=check_deadline,
            progress=progress,
        )
        for k, image in zip(members, to_uint8(out), strict=True):
            images[k] = image
    return images


try:  # the class needs MLflow's base class; the rest of this module does not
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - MLflow is a declared dependency
    PythonModel = object


class ImagenModel(PythonModel):
    """pyfunc model: prompts (and optional settings and images) in, base64 PNGs out."""

    def load_context(self, context) -> None:
        root = Path(context.artifacts[ARTIFACT])
        self.cascade = Cascade.from_dir(root, device=resolve_device("auto"))
        self.settings, self.limits = packaged_settings(root)
        self.cascade.encode(["warm-up"])  # load the text encoder now, not in a request

    def predict(self, context, model_input, params=None):
        import pandas as pd

        # MLflow passes {} for a table request's `params` (it drops them: no params schema)
        # and None without; its dict and list formats (`inputs`, `instances`, a bare JSON
        # object) always come with {}, so only a table's `params` can be told apart
        if params is not None and isinstance(model_input, pd.DataFrame):
            raise _bad_request(
                "this model reads no `params`: give settings as request columns, one value "
                f"per row ({', '.join(REQUEST_COLUMNS[1:])})"
            )
        rows = validate_request(
            request_frame(model_input), self.settings, self.limits, self.cascade
        )
        deadline = time.monotonic() + self.limits.timeout_s
        try:
            images = generate(self.cascade, rows, deadline)
        except DeadlineExceeded:
            raise _deadline_exceeded(
                f"sampling stopped after serve.timeout_s={self.limits.timeout_s:g} s: "
                "send fewer prompts or steps"
            ) from None
        return pd.DataFrame(
            {
                "prompt": [r.prompt for r in rows],
                "seed": [r.settings.seed for r in rows],
                "image": [_png_base64(im) for im in images],
            }
        )
