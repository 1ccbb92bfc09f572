"""The benchmark scripts' own guards (their figures live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, monkeypatch: pytest.MonkeyPatch):
    """benchmarks/<name>.py, importing its neighbours as when run as a script."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_a_work_folder_an_earlier_run_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run in the same folder would resume the dry runs' checkpoints and train
    nothing (it crashed on an empty list of rates): it must stop first, naming the folder."""
    gpu_check = load_script("gpu_check", monkeypatch)
    work = tmp_path / "work"
    (work / "dry" / "checkpoints").mkdir(parents=True)
    args = argparse.Namespace(
        params=str(ROOT / "params.yaml"),
        recipe=str(ROOT / "configs" / "gpu.yaml"),
        set=[],
        encoder=str(tmp_path / "encoder"),
        minutes=1.0,
        device="cpu",
        work=str(work),
        out=str(tmp_path / "out"),
    )
    with pytest.raises(SystemExit, match=f"--work {work} holds an earlier run"):
        gpu_check.run(args)
    assert not (tmp_path / "out").exists()


def test_benchmark_paths_default_to_params_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark's --prepared/--cache/... come from params.yaml's paths section (and its
    -S overrides) unless given: PathsConfig is their one owner, as for the commands."""
    common = load_script("common", monkeypatch)
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("-S", "--set", action="append", default=[])
    common.path_options(parser, "prepared", "cache", "models")
    monkeypatch.setattr("sys.argv", ["bench", "-S", "paths.text_cache=elsewhere/cache"])
    args = common.parse_args(parser)
    assert args.prepared == Path("artifacts/prepared") and args.cache == Path("elsewhere/cache")
    assert args.models == Path("artifacts/models") and not hasattr(args, "scorer")
    monkeypatch.setattr("sys.argv", ["bench", "--models", "mine", "-S", "paths.models=theirs"])
    assert common.parse_args(parser).models == Path("mine")
