"""Shared fixtures: a tiny two-stage configuration and a project built from it.

The tiny cascade (16 px base, 16 -> 32 px super-resolution, a few thousand parameters)
runs every stage of the real pipeline in seconds on two cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from imagen_ops.config import Params, apply_overrides, parse_params

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(2)

TINY_UNET = {
    "channels": 16,
    "channel_mults": [1, 2],
    "num_res_blocks": [1, 1],
    "self_attention": [False, True],
    "cross_attention": [False, True],
    "attention_head_dim": 8,
    "embedding_dim": 32,
}
TINY_TRAIN = {
    "steps": 6,
    "batch_size": 8,
    "lr": 0.001,
    "warmup_steps": 2,
    "checkpoint_every": 3,
    "log_every": 2,
    "channels_last": False,
}

TINY_SCORER = {"channels": 8, "embed_dim": 16, "text_width": 16, "steps": 40, "batch_size": 8}


def tiny_raw() -> dict[str, Any]:
    """params.yaml content of the tiny configuration (a fresh dict each call)."""
    return {
        "data": {
            "synth": {"n": 48, "seed": 0, "resolution": 32},
            "prepare": {"val_fraction": 0.25},
        },
        "text": {"batch_size": 32},
        "stages": {
            "base": {"resolution": 16, "unet": dict(TINY_UNET), "train": dict(TINY_TRAIN)},
            "sr32": {
                "resolution": 32,
                "unet": {**TINY_UNET, "efficient": True},
                "train": dict(TINY_TRAIN),
            },
        },
        "sample": {"steps": 4, "guidance": [2.0, 1.0], "batch_size": 8},
        "scorer": dict(TINY_SCORER),
        "eval": {
            "num_samples": 4,
            "per_category": 1,
            "guidance_sweep": [1.0, 3.0],
            "sweep_samples": 4,
            "grid_size": 4,
            "fid_batch_size": 8,
        },
        "registry": {"track_training": False},
    }


def tiny_params(*overrides: str) -> Params:
    return parse_params(apply_overrides(tiny_raw(), overrides), "<tiny>")


def write_params(path: Path, *overrides: str) -> Path:
    path.write_text(yaml.safe_dump(apply_overrides(tiny_raw(), overrides), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """data/ (synthetic), prepared arrays and the embedding cache of the tiny config."""
    from imagen_ops.data.ingest import ingest
    from imagen_ops.data.prepare import prepare
    from imagen_ops.data.sources import synth_source
    from imagen_ops.text.cache import build_cache
    from imagen_ops.text.encoders import load_text_encoder

    params = tiny_params()
    root = tmp_path_factory.mktemp("tiny")
    ingest(synth_source(params.data.synth), root / "data", params.data.ingest, progress=False)
    prepared = prepare(
        root / "data", root / "prepared", [16, 32], params.data.prepare, progress=False
    )
    assert prepared["splits"]["val"] >= 4
    from imagen_ops.data.prepare import PreparedData

    captions = PreparedData.open(root / "prepared").table["caption"].tolist()
    build_cache(captions, load_text_encoder(params.text), root / "cache", progress=False)
    return {
        "root": root,
        "data": root / "data",
        "prepared": root / "prepared",
        "cache": root / "cache",
    }


@pytest.fixture(scope="session")
def tiny_models(tiny_data) -> Path:
    """artifacts/models of the tiny config: both stages trained for a few steps."""
    from imagen_ops.pipeline import train_settings
    from imagen_ops.train.trainer import Trainer, TrainPaths

    params, root = tiny_params(), tiny_data["root"]
    for name in params.stage_names():
        paths = TrainPaths(
            tiny_data["prepared"],
            tiny_data["cache"],
            root / "models" / name,
            root / "checkpoints" / name,
            root / f"train_{name}.csv",
        )
        Trainer(train_settings(params, name), paths, progress=False).fit()
    return root / "models"


# ------------------------------------------------------------------ registry helpers


def register_params(params, paths):
    """`register` as the CLI calls it: the registry settings, the model spec, all params."""
    from imagen_ops.registry.pyfunc import ModelSpec
    from imagen_ops.registry.register import register

    return register(
        params.registry,
        ModelSpec.from_params(params),
        paths,
        run_params=params.model_dump(mode="json"),
    )


def write_metrics(path: Path, models: Path, overall: float | None, fid: float = 50.0) -> Path:
    """metrics.json as evaluate writes it for the cascade in `models`."""
    from imagen_ops.cascade import cascade_digest

    alignment = None
    if overall is not None:
        alignment = {"balanced": overall, "overall": overall, "n_single": 64, "failures": {}}
    params = tiny_params()
    metrics = {"version": 1, "fid": fid, "kid_mean": 0.1, "alignment": alignment}
    metrics["sampling"] = params.sample.record(len(params.stages))
    metrics["model_sha256"] = cascade_digest(models, params.stage_names())
    path.write_text(json.dumps(metrics))
    return path
