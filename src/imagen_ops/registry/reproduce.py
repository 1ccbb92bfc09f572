"""Rebuild a registered model version from what it stored, and check it bit for bit.

A version's run holds the git commit (tag) and, under `lineage/`, the dvc.lock, data.dvc,
golden.dvc, params.yaml and dvc.yaml it was made from. `reproduce`:

1. checks the commit out in a temporary git work tree and puts the stored files over it
   (they may carry edits that were not committed when the version was registered);
2. points that tree's DVC cache at this project's cache and checks out the data only;
3. runs `dvc repro --force` on every training stage with that tree's own code first on
   the import path (PYTHONPATH), so the old code trains, not the installed one;
4. compares the rebuilt cascade's digest with the version's `imagen_ops.model_sha256` and
   with the digest of the cascade the version serves (its logged model).

On the CPU, same data, params, code and seed give the same weights, so they should match.
A version trained from uncommitted code (tag `imagen_ops.git_dirty`) or warm-started from
another model (`train.init_from`) depends on something its lineage does not hold: it is
refused, saying so, instead of reported as a mismatch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imagen_ops.cascade import cascade_digest
from imagen_ops.config import RegistryConfig, load_params
from imagen_ops.pipeline import train_stage_name
from imagen_ops.registry.loading import download_cascade
from imagen_ops.registry.register import DIRTY_TAG, LINEAGE, MODEL_DIGEST_TAG
from imagen_ops.registry.tracking import open_store

__all__ = ["Reproduction", "reproduce"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reproduction:
    uri: str
    commit: str
    expected_sha256: str  # the version's tag, recorded at registration
    packaged_sha256: str  # the weights the version serves (its logged model)
    rebuilt_sha256: str

    @property
    def identical(self) -> bool:
        return self.expected_sha256 == self.packaged_sha256 == self.rebuilt_sha256


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return proc.stdout


def _version(uri: str, cfg: RegistryConfig):
    from mlflow import MlflowClient

    parts = uri.removeprefix("models:/").split("/")
    if not uri.startswith("models:/") or len(parts) != 2:
        raise ValueError(f"{uri}: expected models:/NAME/VERSION (or models:/NAME@ALIAS)")
    open_store(cfg)
    client = MlflowClient()
    name, version = parts
    return client, client.get_model_version(name, version)


def _resolve(uri: str) -> str:
    if "@" in uri:  # models:/NAME@ALIAS -> models:/NAME/VERSION
        from mlflow import MlflowClient

        name, alias = uri.removeprefix("models:/").split("@", 1)
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return uri


def reproduce(uri: str, project: Path, cfg: RegistryConfig, keep: bool = False) -> Reproduction:
    """Rebuild the version `uri` in a temporary work tree of `project`; compare digests."""
    import mlflow

    open_store(cfg)
    uri = _resolve(uri)
    client, mv = _version(uri, cfg)
    run = client.get_run(mv.run_id)
    commit = run.data.tags.get("imagen_ops.git_commit")
    expected = mv.tags.get(MODEL_DIGEST_TAG)
    if not commit or not expected:
        raise ValueError(f"{uri} stores no git commit or model digest: it cannot be rebuilt")
    if run.data.tags.get(DIRTY_TAG) == "True":
        raise ValueError(
            f"{uri} was trained from code with uncommitted changes under src/ ({DIRTY_TAG}): "
            f"commit {commit[:12]} is not the code that made it, so it cannot be rebuilt"
        )
    project = project.resolve()
    tree = Path(tempfile.mkdtemp(prefix="imagen-ops-reproduce-"))
    added = False
    try:
        try:
            _run(["git", "worktree", "add", "--detach", "--force", str(tree), commit], project)
        except RuntimeError as err:
            raise RuntimeError(
                f"{uri}: its commit {commit} cannot be checked out in {project} (a shallow "
                f"clone, or a commit never pushed): `git fetch origin {commit}` (or `git fetch "
                f"--unshallow`) and reproduce again. {err}"
            ) from None
        added = True
        lineage = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=LINEAGE))
        for stored in lineage.iterdir():
            shutil.copy2(stored, tree / stored.name)
        params = load_params(tree / "params.yaml")
        warm = {n: s.train.init_from for n, s in params.stages.items() if s.train.init_from}
        if warm:
            named = ", ".join(f"stages.{n}.train.init_from: {v}" for n, v in warm.items())
            raise ValueError(
                f"{uri} was warm-started ({named}): its weights depend on a model its "
                "lineage does not hold, so it cannot be rebuilt"
            )
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tree}/.reproduce-mlflow.db",  # not the real store
        }
        dvc = [sys.executable, "-m", "dvc"]
        _run([*dvc, "cache", "dir", "--local", str(project / ".dvc" / "cache")], tree, env)
        _run([*dvc, "checkout", f"{params.paths.data}.dvc"], tree, env)
        stages = [train_stage_name(n) for n in params.stage_names()]
        log.info("reproducing %s (commit %s) in %s: %s", uri, commit[:12], tree, stages)
        _run([*dvc, "repro", "--force", *stages], tree, env)
        rebuilt = cascade_digest(tree / params.paths.models, params.stage_names())
        packaged = cascade_digest(download_cascade(uri, cfg), params.stage_names())
    finally:
        if not keep:
            if added:
                _run(["git", "worktree", "remove", "--force", str(tree)], project)
            shutil.rmtree(tree, ignore_errors=True)
    return Reproduction(uri, commit, expected, packaged, rebuilt)
