"""The retraining flow: the lock, and the Prefect flow end to end on the tiny config."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagen_ops.files import LockedError, exclusive_lock

from .conftest import tiny_raw, write_params
from .test_dvc import BIN, FAST, REPO, make_project


def run_cli(args: list[str], root: Path) -> str:
    """`imagen-ops ARGS` in the project; its stdout (results; logs go to stderr)."""
    proc = subprocess.run(
        ["imagen-ops", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# ---------------------------------------------------------------------------- the lock


def test_lock_is_exclusive_and_released(tmp_path) -> None:
    path = tmp_path / "artifacts" / ".retrain.lock"
    with exclusive_lock(path):
        with pytest.raises(LockedError) as err, exclusive_lock(path):
            pytest.fail("a second holder got the lock")
        message = str(err.value)
        assert str(path) in message and f"pid {os.getpid()} since" in message
        assert "wait for it to finish" in message
    with exclusive_lock(path):  # released on exit from the block
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path) -> None:
    path = tmp_path / ".retrain.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from imagen_ops.files import exclusive_lock\n"
            f"with exclusive_lock({str(path)!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid} since"), exclusive_lock(path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive_lock(path):  # a crashed holder leaves no stale lock
        pass


@pytest.mark.parametrize("ending", ["killed", "cancelled"])
def test_lock_outlives_a_killed_holder_while_its_commands_run(tmp_path, ending) -> None:
    """The flow hands the lock's descriptor to its commands: kill the flow (SIGKILL: no
    cleanup runs), or cancel it (SIGTERM: an exception unwinds the lock's block), and a
    stage it started (still writing the model folders) keeps the next run out until it
    ends."""
    path = tmp_path / ".retrain.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, subprocess, sys, time\n"
            "from imagen_ops.files import exclusive_lock\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))\n"
            f"with exclusive_lock({str(path)!r}) as fd:\n"
            "    child = subprocess.Popen(['sleep', '120'], pass_fds=[fd])\n"
            "    print(child.pid, flush=True)\n"
            "    time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL if ending == "killed" else signal.SIGTERM)
        holder.wait()
        with pytest.raises(LockedError), exclusive_lock(path):
            pytest.fail("the ended run's command still runs, yet the lock was free")
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.time() + 10
    while True:  # the command gone (reaped by init), the lock is free
        try:
            with exclusive_lock(path):
                break
        except LockedError:
            assert time.time() < deadline, "the lock outlived the last holder"
            time.sleep(0.05)


# ----------------------------------------------------------------------------- the flow


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect API (opt-in: starting it takes ~10-20 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture
def flow_env(monkeypatch) -> None:
    """Stage subprocesses: this venv first on PATH, one thread; MLflow from params.yaml."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("imagen-ops").aliases.items()}


@pytest.mark.integration
def test_retrain_flow_second_and_third_runs(tmp_path, prefect_harness, flow_env):
    """Run 1 trains and registers; run 2 with nothing new ends "no change"; run 3, after
    new scenes arrive, ingests only those, retrains, registers and gates; a killed run's
    MLflow run is marked KILLED; a failed run ends FAILED and moves no alias; then
    `later_runs`."""
    from mlflow import MlflowClient

    from flows.retrain import retrain

    settings = (*FAST, "registry.track_training=true", "registry.golden_per_category=3")
    root = make_project(tmp_path / "project", *settings)
    cwd = Path.cwd()

    first = retrain(project=str(root))
    assert Path.cwd() == cwd, "the flow restores the working directory"
    assert first["ingest"]["kept"] == first["ingest"]["rows"] == 48
    assert (root / "data.dvc").is_file() and (root / "dvc.lock").is_file()
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["alignment"] is not None
    decision = first["decision"]
    assert decision["promote"] and decision["reason"] == "no champion yet"
    assert decision["metric"] == "golden.accuracy" and decision["n"] == 12
    assert first["version"] == first["champion_version"] == "1"
    # the version packages the scorer (best of N) and its run logs the scorer's accuracy
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow/mlflow.db")
    model = Path(mlflow.artifacts.download_artifacts("models:/imagen-ops/1", dst_path=tmp_path))
    assert (model / "artifacts" / "cascade" / "scorer" / "config.json").is_file()
    # the flow run publishes its decision, metrics and links as Prefect artifacts
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        published = {a.key: a for a in prefect.read_artifacts() if a.key}
    assert {"retrain-summary", "retrain-metrics", "mlflow-run", "sample-grid"} <= set(published)
    assert first["run_id"] in published["mlflow-run"].data
    assert '"alignment.balanced"' in published["retrain-metrics"].data  # MLflow's name for it
    assert "promoted to champion" in published["retrain-summary"].data
    grid = f"/#/experiments/{first['experiment_id']}/runs/{first['run_id']}/artifacts/eval/grid.png"
    assert grid in published["sample-grid"].data  # the run's own copy: any UI user opens it
    # the library's INFO logs (the gate, the registration) reach the flow run's log
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    logs: list = []
    with get_client(sync_client=True) as prefect:
        while batch := prefect.read_logs(offset=len(logs), limit=200):
            logs += batch
    messages = [entry.message for entry in logs if entry.name.startswith("imagen_ops.")]
    assert any(m.startswith("registered imagen-ops version 1") for m in messages)
    assert any(m.startswith("golden set, challenger") for m in messages)
    # the golden set is versioned with DVC beside the data
    assert (root / "golden.dvc").is_file() and (root / "golden/prompts.jsonl").is_file()

    # the store lives in the project (params' relative sqlite URI, resolved there)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db")
    assert aliases(client) == {"champion": "1", "challenger": "1"}
    run = client.get_run(first["run_id"])
    assert run.data.tags["imagen_ops.promoted"] == "True"
    assert any(k.startswith("scorer.") for k in run.data.metrics)
    assert run.data.tags["imagen_ops.git_commit"]
    data_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    assert run.data.tags["imagen_ops.data_version"] == data_md5
    version = client.get_model_version("imagen-ops", "1")
    assert version.tags["imagen_ops.model_sha256"] == metrics["model_sha256"]
    assert "lineage/dvc.lock" in {a.path for a in client.list_artifacts(first["run_id"], "lineage")}
    trained = {a.path for a in client.list_artifacts(first["run_id"], "train")}
    assert {"train/train_base.csv", "train/train_base.png", "train/train_sr32.csv"} <= trained
    assert "commit" in version.description and "gate" in version.description
    # the logged report names the version, the commit, the data version and the date
    page = Path(client.download_artifacts(first["run_id"], "eval/report.html", str(tmp_path)))
    page = page.read_text()
    assert "imagen-ops version 1" in page and run.data.tags["imagen_ops.git_commit"] in page
    assert data_md5 in page and "UTC" in page
    # version 1 rebuilds bit for bit from what it stored (a temporary git work tree)
    rebuilt = json.loads(run_cli(["reproduce", "models:/imagen-ops/1", "-q"], root))
    assert rebuilt["identical"] and rebuilt["expected_sha256"] == metrics["model_sha256"]
    assert rebuilt["packaged_sha256"] == rebuilt["rebuilt_sha256"]  # what it serves, rebuilt
    # the training runs nest under the flow's run
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{first['run_id']}'"
    )
    assert sorted(r.info.run_name for r in children) == ["train-base", "train-sr32"]

    weights = root / "artifacts/models/base/ema.safetensors"
    stamp, lock = weights.stat().st_mtime_ns, (root / "dvc.lock").read_text()
    tracked = {
        p: p.read_bytes() for p in [root / "dvc.yaml", root / "data.dvc", *root.glob("reports/*")]
    }

    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists(), "one store"

    # run 2, nothing new: "no change", no training, no version, every tracked file as it was
    second = retrain(project=str(root))
    assert second["state"] == "no change" and second["ingest"]["seen"] == 0
    assert weights.stat().st_mtime_ns == stamp and (root / "dvc.lock").read_text() == lock
    assert {p: p.read_bytes() for p in tracked} == tracked
    assert versions(client) == ["1"] and aliases(client) == {"champion": "1", "challenger": "1"}

    # a flow run killed earlier left its MLflow run RUNNING: the next training run ends it
    stale = client.create_run(
        run.info.experiment_id, run_name="retrain", tags={"imagen_ops.kind": "retrain"}
    ).info.run_id

    # run 3, new scenes arrive (the synthetic source grows by 8): only they are ingested
    write_params(
        root / "params.yaml", *FAST, "registry.track_training=true", "data.synth.new_per_run=8"
    )
    third = retrain(project=str(root))
    assert third["ingest"]["seen"] == third["ingest"]["kept"] == 8
    assert third["ingest"]["rows"] == 56
    assert weights.stat().st_mtime_ns != stamp, "new data: the base stage retrained"
    assert third["version"] == "2" and versions(client) == ["1", "2"]
    assert client.get_run(stale).info.status == "KILLED"
    assert aliases(client)["challenger"] == "2"
    assert aliases(client)["champion"] == third["champion_version"]
    gate = third["decision"]  # paired: both versions sampled on the same 12 golden prompts
    assert gate["test"] == "mcnemar" and gate["n"] == 12 and gate["p_value"] is not None

    # a run already in progress: the flow stops at once, naming the lock
    with exclusive_lock(root / "artifacts" / ".retrain.lock"), pytest.raises(LockedError):
        retrain(project=str(root))

    # a run that fails after its MLflow run started ends it FAILED and moves no alias
    from imagen_ops.registry import register as register_module

    def broken(*args, **kwargs):
        raise RuntimeError("registry unreachable")

    before = aliases(client)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="unreachable"):
        mp.setattr(register_module, "register", broken)
        retrain(project=str(root))
    failed = client.search_runs([run.info.experiment_id], "attributes.status = 'FAILED'")
    assert [r.info.run_name for r in failed] == ["retrain"]
    assert aliases(client) == before and versions(client) == ["1", "2"]
    # the failed run added its 8 scenes and trained on them; the next run (a retry, or the
    # next week's) adds none until a run has finished with them, then 8 again
    pending, ingested = root / "artifacts/.retrain.pending", root / "reports/ingest.json"
    assert json.loads(ingested.read_text())["rows"] == 64 and pending.is_file()
    retried = retrain(project=str(root))
    assert retried["ingest"]["kept"] == 0 and retried["version"] == "3"
    assert not pending.exists()
    # a finished run's scenes trained, the next run adds 8 again (its registration fails:
    # the first of `later_runs` registers them)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="unreachable"):
        mp.setattr(register_module, "register", broken)
        retrain(project=str(root))
    assert json.loads(ingested.read_text())["rows"] == 72 and pending.is_file()
    later_runs(root, client)


def later_runs(root: Path, client) -> None:
    """After the flow test's runs: a registration cut short, a packaged setting changed by
    hand, and a lost golden set; each next run does what the state needs, not "no change"."""
    from flows.retrain import GoldenSetChangedError, retrain
    from imagen_ops.registry import register as register_module

    from .test_dvc import dvc

    # a run killed after its version exists but before the aliases moved (the last steps
    # of registration): that version is incomplete, and the next run, with nothing new,
    # registers the model again instead of ending "no change"
    def killed(*args, **kwargs):
        raise RuntimeError("killed while moving the aliases")

    quiet = (*FAST, "registry.track_training=true", "registry.golden_per_category=3")
    write_params(root / "params.yaml", *quiet)
    champion = aliases(client)["champion"]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="killed while"):
        mp.setattr(register_module, "carry_out", killed)
        retrain(project=str(root))
    assert versions(client) == ["1", "2", "3", "4"] and aliases(client)["champion"] == champion
    again = retrain(project=str(root))
    assert again["ingest"]["kept"] == 0 and again["version"] == "5"
    assert aliases(client)["challenger"] == "5"

    # a packaged setting changed and `dvc repro` run by hand: version 4's weights, other
    # metrics and sampling defaults, which the next run registers
    write_params(root / "params.yaml", *quiet, "sample.guidance=[3.0, 1.0]")
    dvc(root, "repro")
    assert retrain(project=str(root))["version"] == "6"
    assert retrain(project=str(root))["state"] == "no change"

    # golden/ lost, and not in the DVC cache (a fresh clone, a worker that pulled only the
    # data): made again, the same frozen set
    pointer = (root / "golden.dvc").read_bytes()
    shutil.rmtree(root / "golden")
    cache = root / ".dvc" / "cache" / "files" / "md5"
    listing = yaml.safe_load(pointer)["outs"][0]["md5"]
    for entry in [*json.loads((cache / listing[:2] / listing[2:]).read_text()), {"md5": listing}]:
        (cache / entry["md5"][:2] / entry["md5"][2:]).unlink()
    assert retrain(project=str(root))["state"] == "no change"
    assert (root / "golden.dvc").read_bytes() == pointer
    # ... unless the params now make another set: the run stops, golden.dvc as it was
    shutil.rmtree(root / "golden")
    write_params(root / "params.yaml", *quiet, "registry.golden_per_category=4")
    with pytest.raises(GoldenSetChangedError, match=r"dvc checkout golden\.dvc"):
        retrain(project=str(root))
    assert (root / "golden.dvc").read_bytes() == pointer and not (root / "golden").exists()
    # an edited golden set (or a pulled golden.dvc never checked out): stopped, kept as it is
    write_params(root / "params.yaml", *quiet)
    dvc(root, "checkout", "golden.dvc")
    prompts = root / "golden" / "prompts.jsonl"
    prompts.chmod(0o644)  # DVC checks files out read-only
    edited = "".join(prompts.read_text().splitlines(keepends=True)[:-1])  # one prompt less
    prompts.write_text(edited)
    with pytest.raises(GoldenSetChangedError, match=r"not the set golden\.dvc records"):
        retrain(project=str(root))
    assert (root / "golden.dvc").read_bytes() == pointer and prompts.read_text() == edited
    assert versions(client) == [str(v) for v in range(1, 7)]


def versions(client) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions("name='imagen-ops'"))


@pytest.mark.integration
def test_deploy_uses_the_schedule_section(tmp_path, prefect_harness) -> None:
    """`python -m flows.serve --deploy`: cron, time zone, name and pool from params.yaml."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.serve import deploy

    project = tmp_path / "project"
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    raw = {
        **tiny_raw(),
        "schedule": {
            "deployment": "nightly",
            "cron": "30 2 * * *",
            "timezone": "Europe/Paris",
            "work_pool": "gpu-pool",
        },
    }
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu-pool", type="process"))
        deployment = client.read_deployment(deploy(project))
    assert deployment.name == "nightly" and deployment.work_pool_name == "gpu-pool"
    assert deployment.global_concurrency_limit.limit == 1  # one run at a time, any machine
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "30 2 * * *"
    assert schedule.schedule.timezone == "Europe/Paris"
    assert deployment.parameters == {"project": str(project.resolve())}


@pytest.mark.integration
def test_killed_flow_run_resumes_its_training_on_the_next_run(tmp_path) -> None:
    """SIGKILL the whole flow process group during training; the next flow run marks the
    dead MLflow run KILLED and the trainer resumes from the killed run's own checkpoint."""
    from mlflow import MlflowClient

    settings = (
        *FAST,
        "registry.track_training=true",
        "registry.golden_per_category=1",
        "stages.base.train.steps=400",
        "stages.base.train.checkpoint_every=20",
    )
    root = make_project(tmp_path / "project", *settings)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "flows.retrain", "--project", str(root)]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    checkpoints = root / "artifacts/checkpoints/base"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*/step_00000040")):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "artifacts/models/base").exists()

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    resumed = re.search(r"resumed stage base from \S+step_(\d+) \(step (\d+)\)", output)
    assert resumed and int(resumed.group(2)) >= 40, output[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db")
    statuses = sorted(
        r.info.status
        for r in client.search_runs(
            [client.get_experiment_by_name("imagen-ops").experiment_id],
            "tags.`imagen_ops.kind` = 'retrain'",
        )
    )
    assert statuses == ["FINISHED", "KILLED"]
