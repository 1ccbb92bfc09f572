"""Registry: the promotion gate, request validation, the pyfunc model, aliases, serving."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagen_ops.config import SampleConfig, ServeConfig
from imagen_ops.registry.promotion import decide, lookup_metric, primary_metric
from imagen_ops.registry.pyfunc import validate_request

from .conftest import register_params, tiny_params, tiny_raw, write_metrics, write_params

# ------------------------------------------------------------------------ the gate


def test_no_champion_promotes() -> None:
    d = decide("alignment.overall", 0.2, None, greater_is_better=True, margin=0.5)
    assert d.promote and d.champion is None and "no champion" in d.reason


@pytest.mark.parametrize(
    ("challenger", "champion", "greater", "margin", "promote"),
    [
        (0.60, 0.50, True, 0.05, True),  # better by more than the margin
        (0.54, 0.50, True, 0.05, False),  # better, but within the margin
        (0.50, 0.50, True, 0.0, False),  # a tie keeps the champion
        (0.40, 0.50, True, 0.0, False),  # worse
        (20.0, 30.0, False, 5.0, True),  # distances: lower is better
        (27.0, 30.0, False, 5.0, False),  # lower, within the margin
        (35.0, 30.0, False, 0.0, False),  # higher distance is worse
    ],
)
def test_decide(challenger, champion, greater, margin, promote) -> None:
    d = decide("m", challenger, champion, greater, margin)
    assert d.promote is promote
    assert ("promoted" if promote else "champion kept") in d.reason
    assert d.to_dict()["champion"] == champion and d.to_dict()["margin"] == margin


def test_primary_metric_auto_prefers_alignment() -> None:
    metrics = {"fid": 40.0, "alignment": {"balanced": 0.6, "overall": 0.7, "single": 0.9}}
    assert primary_metric(metrics) == ("alignment.balanced", 0.6, True)
    # without alignment (real data, alignment null) auto falls back to FID, lower is better
    assert primary_metric({"fid": 40.0, "alignment": None}) == ("fid", 40.0, False)
    assert primary_metric({"fid": 40.0}) == ("fid", 40.0, False)


def test_primary_metric_direction_from_name() -> None:
    metrics = {"fid": 40.0, "kid_mean": 0.01, "clip_score": 25.0, "alignment": {"overall": 0.7}}
    assert primary_metric(metrics, "kid_mean") == ("kid_mean", 0.01, False)
    assert primary_metric(metrics, "clip_score") == ("clip_score", 25.0, True)
    assert primary_metric(metrics, "fid")[2] is False


def test_primary_metric_missing_names_it() -> None:
    with pytest.raises(KeyError, match="'clip_score'"):
        primary_metric({"fid": 3.0, "clip_score": None}, "clip_score")
    with pytest.raises(KeyError, match="'fid'"):
        primary_metric({"kid_mean": 0.1, "alignment": None})
    with pytest.raises(KeyError, match=r"'alignment\.position'"):
        primary_metric({"alignment": {"overall": 0.5}}, "alignment.position")


def test_lookup_metric() -> None:
    metrics = {"a": {"b": {"c": 2}}, "n": None, "x": 1}
    assert lookup_metric(metrics, "a.b.c") == 2.0
    assert lookup_metric(metrics, "n") is None
    assert lookup_metric(metrics, "x.y") is None
    assert lookup_metric(metrics, "missing") is None


# ------------------------------------------------------------------ request checks

DEFAULTS = SampleConfig(seed=10)
LIMITS = ServeConfig(max_prompts=8)


def _bad(frame: pd.DataFrame, match: str, cascade=None, limits: ServeConfig = LIMITS) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    with pytest.raises(MlflowException, match=match) as err:
        validate_request(frame, DEFAULTS, limits, cascade)
    assert err.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)


def test_validate_request_good_rows_with_default_seeds() -> None:
    frame = pd.DataFrame(
        {
            "prompt": ["  a red circle ", "two blue squares", "a star"],
            "guidance": [2.5, None, 0.0],
            "steps": [4, None, 1.0],
            "seed": [7, None, 3],
            "negative_prompt": [None, "a red square", None],
        }
    )
    rows = validate_request(frame, DEFAULTS, LIMITS)
    assert [r.prompt for r in rows] == ["a red circle", "two blue squares", "a star"]
    assert [r.settings.seed for r in rows] == [7, 11, 3]
    assert [r.settings.guidance for r in rows] == [2.5, DEFAULTS.guidance, 0.0]
    assert [r.settings.steps for r in rows] == [4, DEFAULTS.steps, 1]
    assert rows[1].settings.negative_prompt == "a red square"
    assert rows[0].settings == DEFAULTS.updated(guidance=2.5, steps=4, seed=7)
    only_prompts = validate_request(pd.DataFrame({"prompt": ["a", "b"]}), DEFAULTS, LIMITS)
    assert [r.settings.seed for r in only_prompts] == [10, 11]
    per_stage = pd.DataFrame({"prompt": ["a"], "guidance": [[3.0, 1.0]]})
    assert validate_request(per_stage, DEFAULTS, LIMITS)[0].settings.guidance == (3.0, 1.0)


def test_every_mlflow_request_format_becomes_the_same_table() -> None:
    """Each JSON format as MLflow's scoring server parses it (no input schema: `inputs` and
    `instances` arrive as numpy arrays by column, 0-d for one value, 2-D for per-stage
    lists), and a bare object (one row, lists in it per stage)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    from imagen_ops.registry.pyfunc import request_frame

    def served(body: dict) -> list[tuple]:
        rows = validate_request(request_frame(infer_and_parse_data(body)), DEFAULTS, LIMITS)
        return [(r.prompt, r.settings.seed, r.settings.guidance) for r in rows]

    g = DEFAULTS.guidance
    two = [("a", 1, g), ("b", 2, g)]
    assert served({"inputs": {"prompt": ["a", "b"], "seed": [1, 2]}}) == two
    assert served({"instances": [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}]}) == two
    assert (
        served({"dataframe_records": [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}]})
        == two
    )
    split = {"columns": ["prompt", "seed"], "data": [["a", 1], ["b", 2]]}
    assert served({"dataframe_split": split}) == two
    # one row: a single prompt, its lists per stage (not rows)
    one = [("a", DEFAULTS.seed, (3.0, 1.0))]
    assert served({"inputs": {"prompt": "a", "guidance": [3, 1]}}) == one
    assert served({"instances": [{"prompt": "a", "guidance": [3, 1]}]}) == one
    assert served({"dataframe_records": [{"prompt": "a", "guidance": [3, 1]}]}) == one
    assert served({"inputs": {"prompt": "a"}}) == [("a", DEFAULTS.seed, g)]
    rows = request_frame(
        infer_and_parse_data({"inputs": {"prompt": "a", "guidance_interval": [0.5, 1]}})
    )
    assert validate_request(rows, DEFAULTS, LIMITS)[0].settings.guidance_interval == (0.5, 1.0)
    # per-stage lists in each of several rows; a list beside a list of prompts is by row
    stages = {
        "instances": [{"prompt": "a", "guidance": [3, 1]}, {"prompt": "b", "guidance": [2, 1]}]
    }
    s0 = DEFAULTS.seed
    assert served(stages) == [("a", s0, (3.0, 1.0)), ("b", s0 + 1, (2.0, 1.0))]
    assert served({"inputs": {"prompt": ["a", "b"], "guidance": [3, 2]}}) == [
        ("a", s0, 3.0),
        ("b", s0 + 1, 2.0),
    ]
    # one seed for several prompts: seed + k, as the CLI's --seed and Python's sample.seed
    for seed in (7, "7", 7.0):  # as the seed setting reads one
        rows = served({"inputs": {"prompt": ["a"] * 3, "seed": seed}})
        assert [s for _, s, _ in rows] == [7, 8, 9]
    with pytest.raises(MlflowException, match="row 0: seed"):
        served({"inputs": {"prompt": ["a"] * 3, "seed": -1}})
    assert served({"inputs": {"prompt": ["a", "b"], "guidance": 3}}) == [
        ("a", s0, 3.0),
        ("b", s0 + 1, 3.0),
    ]
    one_row = validate_request(
        request_frame({"prompt": "a", "guidance": [3.0, 1.0]}), DEFAULTS, LIMITS
    )
    assert len(one_row) == 1 and one_row[0].settings.guidance == (3.0, 1.0)  # a bare object
    with pytest.raises(MlflowException, match="'prompt' has 2 values, 'seed' 3"):
        request_frame({"prompt": ["a", "b"], "seed": [1, 2, 3]})
    with pytest.raises(MlflowException, match="got str"):
        request_frame("a red circle")
    digits = validate_request(pd.DataFrame({"prompt": [1984]}), DEFAULTS, LIMITS)  # text/csv
    assert digits[0].prompt == "1984"


def test_validate_request_columns() -> None:
    _bad(pd.DataFrame({"text": ["a red circle"]}), r"unknown column \['text'\]")
    _bad(pd.DataFrame({"seed": [1]}), r"needs a 'prompt' column \(got \['seed'\]\)")
    _bad(
        pd.DataFrame({"prompt": ["a"], "stpes": [3], "seeds": [1]}), r"columns \['stpes', 'seeds'\]"
    )


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "caption is empty"),
        ("   ", "caption is empty"),
        (None, "no caption"),
        ("a red\x00circle", "contains control character U\\+0000"),
        ("a red\x1fcircle", "contains control character U\\+001F"),  # Python calls it space
        ("\u200b", "caption has no visible character"),  # zero-width: the tokenizer reads ""
        ("\u0301 \u202e", "caption has no visible character"),  # a lone accent, a bidi mark
        ("a" * 2001, "2001 characters"),
    ],
)
def test_validate_request_checks_prompts_like_captions(prompt, match) -> None:
    _bad(pd.DataFrame({"prompt": ["ok", prompt]}), f"row 1: prompt: {match}")


def test_validate_request_prompt_count() -> None:
    _bad(pd.DataFrame({"prompt": []}), "send 1 to 8 prompts per request")
    _bad(pd.DataFrame({"prompt": ["a"] * 9}), r"serve\.max_prompts\), got 9")


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("guidance", -0.5, "guidance: Input should be greater than or equal to 0"),
        ("guidance", 31, "guidance: Input should be less than or equal to 30"),
        ("guidance", "strong", "guidance: Input should be a valid number"),
        ("steps", 0, "steps: Input should be greater than or equal to 1"),
        ("steps", 1001, "steps: Input should be less than or equal to 1000"),
        ("steps", 2.5, "steps: Input should be a valid integer"),
        ("seed", "lucky", "seed: Input should be a valid integer"),
        ("seed", 1.5, "seed: Input should be a valid integer"),
        ("seed", 2**63, "seed: Input should be less than 9223372036854775808"),
        ("strength", 1.5, "strength: Input should be less than or equal to 1"),
        ("sampler", "euler", "sampler"),
        ("image", "not base64!", "'image' must be a base64-encoded image file"),
        ("negative_prompt", "a blue\x07square", "negative_prompt: .*control character U\\+0007"),
        (
            "negative_prompt",
            "b" * 2001,
            "negative_prompt: .*2001 characters > the longest prompt=2000",
        ),
        ("strength", 0.5, "strength 0.5 is for image-to-image: give the image too"),
        ("strength", "0.5", "strength 0.5 is for image-to-image: give the image too"),  # JSON text
    ],
)
def test_validate_request_out_of_range(column, value, match) -> None:
    frame = pd.DataFrame({"prompt": ["a red circle"], column: [value]})
    _bad(frame, f"row 0: {match}")


def test_validate_request_seed_column_with_gaps_is_exact_or_refused() -> None:
    """A seed column with an empty cell is float64 in pandas: seeds below 2**53 survive it
    exactly, a larger one would be rounded to another seed and is refused instead."""
    frame = pd.DataFrame({"prompt": ["a", "b"], "seed": [2**53 - 1, None]})
    assert frame["seed"].dtype == np.float64
    assert [r.settings.seed for r in validate_request(frame, DEFAULTS, LIMITS)] == [2**53 - 1, 11]
    big = 2**60 + 1
    _bad(pd.DataFrame({"prompt": ["a", "b"], "seed": [big, None]}), "row 0: seed .* not exact")
    exact = pd.DataFrame({"prompt": ["a", "b"], "seed": [big, 3]})  # int64: exact
    assert validate_request(exact, DEFAULTS, LIMITS)[0].settings.seed == big


def test_validate_request_bounds_image_pixels_before_decoding(monkeypatch) -> None:
    """The image and mask files of a request together hold at most serve.max_image_pixels,
    read from their headers: an over-budget request decodes nothing."""
    from imagen_ops import images

    png = base64.b64encode(png_bytes(np.zeros((40, 30, 3), np.uint8))).decode()
    frame = pd.DataFrame({"prompt": ["a", "b"], "image": [png, png], "mask": [None, png]})
    limits = ServeConfig(max_prompts=8, max_image_pixels=3 * 1200)
    assert len(validate_request(frame, DEFAULTS, limits)) == 2  # 3 files of 30 x 40: at the limit

    def decode(*args, **kwargs):
        raise AssertionError("decoded an image of a refused request")

    monkeypatch.setattr(images, "read_image", decode)
    smaller = ServeConfig(max_prompts=8, max_image_pixels=3 * 1200 - 1)
    over = r"3,600 pixels, over the limit of 3,599 \(serve\.max_image_pixels\)"
    _bad(frame, over, limits=smaller)


def test_validate_request_rejects_bad_images_with_the_reason() -> None:
    not_an_image = base64.b64encode(b"hello, world").decode()
    _bad(pd.DataFrame({"prompt": ["a"], "image": [not_an_image]}), "'image': not_an_image")
    mask_only = base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode()
    _bad(pd.DataFrame({"prompt": ["a"], "mask": [mask_only]}), "a mask needs the image")


def test_validate_request_reads_an_image_like_the_cli() -> None:
    """Alone an image is super-resolved, with a strength it starts image-to-image, with a
    mask it is inpainted (cascade.image_roles, shared with `imagen-ops sample`)."""
    image = base64.b64encode(png_bytes(np.full((20, 20, 3), 90, np.uint8))).decode()
    frame = pd.DataFrame(
        {
            "prompt": ["a", "b", "c"],
            "image": [image, image, image],
            "strength": [None, 0.4, None],
            "mask": [None, None, image],
        }
    )
    sr, img2img, inpaint = validate_request(frame, DEFAULTS, LIMITS)
    assert sr.lowres is not None and sr.image is None and sr.mask is None
    assert img2img.image is not None and img2img.settings.strength == 0.4
    assert inpaint.image is not None and inpaint.mask is not None and inpaint.lowres is None


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------- MLflow (tmp store)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """An MLflow sqlite store and artifact root inside tmp_path (the working directory)."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    return tmp_path


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG"
    return image


def test_pyfunc_log_load_predict(tiny_models, store) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from imagen_ops.registry.loading import ARTIFACT
    from imagen_ops.registry.pyfunc import ModelSpec, package_cascade
    from imagen_ops.registry.register import log_cascade_model
    from imagen_ops.registry.tracking import configure

    params = tiny_params()
    cascade_dir = package_cascade(
        tiny_models, ModelSpec.from_params(params), store / "packaged" / ARTIFACT
    )
    assert sorted(p.name for p in cascade_dir.iterdir()) == ["base", "cascade.json", "sr32"]
    assert sorted(p.name for p in (cascade_dir / "sr32").iterdir()) == [
        "config.json",
        "ema.safetensors",
    ]
    shutil.rmtree(store / "packaged")
    configure(params.registry)
    with mlflow.start_run():
        info = log_cascade_model(tiny_models, ModelSpec.from_params(params))
    model = mlflow.pyfunc.load_model(info.model_uri)
    # models-from-code: the code is logged as source, nothing is pickled
    logged = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert not list(logged.rglob("*.pkl")), sorted(p.name for p in logged.rglob("*"))
    assert "set_model(ImagenModel())" in (logged / "served_model.py").read_text()
    assert (logged / "code" / "imagen_ops" / "cascade.py").is_file()
    requirements = (logged / "requirements.txt").read_text().splitlines()
    pins = [r for r in requirements if not r.startswith("-")]
    assert all("==" in r for r in pins), requirements
    assert any(r.startswith("torch==") for r in pins)
    assert any(r.startswith("huggingface_hub==") for r in pins)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    example = json.loads((logged / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["prompt", "seed"]
    # no input schema: MLflow would drop an unknown column before the model could refuse it
    assert info.signature.inputs is None
    assert model.metadata.metadata["request_columns"][0] == "prompt"
    with pytest.raises(MlflowException, match=r"unknown column \['stpes'\]"):
        model.predict(pd.DataFrame({"prompt": ["a red circle"], "stpes": [1]}))
    # MLflow drops `params` the model declares no schema for: refused, not ignored
    with pytest.raises(MlflowException, match="reads no `params`"):
        model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"steps": 1})
    frame = pd.DataFrame(
        {
            "prompt": ["a red circle", "a red circle", "a red circle", "a red circle"],
            "seed": [1, 1, 2, 1],
            "steps": [None, None, None, 1],
            "guidance": [None, None, None, 2],
        }
    )
    out = model.predict(frame)
    assert list(out.columns) == ["prompt", "seed", "image"]
    assert out["seed"].tolist() == [1, 1, 2, 1]
    images = [np.asarray(decode_png(s)) for s in out["image"]]
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
    assert np.array_equal(images[0], images[1]), "same seed, same image"
    assert not np.array_equal(images[0], images[2]), "another seed, another image"
    assert not np.array_equal(images[0], images[3]), "the row's steps are used"
    with pytest.raises(MlflowException, match="row 0: prompt: caption is empty"):
        model.predict(pd.DataFrame({"prompt": ["  "]}))
    # MLflow's other formats reach the model as they came, and sample the same images
    as_rows = model.predict([{"prompt": "a red circle", "seed": 1}])
    as_object = model.predict({"prompt": "a red circle", "seed": 1})
    assert as_rows["image"].tolist() == as_object["image"].tolist() == [out["image"][0]]


def aliases(name: str = "imagen-ops") -> dict[str, str]:
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def versions(name: str = "imagen-ops") -> list[str]:
    from mlflow import MlflowClient

    found = MlflowClient().search_model_versions(f"name='{name}'")
    return sorted(str(v.version) for v in found)


@pytest.mark.integration
def test_register_gates_the_champion(tiny_models, store, monkeypatch) -> None:
    from mlflow import MlflowClient

    from imagen_ops.registry import register as register_module
    from imagen_ops.registry.register import RegisterPaths, promote

    params = tiny_params()
    (store / "eval").mkdir()
    Image.new("RGB", (8, 8)).save(store / "eval" / "grid.png")
    (store / "dvc.lock").write_text("schema: '2.0'\n")
    (store / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")

    def run(overall: float | None, **kw) -> dict:
        metrics = write_metrics(store / "metrics.json", tiny_models, overall, **kw)
        return register_params(params, RegisterPaths(store, tiny_models, metrics, store / "eval"))

    first = run(0.5)
    assert first["decision"]["promote"] and first["decision"]["metric"] == "alignment.balanced"
    assert aliases() == {"champion": first["version"], "challenger": first["version"]}
    client = MlflowClient()
    run_data = client.get_run(first["run_id"]).data
    assert run_data.metrics["alignment.balanced"] == 0.5 and run_data.metrics["fid"] == 50.0
    # metrics are measurements; counts and schema facts are tags
    assert "alignment.n_single" not in run_data.metrics and "version" not in run_data.metrics
    assert run_data.tags["imagen_ops.eval.alignment.n_single"] == "64"
    # the sampling record is settings (run params), neither a metric nor a count
    assert not any(k.startswith("sampling.") for k in run_data.metrics)
    assert not any(k.startswith("imagen_ops.eval.sampling.") for k in run_data.tags)
    assert run_data.params["sample.seed"] == "0"
    mv = client.get_model_version("imagen-ops", first["version"])
    assert mv.tags["imagen_ops.data_version"] == "abc123.dir"
    assert mv.tags["imagen_ops.recipe"] == "demo"
    assert mv.tags["imagen_ops.metric.alignment.balanced"] == "0.5"
    assert mv.tags["imagen_ops.metric.fid"] == "50"
    model = client.get_registered_model("imagen-ops")
    assert "champion" in model.description and model.tags["task"] == "text-to-image"
    assert run_data.params["stages.sr32.resolution"] == "32"
    assert run_data.tags["imagen_ops.data_version"] == "abc123.dir"
    assert run_data.tags["imagen_ops.promoted"] == "True"
    assert len(run_data.tags["imagen_ops.dvc_lock_sha256"]) == 64
    artifacts = {a.path for a in MlflowClient().list_artifacts(first["run_id"], "eval")}
    assert artifacts == {"eval/grid.png", "eval/metrics.json"}

    worse = run(0.4)
    assert not worse["decision"]["promote"] and worse["decision"]["champion"] == 0.5
    assert worse["champion_version"] == first["version"]
    assert aliases() == {"champion": first["version"], "challenger": worse["version"]}

    better = run(0.7)
    assert better["decision"]["promote"] and better["champion_version"] == better["version"]
    assert aliases() == {"champion": better["version"], "challenger": better["version"]}
    assert versions() == ["1", "2", "3"]

    # failures before the decision change nothing: no primary metric, or no trained model
    (store / "metrics.json").write_text(json.dumps({"fid": None, "alignment": None}))
    with pytest.raises(KeyError, match="'fid'"):
        register_params(params, RegisterPaths(store, tiny_models, store / "metrics.json", store))
    write_metrics(store / "metrics.json", tiny_models, 0.9)
    with pytest.raises(FileNotFoundError, match="is missing"):
        register_params(
            params, RegisterPaths(store, store / "nothing", store / "metrics.json", store)
        )

    def unreachable(*args):
        raise ConnectionError("registry unreachable")

    with monkeypatch.context() as m, pytest.raises(ConnectionError):
        m.setattr(register_module, "champion_metric", unreachable)
        register_params(params, RegisterPaths(store, tiny_models, store / "metrics.json", store))
    assert aliases() == {"champion": better["version"], "challenger": better["version"]}
    assert versions() == ["1", "2", "3"]

    # promote: the gate applies to any version; force overrides it
    kept = promote(params.registry, version=worse["version"])
    assert not kept.promote and aliases()["champion"] == better["version"]
    forced = promote(params.registry, version=worse["version"], force=True)
    assert forced.promote and forced.reason.startswith("forced:")
    assert aliases()["champion"] == worse["version"]
    # default: the challenger (version 3) against the champion (now version 2)
    back = promote(params.registry)
    assert back.promote and aliases()["champion"] == better["version"]
    # force is the way out when the gate itself cannot run (a metric the version lacks)
    no_metric = tiny_params("registry.primary_metric=clip_score").registry
    with pytest.raises(KeyError, match="clip_score"):
        promote(no_metric, version=worse["version"])
    forced = promote(no_metric, version=worse["version"], force=True)
    assert forced.promote and forced.reason.startswith("forced (the gate failed: KeyError")
    assert aliases()["champion"] == worse["version"]
    promote(params.registry, version=better["version"], force=True)

    # a store that fails is not "no champion" (which would skip the gate)
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    from imagen_ops.registry.register import REGISTERED_TAG, current_champion

    def failing(*args, **kwargs):
        raise MlflowException("server error", error_code=INTERNAL_ERROR)

    with monkeypatch.context() as m, pytest.raises(MlflowException, match="server error"):
        m.setattr(MlflowClient, "get_registered_model", failing)
        current_champion(params.registry)
    assert current_champion(tiny_params("registry.model_name=none-yet").registry) is None

    # a registration that fails writing its decision moves no alias; the champion a
    # registration did move always carries its decision and description
    def cut(*args, **kwargs):
        raise ConnectionError("cut short")

    with monkeypatch.context() as m, pytest.raises(ConnectionError):
        m.setattr(MlflowClient, "update_model_version", cut)
        run(0.9)
    assert aliases()["champion"] == better["version"] and versions() == ["1", "2", "3", "4"]
    tag = MlflowClient.set_model_version_tag

    def last_write_cut(self, name, version, key, value):
        if key == REGISTERED_TAG:
            raise ConnectionError("cut short")
        return tag(self, name, version, key, value)

    with monkeypatch.context() as m, pytest.raises(ConnectionError):
        m.setattr(MlflowClient, "set_model_version_tag", last_write_cut)
        run(0.95)
    mv = client.get_model_version("imagen-ops", aliases()["champion"])
    assert str(mv.version) == "5" and REGISTERED_TAG not in mv.tags
    assert mv.tags["imagen_ops.gate.promoted"] == "True" and "gate: " in mv.description


# ------------------------------------------------------------------- the paired gate


def test_mcnemar_p_is_the_exact_binomial_tail() -> None:
    from imagen_ops.registry.promotion import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == 1 / 32
    assert mcnemar_p(0, 5) == 1.0
    # 8 wins of 10 discordant pairs: (C(10,8) + C(10,9) + C(10,10)) / 2^10
    assert mcnemar_p(8, 2) == pytest.approx((45 + 10 + 1) / 1024)


def test_paired_decide_needs_significance_and_the_margin() -> None:
    from imagen_ops.registry.promotion import paired_decide

    rng = np.random.default_rng(0)
    champion = rng.random(128) < 0.5
    same = paired_decide(champion, champion.copy(), confidence=0.95)
    assert not same.promote and same.p_value == 1.0 and same.n == 128
    assert "champion kept" in same.reason and "N=128" in same.reason

    better = champion | (rng.random(128) < 0.5)  # wins only, about 32 of them
    clear = paired_decide(champion, better, confidence=0.95)
    assert clear.promote and clear.p_value < 1e-6 and clear.test == "mcnemar"
    assert clear.challenger == better.mean() and clear.champion == champion.mean()
    # the same evidence, but a margin larger than the gain: kept
    assert not paired_decide(champion, better, 0.95, margin=0.5).promote

    slightly = champion.copy()
    slightly[np.flatnonzero(~champion)[:2]] = True  # two wins: p = 1/4, not significant
    noisy = paired_decide(champion, slightly, confidence=0.95)
    assert not noisy.promote and noisy.p_value == 0.25
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_decide(champion, champion[:5], 0.95)


def test_golden_set_is_stratified_seeded_and_frozen(tmp_path, capsys) -> None:
    from imagen_ops.cli import main
    from imagen_ops.eval.alignment import CATEGORIES
    from imagen_ops.eval.golden import find_golden, make_golden, read_golden

    rows = make_golden(3, seed=11)
    assert [r["category"] for r in rows] == [c for c in CATEGORIES for _ in range(3)]
    assert [r["seed"] for r in rows] == list(range(11, 11 + len(rows)))
    assert make_golden(3, seed=11) == rows and make_golden(3, seed=12) != rows
    assert all(r["scene"]["category"] == r["category"] for r in rows)

    params = tmp_path / "params.yaml"
    params.write_text(yaml_dump({**tiny_raw(), "registry": {"golden_per_category": 2}}))
    out = tmp_path / "golden"
    argv = ["golden", "make", "--params", str(params), "--out", str(out)]
    assert main(argv) == 0
    first = (out / "prompts.jsonl").read_bytes()
    assert len(read_golden(out)) == 8
    assert main(argv) == 2  # frozen: an existing set is not replaced
    assert (out / "prompts.jsonl").read_bytes() == first
    assert main([*argv, "--force"]) == 0 and (out / "prompts.jsonl").read_bytes() == first
    (out / "prompts.jsonl").write_text('{"prompt": "a red circle"}\n')
    with pytest.raises(ValueError, match="missing"):
        read_golden(out)
    with pytest.raises(FileNotFoundError, match="golden make"):
        read_golden(tmp_path / "none")
    # a set DVC records but not checked out is not "no set": the metric gate would decide
    assert find_golden(tmp_path / "none") is None
    (tmp_path / "none.dvc").write_text("outs:\n- md5: 0a.dir\n  path: none\n")
    with pytest.raises(FileNotFoundError, match=r"none\.dvc records .* `dvc checkout none\.dvc`"):
        find_golden(tmp_path / "none")


@pytest.mark.integration
def test_register_with_the_paired_gate(tiny_models, store) -> None:
    """First version: promoted (no champion); the same weights again: sampled side by side
    on the golden set, identical verdicts, kept; decision and p-value in version tags.
    Best of N in params.yaml does not reach the gate: it compares the models' own samples
    (and the challenger in artifacts/models carries no scorer)."""
    from mlflow import MlflowClient

    from imagen_ops.eval.golden import make_golden
    from imagen_ops.registry.promotion import Decision
    from imagen_ops.registry.pyfunc import ModelSpec
    from imagen_ops.registry.register import RegisterPaths, carry_out, move_champion, register

    params = tiny_params("sample.rerank=4")
    golden = make_golden(2, seed=5)
    metrics = write_metrics(store / "metrics.json", tiny_models, 0.5)
    paths = RegisterPaths(store, tiny_models, metrics, store / "eval")

    def run() -> dict:
        return register(
            params.registry,
            ModelSpec.from_params(params),
            paths,
            run_params={},
            golden=golden,
            device="cpu",
        )

    first = run()
    assert first["decision"]["promote"] and first["decision"]["reason"] == "no champion yet"
    assert first["decision"]["n"] == 8 and first["decision"]["metric"] == "golden.accuracy"
    second = run()
    decision = second["decision"]
    assert not decision["promote"] and decision["p_value"] == 1.0
    assert decision["champion"] == decision["challenger"] == first["decision"]["challenger"]
    tags = MlflowClient().get_model_version("imagen-ops", second["version"]).tags
    assert tags["imagen_ops.gate.test"] == "mcnemar" and tags["imagen_ops.gate.n"] == "8"
    assert tags["imagen_ops.gate.p_value"] == "1" and tags["imagen_ops.gate.promoted"] == "False"
    run_data = MlflowClient().get_run(second["run_id"]).data
    assert run_data.metrics["golden.accuracy"] == decision["challenger"]

    # promote with the paired gate needs the sampling settings: no silent code defaults
    from imagen_ops.registry.register import promote

    with pytest.raises(ValueError, match="pass the sampling settings"):
        promote(params.registry, version=second["version"], golden=golden)

    # compare-and-set: a move based on a stale view of the champion is refused
    assert move_champion(params.registry, second["version"], expected="7") == first["version"]
    assert aliases()["champion"] == first["version"]
    assert move_champion(params.registry, second["version"], expected=first["version"]) is None
    assert aliases()["champion"] == second["version"]

    # a promoting decision whose champion moved since the gate read it is not carried out
    promoting = Decision(True, "better", "golden.accuracy", 0.9, 0.5, True, 0.0)
    stale, found = carry_out(params.registry, first["version"], promoting, expected="7")
    assert not stale.promote and found == second["version"]
    assert f"champion moved to version {second['version']}" in stale.reason
    assert f"promote --version {first['version']}" in stale.reason and "(better)" in stale.reason
    assert aliases()["champion"] == second["version"]
    kept = carry_out(params.registry, first["version"], promoting, expected=second["version"])
    assert kept == (promoting, second["version"]) and aliases()["champion"] == first["version"]


@pytest.mark.integration
def test_a_champion_the_gate_cannot_sample_does_not_block_every_run(
    tiny_models, store, monkeypatch
) -> None:
    """A challenger whose settings the champion cannot take (here a list per stage for
    more stages than the champion has) is registered unpromoted, saying why and how to
    promote it; failing instead would fail every later run the same way, with no version
    to force."""
    from imagen_ops.cascade import Cascade
    from imagen_ops.eval.golden import make_golden
    from imagen_ops.registry import register as register_module
    from imagen_ops.registry.pyfunc import ModelSpec
    from imagen_ops.registry.register import RegisterPaths, promote, register

    params = tiny_params()
    golden = make_golden(1, seed=5)
    paths = RegisterPaths(
        store, tiny_models, write_metrics(store / "metrics.json", tiny_models, 0.5), store
    )
    spec = ModelSpec.from_params(params)
    first = register(params.registry, spec, paths, run_params={}, golden=golden, device="cpu")
    assert first["decision"]["promote"]

    def one_stage_champion(uri: str, **kwargs) -> Cascade:  # as an older, shorter cascade
        return Cascade.from_dir(tiny_models, ("base",), params.text, kwargs["device"])

    monkeypatch.setattr(register_module, "load_cascade", one_stage_champion)
    second = register(params.registry, spec, paths, run_params={}, golden=golden, device="cpu")
    decision = second["decision"]
    assert not decision["promote"] and decision["n"] == 4 and decision["champion"] is None
    assert "cannot be sampled" in decision["reason"] and "for a 1-stage" in decision["reason"]
    assert "promote --force" in decision["reason"]
    assert aliases() == {"champion": first["version"], "challenger": second["version"]}
    forced = promote(params.registry, force=True, golden=golden, settings=params.sample)
    assert forced.promote and forced.reason.startswith("forced")
    assert aliases()["champion"] == second["version"]
    # the way out needs no golden set: `promote --force` with golden.dvc but no golden/
    from imagen_ops.cli import main

    params_file = write_params(store / "params.yaml")
    (store / "golden.dvc").write_text("outs:\n- md5: 0a.dir\n  path: golden\n")
    argv = ["promote", "--version", first["version"], "--force", "--params", str(params_file)]
    assert main(argv) == 0
    assert aliases()["champion"] == first["version"]


def test_runs_left_running_under_a_flow_run_are_ended_whatever_its_state(store) -> None:
    """A training process killed alone leaves its run RUNNING under a flow run that went
    on to end FAILED or FINISHED: the next flow run (holding the lock) ends it KILLED, with
    a killed flow run's own runs. A manual training run outside the flow is left alone."""
    from mlflow import MlflowClient

    from imagen_ops.registry.tracking import KIND_TAG, configure, end_stale_runs

    cfg = tiny_params().registry
    experiment = configure(cfg)
    client = MlflowClient()

    def new_run(kind: str, parent: str | None = None) -> str:
        tags = {KIND_TAG: kind, **({"mlflow.parentRunId": parent} if parent else {})}
        return client.create_run(experiment, tags=tags).info.run_id

    finished = new_run("retrain")
    orphan = new_run("train", parent=finished)
    client.set_terminated(finished, "FAILED")
    killed = new_run("retrain")
    its_child = new_run("train", parent=killed)
    manual = new_run("train")
    assert sorted(end_stale_runs(cfg, "retrain")) == sorted([orphan, killed, its_child])
    status = {r: client.get_run(r).info.status for r in (orphan, killed, its_child, manual)}
    assert status == {orphan: "KILLED", killed: "KILLED", its_child: "KILLED", manual: "RUNNING"}
    assert client.get_run(finished).info.status == "FAILED"
    assert end_stale_runs(cfg, "retrain") == []  # a second call finds nothing


@pytest.mark.integration
def test_register_root_is_the_project_whatever_the_working_directory(
    tiny_models, tmp_path, monkeypatch, capsys
) -> None:
    """`imagen-ops register --root DIR` from elsewhere: DIR's params.yaml, and DIR's store
    and artifacts (their relative paths are the project's); none made where it ran. A
    second project in the same process gets its own store, not the first one's (MLflow
    caches a store by its URI, and params.yaml's is relative)."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils

    from imagen_ops.cli import main

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in ("first", "second"):
        project = tmp_path / name
        (project / "reports").mkdir(parents=True)
        write_params(project / "params.yaml", f"paths.models={tiny_models}")
        write_metrics(project / "reports" / "metrics.json", tiny_models, 0.5)
        assert main(["register", "--root", str(project)]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["version"] == "1" and Path.cwd() == elsewhere
        assert list(elsewhere.iterdir()) == []
        assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow.set_tracking_uri exports it
        client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow/mlflow.db")
        assert client.get_model_version("imagen-ops", "1").run_id == result["run_id"]
        assert (project / "mlflow" / "artifacts").is_dir()


def test_what_a_version_holds_includes_the_code_and_pins_that_serve_it(
    tiny_models, tmp_path, monkeypatch
) -> None:
    """ "No change" compares this digest with the registered versions': a fix to the
    packaged code (request handling, say) or a new pinned requirement is something to
    register, weights and settings unchanged; the same inputs give the same digest."""
    from imagen_ops.registry import register as register_module
    from imagen_ops.registry.pyfunc import ModelSpec
    from imagen_ops.registry.register import RegisterPaths, registration_digest

    params = tiny_params()
    metrics = write_metrics(tmp_path / "metrics.json", tiny_models, 0.5)
    paths = RegisterPaths(tmp_path, tiny_models, metrics, tmp_path)
    spec = ModelSpec.from_params(params)
    code = tmp_path / "code"
    shutil.copytree(register_module.PACKAGE, code, ignore=shutil.ignore_patterns("*.pyc"))
    monkeypatch.setattr(register_module, "PACKAGE", code)
    before = registration_digest(paths, spec)
    assert registration_digest(paths, spec) == before
    served = code / "registry" / "pyfunc.py"
    served.write_text(served.read_text() + "\n# a fix\n")
    fixed = registration_digest(paths, spec)
    assert fixed != before
    pins = register_module.serving_requirements()
    monkeypatch.setattr(register_module, "serving_requirements", lambda: [*pins, "extra==1"])
    assert registration_digest(paths, spec) not in (before, fixed)


def yaml_dump(raw: dict) -> str:
    import yaml

    return yaml.safe_dump(raw, sort_keys=False)


# --------------------------------------------------------------- the scoring server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the server did not answer {url} in {timeout} s:\n{log.read_text()[-3000:]}")


def server_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group (MiB)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: the process group
            total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss pages
    return total / 2**20


def load_requests(n: int) -> list[tuple[str, dict, int, str | None]]:
    """(kind, payload, expected status, expected message part): mostly good requests,
    interleaved with bad ones, over-budget ones and ones that run past the deadline."""
    image = base64.b64encode(png_bytes(np.full((24, 24, 3), 90, np.uint8))).decode()
    mask = base64.b64encode(png_bytes(np.full((32, 32, 3), 255, np.uint8))).decode()
    good = [
        ("good", {"dataframe_records": [{"prompt": "a red circle", "seed": 3, "steps": 2}]}),
        ("good", {"dataframe_split": {"columns": ["prompt"], "data": [["a star"], ["a b"]]}}),
        (
            "good",
            {
                "dataframe_records": [
                    {
                        "prompt": "a star",
                        "negative_prompt": "a blue star",
                        "guidance": [3, 1],
                        "steps": 2,
                    }
                ]
            },
        ),
        (
            "good",
            {
                "dataframe_records": [
                    {"prompt": "a star", "image": image, "strength": 0.5, "steps": 2}
                ]
            },
        ),
        (
            "good",
            {"dataframe_records": [{"prompt": "a star", "image": image, "mask": mask, "steps": 2}]},
        ),
        ("good", {"dataframe_records": [{"prompt": "a star", "image": image, "steps": 2}]}),
        ("good", {"inputs": {"prompt": ["a star", "a moon"], "steps": [2, 2]}}),  # columns
        ("good", {"instances": [{"prompt": "a star", "steps": 2}]}),  # rows
        ("good", {"prompt": "a star", "steps": 2}),  # a bare object: one row
    ]
    bad = [
        ({"dataframe_records": [{"prompt": "   "}]}, 400, "prompt: caption is empty"),
        ({"dataframe_records": [{"prompt": "a\u0000star"}]}, 400, "control character U+0000"),
        ({"dataframe_records": [{"prompt": "a", "seed": 2**63}]}, 400, "seed: Input should be"),
        ({"dataframe_records": [{"prompt": "a", "steps": 0}]}, 400, "steps: Input should be"),
        ({"dataframe_records": [{"prompt": "a", "image": "%%%"}]}, 400, "base64-encoded image"),
        ({"dataframe_records": [{"prompt": "a", "guidance": 31}]}, 400, "guidance: Input"),
        ({"dataframe_records": [{"prompt": "a", "stpes": 2}]}, 400, "unknown column ['stpes']"),
        ({"dataframe_records": [{"prompt": "a"}], "params": {"steps": 2}}, 400, "no `params`"),
        ({"dataframe_records": [{"prompt": "a", "steps": 1000}] * 20}, 400, "serve.max_work"),
        ({"dataframe_records": [{"prompt": "a", "steps": 1000}]}, 504, "serve.timeout_s"),
    ]
    out = []
    for k in range(n):
        if k % 3 == 2:
            payload, status, message = bad[(k // 3) % len(bad)]
            out.append(("bad" if status == 400 else "deadline", payload, status, message))
        else:
            kind, payload = good[k % len(good)]
            out.append((kind, payload, 200, None))
    return out


@pytest.mark.integration
def test_mlflow_models_serve_under_load(tiny_models, store) -> None:
    """A real `mlflow models serve` of the champion: 200 requests, 4 at a time, mixing good,
    malformed, over-budget and past-deadline ones. Every reply has the expected status and
    reason, the server stays up, good replies stay deterministic, memory stays bounded.
    BENCHMARKS.md reports the figures this test logs (benchmarks/bench_serve.py)."""
    from concurrent.futures import ThreadPoolExecutor

    from imagen_ops.registry.register import RegisterPaths

    params = tiny_params("serve.timeout_s=2", "serve.max_work=4e6")
    metrics = write_metrics(store / "metrics.json", tiny_models, 0.5)
    register_params(params, RegisterPaths(store, tiny_models, metrics, store / "eval"))
    bin_dir = Path(sys.executable).parent
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    port, log = free_port(), store / "serve.log"
    cmd = [
        str(bin_dir / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/imagen-ops@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=store, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/ping", proc, log)
        first = post(f"{base}/invocations", load_requests(1)[0][1])
        assert first[0] == 200, first
        rss_start = server_rss_mb(proc.pid)

        def send(item):
            kind, payload, expected, message = item
            t0 = time.perf_counter()
            status, body = post(f"{base}/invocations", payload)
            return kind, expected, message, status, body, time.perf_counter() - t0

        requests = load_requests(200)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(send, requests))
        wall = time.perf_counter() - t0
        rss_end = server_rss_mb(proc.pid)
        assert proc.poll() is None, "the server is still up"

        for kind, expected, message, status, body, _ in replies:
            assert status == expected, (kind, status, body)
            if message is not None:
                assert message in body["message"], (kind, body["message"][:300])
        same = [
            r[4]["predictions"]
            for r in replies
            if r[4].get("predictions") and r[4]["predictions"][0]["seed"] == 3 and r[0] == "good"
        ]
        assert len(same) > 10 and all(p == same[0] for p in same), "deterministic under load"
        assert decode_png(same[0][0]["image"]).size == (32, 32)
        status, body = post(f"{base}/invocations", load_requests(1)[0][1])
        assert status == 200 and body["predictions"] == same[0], "answers after the load"
        assert rss_end < rss_start * 1.5 + 200, (rss_start, rss_end)

        summary = {
            "requests": len(replies),
            "wall_s": round(wall, 1),
            "rss_mb_start": round(rss_start),
            "rss_mb_end": round(rss_end),
        }
        for kind in ("good", "bad", "deadline"):
            lat = sorted(r[5] for r in replies if r[0] == kind)
            codes = sorted({r[3] for r in replies if r[0] == kind})
            summary[kind] = {
                "n": len(lat),
                "status": codes,
                "p50_ms": round(1000 * lat[len(lat) // 2]),
                "p95_ms": round(1000 * lat[int(len(lat) * 0.95)]),
                "max_ms": round(1000 * lat[-1]),
            }
        logging.getLogger(__name__).info("serve load: %s", json.dumps(summary))
        if os.environ.get("IMAGEN_OPS_LOAD_REPORT"):
            Path(os.environ["IMAGEN_OPS_LOAD_REPORT"]).write_text(json.dumps(summary, indent=2))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_champion_without_the_metric_is_replaced_with_a_reason() -> None:
    d = decide("alignment.overall", 0.3, None, True, 0.0, champion_version="4")
    assert d.promote and "champion version 4 has no alignment.overall" in d.reason


def test_register_refuses_metrics_of_other_weights_and_non_finite_weights(
    tiny_models, tmp_path
) -> None:
    from safetensors.torch import load_file, save_file

    from imagen_ops.registry.register import NotRegistrableError, check_registrable

    names = tuple(tiny_params().stage_names())
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    metrics_path = write_metrics(tmp_path / "metrics.json", models, 0.5)
    metrics = json.loads(metrics_path.read_text())
    check_registrable(models, names, metrics, metrics_path)  # its own weights: accepted

    # retrained weights, stale metrics: refused, naming both digests and the fix
    weights = models / "sr32" / "ema.safetensors"
    state = load_file(str(weights))
    first = next(iter(state))
    save_file({**state, first: state[first] + 1e-3}, str(weights))
    with pytest.raises(NotRegistrableError, match="measured on other weights") as err:
        check_registrable(models, names, metrics, metrics_path)
    assert metrics["model_sha256"] in str(err.value) and "dvc repro evaluate" in str(err.value)

    # an in-domain CLIP score measured with another scorer than the one packaged: refused
    from imagen_ops.config import ScorerConfig
    from imagen_ops.scorer import Scorer, load_scorer

    from .conftest import TINY_SCORER

    scorer = tmp_path / "scorer"
    Scorer(ScorerConfig(**TINY_SCORER), 16, 8).save(scorer)
    metrics = json.loads(write_metrics(metrics_path, models, 0.5).read_text())
    scored = {**metrics, "in_domain_clip_score": 20.0, "scorer_sha256": "0" * 64}
    with pytest.raises(NotRegistrableError, match="another scorer") as err:
        check_registrable(models, names, scored, metrics_path, scorer)
    assert "dvc repro evaluate" in str(err.value)
    scored["scorer_sha256"] = load_scorer(scorer).sha256  # what evaluate records
    check_registrable(models, names, scored, metrics_path, scorer)
    check_registrable(models, names, metrics, metrics_path, scorer)  # no score: nothing to check

    # non-finite weights: refused even with matching metrics
    save_file({**state, first: state[first] * float("nan")}, str(weights))
    metrics = json.loads(write_metrics(metrics_path, models, 0.5).read_text())
    with pytest.raises(NotRegistrableError, match=f"non-finite values \\({first}"):
        check_registrable(models, names, metrics, metrics_path)


@pytest.fixture(params=["local store", "tracking server"])
def any_store(request, store, monkeypatch):
    """The local sqlite store, or a real `mlflow server` that proxies artifacts over HTTP
    (artifact URIs `mlflow-artifacts:/`, nothing the client reads as a local path)."""
    if request.param == "local store":
        yield store
        return
    bin_dir = Path(sys.executable).parent
    port, log = free_port(), store / "server.log"
    cmd = [
        *(str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{store}/server/mlflow.db"),
        *("--artifacts-destination", str(store / "server" / "artifacts"), "--workers", "1"),
    ]
    (store / "server").mkdir()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=store, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, log)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        yield store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.integration
def test_warm_start_from_the_registered_champion(tiny_data, tiny_models, any_store, caplog):
    """`stages.base.train.init_from: champion` downloads the champion's stage, from a local
    store or through a tracking server; a second run (a new download folder) has the same
    fingerprint, so it resumes, not restarts."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    from imagen_ops.cli import main
    from imagen_ops.registry.pyfunc import ModelSpec
    from imagen_ops.registry.register import log_cascade_model
    from imagen_ops.registry.tracking import configure

    overrides = ("stages.base.train.init_from=champion", "stages.base.train.steps=2")
    params = tiny_params(*overrides)
    with mlflow.start_run(experiment_id=configure(params.registry)):
        spec = ModelSpec.from_params(params)
        info = log_cascade_model(tiny_models, spec, registered_model_name="imagen-ops")
    version = info.registered_model_version
    MlflowClient().set_registered_model_alias("imagen-ops", "champion", version)
    run = MlflowClient().get_run(MlflowClient().get_model_version("imagen-ops", version).run_id)
    served = os.environ["MLFLOW_TRACKING_URI"].startswith("http")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:" if served else "file://")
    store = any_store
    params_file = store / "params.yaml"
    params_file.write_text(yaml_dump(tiny_params(*overrides).model_dump(mode="json")))
    argv = [
        *("train", "--stage", "base", "--params", str(params_file), "--no-track", "-q"),
        *("--prepared", str(tiny_data["prepared"]), "--cache", str(tiny_data["cache"])),
        *("--out", str(store / "out"), "--checkpoints", str(store / "ck")),
        *("--metrics", str(store / "m.csv")),
    ]
    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    assert "warm start from" in caplog.text
    runs = sorted((store / "ck").iterdir())
    assert len(runs) == 1
    caplog.clear()
    assert main(argv) == 0
    assert sorted((store / "ck").iterdir()) == runs  # same fingerprint: no new run folder
    assert "resumed stage base" in caplog.text


@pytest.mark.integration
def test_sample_a_registered_model_from_any_folder(tiny_models, store, monkeypatch, caplog):
    """No params.yaml: the registry comes from MLFLOW_TRACKING_URI and the sampling
    settings from the packaged model, which match the project's; `-S` there is refused, and
    a project whose settings differ from the packaged ones says so."""
    from imagen_ops.cascade import Cascade
    from imagen_ops.cli import main
    from imagen_ops.images import to_uint8
    from imagen_ops.registry.register import RegisterPaths

    params = tiny_params("sample.seed=4")
    metrics = write_metrics(store / "metrics.json", tiny_models, 0.5)
    register_params(params, RegisterPaths(store, tiny_models, metrics, store / "eval"))
    elsewhere = store / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["sample", "a green star", "--model", "models:/imagen-ops@champion", "-q"]
    assert main(argv) == 0
    cascade = Cascade.from_dir(tiny_models, params.stage_names(), params.text)
    expected = to_uint8(cascade.sample(["a green star"], params.sample))[0]
    written = np.asarray(Image.open(elsewhere / "samples" / "sample.png"))
    assert np.array_equal(written, expected)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["samples"]
    assert main([*argv, "-S", "sample.steps=3"]) == 2
    assert "-S sample.steps=3: no params.yaml here" in caplog.text
    write_params(elsewhere / "params.yaml", "sample.seed=5")
    caplog.clear()
    assert main(argv) == 0
    assert "not those models:/imagen-ops@champion carries (seed differ)" in caplog.text


@pytest.mark.integration
def test_the_store_works_after_the_project_folder_moved(tiny_models, tmp_path, monkeypatch):
    """MLflow bakes absolute artifact URIs into the store; a moved project re-points them."""
    from mlflow.tracking._tracking_service import utils

    from imagen_ops.registry.register import RegisterPaths

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.chdir(old)
    # params.yaml's store (mlflow/mlflow.db beside the project), named absolutely here only
    # because MLflow caches stores by URI within a process; the moved project below uses
    # the relative URI of params.yaml, in a fresh process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{old}/mlflow/mlflow.db")
    params = tiny_params()
    (old / "eval").mkdir()
    metrics = write_metrics(old / "metrics.json", tiny_models, 0.5)
    register_params(params, RegisterPaths(old, tiny_models, metrics, old / "eval"))
    monkeypatch.chdir(tmp_path)
    shutil.move(old, new)
    write_params(new / "params.yaml")

    # a fresh process in the moved project, as a user would run it
    out = new / "red.png"
    argv = ["sample", "a red circle", "--model", "models:/imagen-ops@champion", "--steps", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "imagen_ops.cli", *argv, "--out", str(out), "-q"],
        cwd=new,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(out).size == (32, 32)
    assert "the MLflow store moved" in proc.stderr
    with sqlite3.connect(new / "mlflow" / "mlflow.db") as db:
        stale = db.execute(
            "SELECT count(*) FROM runs WHERE artifact_uri LIKE ?", (f"%{old}%",)
        ).fetchone()
    assert stale == (0,)


def test_a_store_outside_the_project_is_never_re_pointed(tmp_path, monkeypatch) -> None:
    """A team's sqlite store opened from a project (whose mlflow/artifacts exists) keeps
    its recorded artifact locations: only the project's own store follows a move."""
    from mlflow.tracking._tracking_service import utils

    from imagen_ops.registry.tracking import configure, follow_moved_store

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    team, project = tmp_path / "srv", tmp_path / "project"
    (project / "mlflow" / "artifacts").mkdir(parents=True)
    team.mkdir()
    monkeypatch.chdir(team)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{team}/mlflow.db")
    cfg = tiny_params().registry
    configure(cfg)
    elsewhere = "file:///mnt/team/mlflow/artifacts"  # another machine's mount: not here
    with sqlite3.connect(team / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = ?", (elsewhere,))
    monkeypatch.chdir(project)
    assert follow_moved_store(cfg) is None
    with sqlite3.connect(team / "mlflow.db") as db:
        recorded = db.execute("SELECT artifact_location FROM experiments").fetchall()
    assert elsewhere in {row[0] for row in recorded}


def test_reproduce_refuses_what_its_lineage_cannot_rebuild(store) -> None:
    """Uncommitted code, a warm start and a commit missing from this clone each stop
    `reproduce` with their own reason (not a digest mismatch, nor a cleanup error)."""
    from mlflow import MlflowClient

    from imagen_ops.registry.register import DIRTY_TAG, LINEAGE, MODEL_DIGEST_TAG
    from imagen_ops.registry.reproduce import reproduce
    from imagen_ops.registry.tracking import configure

    project = store / "project"
    project.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    write_params(project / "params.yaml", "stages.base.train.init_from=models:/other@champion")
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "p"], cwd=project, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.strip()
    cfg = tiny_params().registry
    experiment = configure(cfg)
    client = MlflowClient()
    client.create_registered_model("imagen-ops")

    def version(commit: str, dirty: str) -> str:
        run = client.create_run(
            experiment, tags={"imagen_ops.git_commit": commit, DIRTY_TAG: dirty}
        ).info.run_id
        client.log_artifact(run, str(project / "params.yaml"), LINEAGE)
        mv = client.create_model_version("imagen-ops", f"runs:/{run}/model", run_id=run)
        client.set_model_version_tag("imagen-ops", mv.version, MODEL_DIGEST_TAG, "0" * 64)
        return f"models:/imagen-ops/{mv.version}"

    with pytest.raises(ValueError, match=f"uncommitted changes under src/ \\({DIRTY_TAG}\\)"):
        reproduce(version(commit, "True"), project, cfg)
    with pytest.raises(ValueError, match=r"warm-started .*init_from: models:/other@champion"):
        reproduce(version(commit, "False"), project, cfg)
    missing = "1" * 40
    with pytest.raises(RuntimeError, match=f"git fetch origin {missing}"):
        reproduce(version(missing, "False"), project, cfg)
    listed = subprocess.run(
        ["git", "worktree", "list"], cwd=project, capture_output=True, text=True, check=True
    )
    assert len(listed.stdout.splitlines()) == 1, "no work tree left behind"


def test_a_training_run_that_fails_setting_up_ends_failed(store, tmp_path) -> None:
    """The tracked run starts before the trainer is built: a trainer that cannot start (no
    prepared data here) ends it FAILED, not RUNNING forever."""
    from mlflow import MlflowClient

    from imagen_ops.cli import main

    params = write_params(tmp_path / "params.yaml", "registry.track_training=true")
    argv = ["train", "--stage", "base", "--params", str(params), "-q"]
    assert main([*argv, "--prepared", str(tmp_path / "nothing")]) != 0
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("imagen-ops").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train-base", "FAILED")]


def test_a_warm_start_from_the_command_line_is_recorded(tiny_data, tiny_models, store, tmp_path):
    """`train --init-from DIR` is tracked as `stages.NAME.train.init_from` would be: the
    run's params name where the weights came from, not params.yaml's empty default."""
    from mlflow import MlflowClient

    from imagen_ops.cli import main

    params = write_params(
        tmp_path / "params.yaml", "registry.track_training=true", "stages.base.train.steps=1"
    )
    source = tmp_path / "runs #2"  # a path, not YAML: '#' starts no comment
    shutil.copytree(tiny_models, source)
    argv = [
        *("train", "--stage", "base", "--params", str(params), "-q"),
        *("--init-from", str(source), "--out", str(tmp_path / "out")),
        *("--prepared", str(tiny_data["prepared"]), "--cache", str(tiny_data["cache"])),
        *("--checkpoints", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.csv")),
    ]
    assert main(argv) == 0
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("imagen-ops").experiment_id])
    recorded = {k: v for k, v in run.data.params.items() if k.endswith("init_from")}
    assert recorded == {"train.init_from": str(source)}, recorded
