"""The DVC stage graph, derived from params.yaml: one owner for stage names, paths and reads.

`dvc.yaml` is generated from here (`imagen-ops pipeline write`; a test and `--check` keep
the committed file current), so a cascade of any depth gets one `train_<stage>` per stage
of `params.yaml` and an `evaluate` that depends on all of them. Every command names its
inputs and outputs on its command line, from `params.paths`.

Each stage declares the params.yaml keys its command reads: `params` change its outputs
(DVC's `params:` list, so a change reruns it), `untracked` only change what it logs (MLflow
tracking, preview samples). The command reads its settings through a `ParamsView` of
exactly those keys, so a read that the declaration does not cover fails loudly instead of
leaving dvc.yaml silently incomplete.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagen_ops.charts import chart_path
from imagen_ops.config import Params, TrainSettings
from imagen_ops.files import sha256_file, sha256_tree, write_text_atomic

__all__ = [
    "TRAIN_CODE",
    "ParamsView",
    "PipelineStage",
    "code_digest",
    "pipeline_stages",
    "prune_lock",
    "render_dvc_yaml",
    "train_settings",
    "view_for",
]

HEADER = """\
# Generated from params.yaml by `imagen-ops pipeline write`: edit params.yaml (stages,
# paths), then regenerate; tests fail while this file is stale. `dvc repro` rebuilds the
# cascade from data/ (data.dvc) and params.yaml; stage commands run the `imagen-ops` on
# PATH (the Makefile puts .venv/bin first).
"""

# Code each kind of stage runs, relative to the project root (DVC code dependencies; a
# test traces each stage's command and fails on a file these lists miss). config.py is in
# every list: the defaults of the keys params.yaml leaves out are values DVC cannot see.
SHARED_CODE = (
    "src/imagen_ops/config.py",
    "src/imagen_ops/choices.py",
    "src/imagen_ops/device.py",
    "src/imagen_ops/files.py",
)
PREPARE_CODE = (*SHARED_CODE, "src/imagen_ops/data/ingest.py", "src/imagen_ops/data/prepare.py")
ENCODE_CODE = (*SHARED_CODE, "src/imagen_ops/data/prepare.py", "src/imagen_ops/text")
# what reads the prepared images and the embedding cache back
READ_CODE = ("src/imagen_ops/data/prepare.py", "src/imagen_ops/images.py", "src/imagen_ops/text")
TRAIN_CODE = (
    *SHARED_CODE,
    *READ_CODE,
    "src/imagen_ops/data/dataset.py",
    "src/imagen_ops/models",
    "src/imagen_ops/diffusion",
    "src/imagen_ops/train",
    "src/imagen_ops/cascade.py",
    "src/imagen_ops/charts.py",
)
SCORER_CODE = (
    *SHARED_CODE,
    *READ_CODE,
    "src/imagen_ops/scorer.py",
    "src/imagen_ops/train/scorer.py",
    "src/imagen_ops/data/shapes.py",
    "src/imagen_ops/models",
)
EVAL_CODE = (
    *SHARED_CODE,
    *READ_CODE,
    "src/imagen_ops/eval",
    "src/imagen_ops/diffusion",
    "src/imagen_ops/models",
    "src/imagen_ops/cascade.py",
    "src/imagen_ops/scorer.py",
    "src/imagen_ops/data/shapes.py",  # the alignment judge draws and reads shapes
    "src/imagen_ops/charts.py",
)
PACKAGE = Path(__file__).resolve().parent  # src/imagen_ops in a checkout, else site-packages
PACKAGE_PREFIX = "src/imagen_ops/"


def code_digest(code: Sequence[str], package: Path | None = None) -> str:
    """sha256 over the Python sources of `code` (paths as dvc.yaml lists them), read from
    the package that runs: what a training checkpoint records of the code that wrote it,
    so that a stage DVC reruns for a code change never resumes the old code's steps."""
    root = package or PACKAGE
    parts = []
    for entry in code:
        if not entry.startswith(PACKAGE_PREFIX):
            raise ValueError(f"{entry}: code outside {PACKAGE_PREFIX} cannot be digested")
        path = root / entry.removeprefix(PACKAGE_PREFIX)
        if not path.exists():
            raise FileNotFoundError(f"{path}: {entry} is missing from the installed package")
        digest = sha256_tree(path, "*.py") if path.is_dir() else sha256_file(path)
        parts.append(f"{entry}:{digest}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class PipelineStage:
    """One DVC stage: its command, what it reads and what it writes."""

    name: str
    cmd: list[str]
    deps: list[str]
    params: list[str]  # params.yaml keys that change the outputs (DVC params)
    outs: list[Any]
    untracked: list[str] = field(default_factory=list)  # keys read only for logging
    plots: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    def to_dvc(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "cmd": " ".join(self.cmd),
            "deps": self.deps,
            "params": self.params,
            "outs": self.outs,
        }
        if self.plots:
            entry["plots"] = self.plots
        if self.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in self.metrics]
        return entry


def train_stage_name(stage: str) -> str:
    return f"train_{stage}"


def encoder_folder(params: Params) -> list[str]:
    """`text.encoder` when it names a local folder: its weights can change under the same
    name (a packaged encoder is pinned by sha256, a hub one by `text.revision`)."""
    from imagen_ops.text.encoders import PACKAGED_ENCODERS

    name = params.text.encoder
    folder = Path(name).expanduser()  # DVC does not expand `~`
    return [str(folder)] if name not in PACKAGED_ENCODERS and folder.is_dir() else []


def pipeline_stages(params: Params) -> list[PipelineStage]:
    """prepare -> encode_text -> train_scorer, train_<stage> for each cascade stage ->
    evaluate."""
    p, names = params.paths, params.stage_names()
    encoder = encoder_folder(params)  # a dependency of both stages that run the encoder
    stages = [
        PipelineStage(
            "prepare",
            ["imagen-ops", "prepare", "--data", p.data, "--out", p.prepared],
            [p.data, *PREPARE_CODE],
            ["data.prepare", *(f"stages.{n}.resolution" for n in names)],
            [p.prepared],
        ),
        PipelineStage(
            "encode_text",
            ["imagen-ops", "encode-text", "--prepared", p.prepared, "--out", p.text_cache],
            [p.prepared, *encoder, *ENCODE_CODE],
            ["text"],
            [p.text_cache],
        ),
    ]
    stages.append(
        PipelineStage(
            "train_scorer",
            [
                *("imagen-ops", "train-scorer", "--prepared", p.prepared, "--cache", p.text_cache),
                *("--out", p.scorer, "--metrics", p.scorer_metrics),
            ],
            [p.prepared, p.text_cache, *encoder, *SCORER_CODE],
            ["scorer", f"stages.{names[0]}.resolution", "text"],
            # its report is a plain output: `dvc metrics show` stays the one headline row
            [p.scorer, {p.scorer_metrics: {"cache": False}}],
        )
    )
    for i, name in enumerate(names):
        lowres = [f"stages.{names[i - 1]}.resolution"] if i else []
        stages.append(
            PipelineStage(
                train_stage_name(name),
                [
                    *("imagen-ops", "train", "--stage", name, "--prepared", p.prepared),
                    *("--cache", p.text_cache, "--out", p.model(name)),
                    *("--checkpoints", p.checkpoint_dir(name)),
                    *("--metrics", p.train_metrics(name)),
                ],
                [p.prepared, p.text_cache, *TRAIN_CODE],
                [f"stages.{name}", *lowres, "text"],
                [p.model(name), {p.train_metrics(name): {"cache": False}}],
                untracked=["registry", "sample"],
                plots=[{str(chart_path(p.train_metrics(name))): {"cache": False}}],
            )
        )
    stages.append(
        PipelineStage(
            "evaluate",
            [
                *("imagen-ops", "evaluate", "--prepared", p.prepared, "--cache", p.text_cache),
                *("--models", p.models, "--out", p.eval, "--metrics", p.metrics),
                *("--scores", p.scores),
                *("--sweep", p.guidance_sweep, "--feature-cache", p.fid_cache),
                *("--scorer", p.scorer),
            ],
            [p.prepared, p.text_cache, *(p.model(n) for n in names), p.scorer, *EVAL_CODE],
            ["sample", "eval", "text"],
            [p.eval, {p.metrics: {"cache": False}}, {p.guidance_sweep: {"cache": False}}],
            plots=[{str(chart_path(p.guidance_sweep)): {"cache": False}}],
            metrics=[p.scores],
        )
    )
    return stages


def render_dvc_yaml(params: Params) -> str:
    """The text of dvc.yaml for `params` (stable: same params, same bytes)."""
    # plots are PNG charts (imagen_ops.charts): `dvc plots show` renders them without
    # JavaScript, so its page opens offline; the CSVs beside them hold the numbers
    doc = {"stages": {s.name: s.to_dvc() for s in pipeline_stages(params)}}
    return HEADER + "\n" + yaml.safe_dump(doc, sort_keys=False, width=100)


def prune_lock(lock: Path, params: Params) -> list[str]:
    """Drop dvc.lock entries of stages the graph no longer has (a renamed or removed
    cascade stage); DVC itself keeps them forever. Returns the names dropped."""
    if not lock.is_file():
        return []
    doc = yaml.safe_load(lock.read_text()) or {}
    names = {s.name for s in pipeline_stages(params)}
    stale = [name for name in doc.get("stages", {}) if name not in names]
    if stale:
        for name in stale:
            del doc["stages"][name]
        write_text_atomic(lock, yaml.safe_dump(doc, sort_keys=False))
    return stale


def stage_by_name(params: Params, name: str) -> PipelineStage:
    stages = {s.name: s for s in pipeline_stages(params)}
    if name not in stages:
        raise KeyError(f"no pipeline stage {name!r} (stages: {', '.join(stages)})")
    return stages[name]


class ParamsView:
    """The settings one command may read: values under its declared keys, nothing else.

    Stage names (the cascade's structure) are always readable: dvc.yaml itself is built
    from them.
    """

    def __init__(self, params: Params, keys: Sequence[str], owner: str):
        self._params, self.keys, self.owner = params, tuple(keys), owner

    @property
    def stage_names(self) -> list[str]:
        return self._params.stage_names()

    def __getitem__(self, key: str) -> Any:
        if not any(key == k or key.startswith(k + ".") for k in self.keys):
            raise KeyError(
                f"{self.owner} reads {key!r}, which its declaration in imagen_ops/pipeline.py "
                f"does not list ({', '.join(self.keys)}); add it there so dvc.yaml tracks it"
            )
        node: Any = self._params
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        return node

    def lowres_of(self, stage: str) -> int | None:
        """Resolution `stage` conditions on (the previous stage's), None for the base."""
        names = self.stage_names
        i = names.index(stage)
        return None if i == 0 else self[f"stages.{names[i - 1]}.resolution"]


def view_for(params: Params, stage: str) -> ParamsView:
    """The view of `params` that pipeline stage `stage` (e.g. "train_base") may read."""
    spec = stage_by_name(params, stage)
    return ParamsView(params, [*spec.params, *spec.untracked], f"stage {stage}")


def train_settings(params: Params, name: str) -> TrainSettings:
    """What stage `name`'s training reads, through its declared view."""
    view = view_for(params, train_stage_name(name))
    names = view.stage_names
    return TrainSettings(
        name=name,
        stage=view[f"stages.{name}"],
        text=view["text"],
        lowres=view.lowres_of(name),
        preview=view["sample"].plain().for_stages([names.index(name)], len(names)),
    )
