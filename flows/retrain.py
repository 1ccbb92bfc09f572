"""The retraining flow: ingest -> DVC stages -> register and promote (Prefect 3).

    python -m flows.retrain         # one run on the project in this directory (make demo)
    python -m flows.serve           # the same flow on the cron schedule of params.yaml

dvc.yaml is regenerated from params.yaml first (a no-op when it is current), then each
DVC stage runs as its own task through `dvc repro <stage>`, so a stage whose data, code and
params are unchanged is skipped, a failed stage can be retried alone, and the run's logs
show each stage. Training runs nest under the flow's MLflow run. A lock keeps two runs from
writing the same data and model directories at once; every command the flow starts holds it
too, so a killed flow's stage still running keeps the next run out. Every path comes from
params.yaml's `paths` section; the flow reads params.yaml and no other file, as dvc.yaml's
stages do (`imagen-ops params apply RECIPE` writes a recipe into it).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.logging.handlers import APILogHandler
from prefect.states import Completed, State

from imagen_ops.config import Params, RegistryConfig, flatten, load_params
from imagen_ops.eval.evaluate import headline
from imagen_ops.eval.golden import GOLDEN_FILE
from imagen_ops.files import exclusive_lock, write_bytes_atomic, write_text_atomic
from imagen_ops.pipeline import pipeline_stages
from imagen_ops.registry.tracking import tracking_uri

PARAMS = "params.yaml"
"""The one parameters file: dvc.yaml's stages read it, so the flow reads it too."""

_LOCK_FD: int | None = None
"""The project lock's descriptor while a flow run holds it: every command inherits it."""

_LEVEL = re.compile(r"^(?:\d\d:\d\d:\d\d )?(WARNING|ERROR|CRITICAL)\b")


def _env() -> dict[str, str]:
    """Stage commands need this interpreter's `imagen-ops` first on PATH; their progress
    bars write one line per `TQDM_MININTERVAL` seconds into the flow log, not one per step."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("TQDM_MININTERVAL", "30")
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command, streaming its output into the flow log line by line as it happens
    (a WARNING or ERROR line at its own level); raise with the tail on failure. Returns its
    stdout (the commands print results there and log to stderr). The command inherits the
    project lock: if the flow is killed, the lock lasts until the command ends."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=() if _LOCK_FD is None else (_LOCK_FD,),
    )
    stdout: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=60)

    def pump(stream, keep: list[str] | None) -> None:
        for line in stream:  # universal newlines: a progress bar's \r ends a line too
            if keep is not None:
                keep.append(line)
            if text := line.rstrip():
                level = _LEVEL.match(text)
                logger.log(getattr(logging, level.group(1)) if level else logging.INFO, text)
                tail.append(text)

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, stdout), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, None), daemon=True),
    ]
    for reader in readers:
        reader.start()
    proc.wait()
    for reader in readers:
        reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))
    return "".join(stdout)


def _params(root: Path) -> Params:
    return load_params(root / PARAMS)


def _pending(root: Path, params: Params) -> Path:
    """Marks synthetic scenes added by a run that has not finished (registered) yet."""
    return root / Path(params.paths.lock).with_suffix(".pending")


@task
def ingest(project: str, source: str | None, push: bool) -> dict[str, Any]:
    """New data into data/ (a source, or the synthetic default), then `dvc add data`.

    Only records whose content data/ does not hold yet are added. The synthetic source adds
    `data.synth.new_per_run` scenes per finished run: a run retried or restarted after a
    kill adds none while the scenes of the unfinished one are still untrained (else its
    training could never resume, and a failing schedule would grow the data every week)."""
    root = Path(project)
    params = _params(root)
    cli = [sys.executable, "-m", "imagen_ops.cli"]
    if source:
        out = _run([*cli, "data", "ingest", source, "-q"], root)
    else:
        pending, extra = _pending(root, params), []
        if pending.is_file() and params.data.synth.new_per_run:
            get_run_logger().warning(
                "an unfinished run added scenes (%s): this run trains on them, adding none",
                pending.read_text().strip(),
            )
            extra = ["-S", "data.synth.new_per_run=0"]
        elif params.data.synth.new_per_run:
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            write_text_atomic(pending, f"scenes added by the run of {since}\n")
        out = _run([*cli, "data", "synth", "-q", *extra], root)
    report = json.loads(out[out.index("{") : out.rindex("}") + 1])
    add_data(root, params.paths.data, push)
    return report


@task(retries=1, retry_delay_seconds=5)
def add_data(root: Path, data: str, push: bool) -> None:
    """`dvc add` (and push) the data: retried alone, never adding data twice."""
    _run([sys.executable, "-m", "dvc", "add", data], root)
    if push:
        _run([sys.executable, "-m", "dvc", "push", f"{data}.dvc"], root)


@task
def write_pipeline(project: str) -> list[str]:
    """dvc.yaml from params.yaml (unchanged when current); returns the stage names in order."""
    root = Path(project)
    _run([sys.executable, "-m", "imagen_ops.cli", "pipeline", "write"], root)
    return [s.name for s in pipeline_stages(_params(root))]


@task
def ensure_golden(project: str) -> None:
    """The golden prompt set for the paired gate: made once (deterministic from params) and
    versioned with `dvc add`. A set golden.dvc records is frozen: golden/ must hash as
    golden.dvc says, whether it was there (an edited file, a pulled pointer without
    `dvc checkout`) or made again where it was missing (a fresh clone); else the run stops
    with golden.dvc as it was."""
    root = Path(project)
    golden = _params(root).paths.golden
    pointer = root / f"{golden}.dvc"
    recorded = pointer.read_bytes() if pointer.is_file() else None
    made = not (root / golden / GOLDEN_FILE).is_file()
    if made:
        _run([sys.executable, "-m", "imagen_ops.cli", "golden", "make"], root)
    # DVC's own hash decides (`dvc status` says only "not in cache" without a cache)
    _run([sys.executable, "-m", "dvc", "add", golden], root)
    if recorded is not None and _dir_md5(pointer.read_bytes()) != _dir_md5(recorded):
        write_bytes_atomic(pointer, recorded)
        if made:
            shutil.rmtree(root / golden)
            why = (
                f"{golden}/ is missing, and params.yaml's registry.golden_per_category / "
                f"golden_seed now make another set than {pointer.name} records"
            )
        else:
            why = f"{golden}/ is not the set {pointer.name} records (edited, or not checked out)"
        raise GoldenSetChangedError(
            f"{why}: `dvc checkout {pointer.name}` (or `dvc pull {pointer.name}`) restores the "
            f"frozen set; delete {pointer.name} to start a new one"
        )


def _dir_md5(dvc_file: bytes) -> str:
    return yaml.safe_load(dvc_file)["outs"][0]["md5"]


class GoldenSetChangedError(RuntimeError):
    """The golden set would change under golden.dvc: promotions would compare other prompts."""


@task
def why_train(project: str, stages: list[str], report: dict[str, Any]) -> str | None:
    """Why this run must reproduce and register, or None: no new data, every pipeline stage
    up to date (params, code and data unchanged) and what it would register (weights,
    scorer, metrics, packaged settings) already registered, completely."""
    from imagen_ops.registry.register import registered_project_version

    root = Path(project)
    if report.get("kept"):
        return f"{report['kept']} new records"
    status = _run([sys.executable, "-m", "dvc", "status", "--json", *stages], root)
    if stale := json.loads(status or "{}"):
        return f"stages out of date: {', '.join(sorted(stale))}"
    if registered_project_version(root, _params(root)):
        return None
    return "the current model and its metrics have no complete registered version yet"


@task(retries=1, retry_delay_seconds=5)
def repro(project: str, target: str, parent_run_id: str | None) -> str:
    """`dvc repro` one stage; an unchanged stage is skipped."""
    env = _env()
    if parent_run_id:
        from imagen_ops.registry.tracking import PARENT_RUN_ENV

        env[PARENT_RUN_ENV] = parent_run_id
    return _run([sys.executable, "-m", "dvc", "repro", target], Path(project), env)


@task
def register(project: str, run_id: str | None) -> dict[str, Any]:
    """Log the run and the model; challenger alias; champion only if the gate passes."""
    from imagen_ops.registry.register import register_project

    root = Path(project)
    return register_project(root, _params(root), run_id)


def _end_stale_runs(params: Params) -> None:
    """Mark KILLED the MLflow runs that killed flow runs left RUNNING (under the lock, none
    of them is live): on every run, "no change" included."""
    from imagen_ops.registry.tracking import end_stale_runs

    for run_id in end_stale_runs(params.registry, "retrain"):
        get_run_logger().warning(
            "MLflow run %s left RUNNING by a killed flow run or stage marked KILLED", run_id
        )


def _start_mlflow_run(params: Params) -> str | None:
    from imagen_ops.registry.tracking import KIND_TAG, start_run

    return start_run(params.registry, "retrain", {KIND_TAG: "retrain"})


def _end_mlflow_run(params: Params, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    from imagen_ops.registry.tracking import configure

    configure(params.registry)
    MlflowClient().set_terminated(run_id, status)


@contextmanager
def _held(path: Path) -> Iterator[None]:
    """The project lock, its descriptor handed to every command the run starts."""
    global _LOCK_FD
    with exclusive_lock(path) as fd:
        _LOCK_FD = fd
        try:
            yield
        finally:
            _LOCK_FD = None


@contextmanager
def _library_logs() -> Iterator[None]:
    """The library's own INFO logs (the gate's accuracies, the registered version, a moved
    store) in this flow run's log: Prefect would otherwise pass only its own loggers'."""
    library = logging.getLogger("imagen_ops")
    handler, level = APILogHandler(), library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


@flow(name="imagen-ops-retrain", log_prints=False)
def retrain(project: str = ".", source: str | None = None, push: bool = False) -> dict | State:
    """Ingest new data, reproduce the DVC stages, register the model, gate the champion.

    `source` defaults to `data.ingest.source` (None: the synthetic shapes); a relative path
    is read from the project. With nothing new and nothing changed the run ends early in
    state Completed("no change"), with no training and no new model version."""
    logger = get_run_logger()
    root = Path(project).resolve()
    params = _params(root)
    source = source or params.data.ingest.source
    with _held(root / params.paths.lock), _library_logs():
        cwd = Path.cwd()
        os.chdir(root)  # MLflow's sqlite URI and artifact root are relative to the project
        run_id = None
        try:
            report = ingest(str(root), source, push)
            if source is None:  # the shapes oracle can judge the golden prompts
                ensure_golden(str(root))
            stages = write_pipeline(str(root))
            _end_stale_runs(params)
            reason = why_train(str(root), stages, report)
            if reason is None:
                _pending(root, params).unlink(missing_ok=True)
                logger.info("no change: no new data, every stage up to date, model registered")
                return Completed(message="no change", data={"state": "no change", "ingest": report})
            logger.info("training: %s", reason)
            run_id = _start_mlflow_run(params)
            for stage in stages:
                repro(str(root), stage, run_id)
            result = register(str(root), run_id)
            _pending(root, params).unlink(missing_ok=True)
        except BaseException:
            if run_id is not None:  # a failed run never stays RUNNING (and moves no alias)
                _end_mlflow_run(params, run_id, "FAILED")
            raise
        finally:
            os.chdir(cwd)
    decision = result["decision"]
    metrics = json.loads((root / params.paths.metrics).read_text())
    _publish(result, metrics, report)
    _link(result, params.registry)
    logger.info(decision["reason"])
    return {**result, "ingest": report}


def _publish(result: dict[str, Any], metrics: dict[str, Any], report: dict[str, Any]) -> None:
    d = result["decision"]
    champion = "n/a" if d["champion"] is None else f"{d['champion']:.4g}"
    create_markdown_artifact(
        key="retrain-summary",
        markdown=(
            f"## imagen-ops retraining\n\n"
            f"* model **{result['model']}** version **{result['version']}** (alias challenger)\n"
            f"* {d['metric']}: challenger **{d['challenger']:.4g}**, champion {champion}"
            + (
                f" (paired, N={d['n']}, p={d['p_value']:.3g})"
                if d.get("p_value") is not None
                else ""
            )
            + "\n"
            f"* decision: **{'promoted to champion' if d['promote'] else 'champion kept'}**"
            f" ({d['reason']})\n"
            f"* data: {report.get('kept', 0)} records added, {report.get('rows', '?')} in total\n"
        ),
        description="retraining decision",
    )
    rows = [{"metric": k, "value": v} for k, v in flatten(headline(metrics)).items()]
    rows.append({"metric": "num_images", "value": metrics.get("num_images")})
    create_table_artifact(key="retrain-metrics", table=rows, description="evaluation metrics")


def _link(result: dict[str, Any], cfg: RegistryConfig) -> None:
    """Links in the flow run's artifacts: the MLflow run and its sample grid, which anyone
    with the MLflow UI can open (a file on the flow's machine would be neither reachable
    nor kept: the next run overwrites it)."""
    run = f"{ui_url(cfg)}/#/experiments/{result['experiment_id']}/runs/{result['run_id']}"
    create_link_artifact(
        key="mlflow-run",
        link=run,
        link_text=f"MLflow run {result['run_id']} (model version {result['version']})",
        description="the run with params, metrics, grid, report and the model",
    )
    create_link_artifact(
        key="sample-grid",
        link=f"{run}/artifacts/eval/grid.png",
        link_text=f"sample grid of the held-out prompts (model version {result['version']})",
        description="evaluation samples",
    )


def ui_url(cfg: RegistryConfig) -> str:
    """The MLflow UI: the tracking server itself where runs go to one, else `ui_url`."""
    uri = tracking_uri(cfg)
    return (uri if uri.startswith(("http://", "https://")) else cfg.ui_url).rstrip("/")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".")
    parser.add_argument("--source", help="new data to ingest (default: synthetic shapes)")
    parser.add_argument("--push", action="store_true", help="dvc push the data afterwards")
    args = parser.parse_args()
    source = args.source
    if source and "://" not in source:  # a path from here, not from the project
        source = str(Path(source).resolve())
    result = retrain(args.project, source, args.push)
    if result.get("state") == "no change":
        sys.stdout.write("\nimagen-ops retraining: no change (nothing new, nothing to train)\n")
        return
    root = Path(args.project).resolve()
    params = _params(root)
    paths = params.paths
    d = result["decision"]
    lines = [
        "",
        "imagen-ops retraining finished",
        f"  decision      {d['reason']}",
        f"  champion      models:/{result['model']}@champion"
        f" (version {result['champion_version']})",
        f"  this run      version {result['version']} (@challenger)",
        f"  MLflow        run {result['run_id']} ({_ui_hint(params.registry)})",
        f"  sample grid   {root / paths.eval / 'grid.png'}",
        f"  metrics       {root / paths.metrics}",
        f"  report        {root / paths.eval / 'report.html'}",
        "  try           .venv/bin/imagen-ops sample 'a red circle' --model "
        f"models:/{result['model']}@champion --out samples/red_circle.png",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


def _ui_hint(cfg: RegistryConfig) -> str:
    uri = tracking_uri(cfg)
    return ui_url(cfg) if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"


if __name__ == "__main__":
    main()
