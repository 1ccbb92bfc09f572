"""DVC: the repo's dvc.yaml on the tiny config runs every stage, skips what did not change,
and reruns only the stages downstream of a change."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imagen_ops.config import load_params

from .conftest import tiny_params, write_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["prepare", "encode_text", "train@base", "train@sr32", "evaluate"]
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


def tiny_dvc_yaml() -> str:
    """The repo's dvc.yaml with its stage names mapped onto the tiny config's."""
    text = (REPO / "dvc.yaml").read_text()
    real, tiny = load_params(REPO / "params.yaml").stage_names(), tiny_params().stage_names()
    assert len(real) == len(tiny), "the tiny config mirrors the real cascade's depth"
    for a, b in zip(real, tiny, strict=True):
        text = re.sub(rf"\b{a}\b", b, text)
    for name in tiny:
        assert f"artifacts/models/{name}" in text, f"evaluate must depend on stage {name}"
    return text


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def dvc(root: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], root)


def make_project(root: Path, *overrides: str) -> Path:
    """A git + DVC project: tiny params.yaml, the adapted dvc.yaml, the code its stages
    depend on (src/imagen_ops), committed."""
    root.mkdir(parents=True)
    write_params(root / "params.yaml", *overrides)
    (root / "dvc.yaml").write_text(tiny_dvc_yaml())
    shutil.copytree(
        REPO / "src" / "imagen_ops",
        root / "src" / "imagen_ops",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    run(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["git", "add", "-A"], root)
    run([*git, "commit", "-q", "-m", "tiny project"], root)
    return root


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_tiny_dvc_yaml_names_the_tiny_stages() -> None:
    text = tiny_dvc_yaml()
    stages = yaml.safe_load(text)["stages"]
    assert "sr64" not in text
    assert "artifacts/models/sr32" in stages["evaluate"]["deps"]
    assert "stages.sr32.resolution" in stages["prepare"]["params"]


@pytest.mark.integration
def test_repro_runs_skips_and_reruns_only_what_changed(tmp_path) -> None:
    root = make_project(tmp_path / "project", *FAST)
    run(["imagen-ops", "data", "synth", "-q"], root)
    dvc(root, "add", "data")

    first = dvc(root, "repro")
    assert ran_stages(first) == set(STAGES)
    assert (root / "artifacts/models/sr32/config.json").is_file()
    assert (root / "reports/metrics.json").is_file()
    assert (root / "artifacts/eval/grid.png").is_file()
    plots = json.loads(dvc(root, "plots", "show", "--json"))["data"]
    (sweep,) = (v for k, v in plots.items() if k.endswith("reports/guidance_sweep.csv"))
    assert {row["field"] for row in sweep[0]["content"]["data"]["values"]} == {
        "alignment",
        "kid_mean",
    }
    lock = (root / "dvc.lock").read_text()
    base_weights = root / "artifacts/models/base/ema.safetensors"
    base_stamp = base_weights.stat().st_mtime_ns

    # nothing changed: every stage is skipped and dvc.lock stays as it is
    second = dvc(root, "repro")
    assert ran_stages(second) == set()
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second
    assert "Data and pipelines are up to date." in second
    assert (root / "dvc.lock").read_text() == lock

    # a training param of one stage: that stage and evaluate, nothing upstream or beside
    write_params(root / "params.yaml", *FAST, "stages.sr32.train.steps=7")
    third = dvc(root, "repro")
    assert ran_stages(third) == {"train@sr32", "evaluate"}
    assert base_weights.stat().st_mtime_ns == base_stamp
    before, after = (
        yaml.safe_load(lock)["stages"],
        yaml.safe_load((root / "dvc.lock").read_text())["stages"],
    )
    assert after["train@base"] == before["train@base"]
    assert after["prepare"] == before["prepare"]
    assert after["train@sr32"] != before["train@sr32"]

    # a code dependency of evaluate only: evaluate alone
    report = root / "src/imagen_ops/eval/report.py"
    report.write_text(report.read_text() + "\n# touched\n")
    fourth = dvc(root, "repro")
    assert ran_stages(fourth) == {"evaluate"}
    assert "Data and pipelines are up to date." in dvc(root, "status")
