"""The `imagen-ops` command line: actionable errors, model summary, sampling, data synth."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imagen_ops.cli import main
from imagen_ops.data.ingest import read_table
from imagen_ops.images import make_grid

from .conftest import tiny_params, write_params

BIN = Path(sys.executable).parent


@pytest.fixture
def params_file(tmp_path) -> Path:
    return write_params(tmp_path / "params.yaml")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["imagen-ops", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_unknown_config_key_exits_2_naming_key_and_file(tmp_path) -> None:
    """The installed console script: exit status 2, a one-line reason, no traceback."""
    path = write_params(tmp_path / "params.yaml", "stages.base.train.stpes=5")
    proc = run_cli("prepare", "--params", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: stages.base.train.stpes: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists(), "nothing ran"


def test_missing_params_file(tmp_path, caplog) -> None:
    assert main(["model", "summary", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "no such params file" in caplog.text and "--params" in caplog.text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.base.train.steps", "expected KEY=VALUE"),
        ("stages.base.resolution.x=1", "'resolution' is not a section"),
        ("stages.sr32.train.lr=-1", "stages.sr32.train.lr"),
        ("sample.sampler=euler", "sample.sampler"),
    ],
)
def test_bad_override_exits_2(params_file, caplog, override, message) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["model", "summary", "--params", str(params_file), "-S", override]) == 2
    assert message in caplog.text


def test_verbose_raises_for_the_traceback(params_file) -> None:
    from imagen_ops.config import ConfigError

    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        main(["model", "summary", "--params", str(params_file), "-S", "oops", "-v"])


def test_model_summary_lists_every_stage(params_file, capsys) -> None:
    assert main(["model", "summary", "--params", str(params_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["stage", "size", "params", "(M)", "GFLOP/fwd", "GFLOP/step"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == ["base", "sr32"]
    for name, (size, params, fwd, step) in rows.items():
        assert int(size) == tiny_params().stages[name].resolution
        assert float(params) > 0 and float(fwd) > 0
        assert float(step) > 2 * float(fwd), "a train step is forward + backward"


def test_sample_writes_png_grid_and_numbered_files(tiny_models, params_file, tmp_path) -> None:
    common = ["--model", str(tiny_models), "--params", str(params_file), "--steps", "2", "-q"]
    out = tmp_path / "samples" / "one.png"
    assert main(["sample", "a red circle", "--out", str(out), *common]) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"

    grid = tmp_path / "grid.png"
    prompts = ["a red circle", "two blue squares"]
    argv = ["sample", *prompts, "--num-images", "2", "--grid", "--out", str(grid), *common]
    assert main(argv) == 0
    expected = make_grid(np.zeros((4, 32, 32, 3), np.uint8), ["x"] * 4).size
    assert Image.open(grid).size == expected

    many = tmp_path / "many" / "s.png"
    argv = ["sample", *prompts, "--seed", "3", "--out", str(many), *common]
    assert main(argv) == 0
    files = sorted(p.name for p in many.parent.iterdir())
    assert files == ["s_000.png", "s_001.png"]
    # image k uses seed 3 + k whatever else is sampled with it
    alone = tmp_path / "alone.png"
    argv = ["sample", "two blue squares", "--seed", "4", "--out", str(alone), *common]
    assert main(argv) == 0
    assert np.array_equal(
        np.asarray(Image.open(alone)), np.asarray(Image.open(many.parent / "s_001.png"))
    )


def test_sample_checks_its_output_first_and_replaces_atomically(
    tiny_models, params_file, tmp_path, caplog, capsys
) -> None:
    """An --out PIL cannot write, or --num-images 0, fails before the model is even loaded
    (the model named here does not exist); a rerun replaces its file whole and says so."""
    missing = ["--model", str(tmp_path / "none"), "--params", str(params_file)]
    with caplog.at_level(logging.ERROR):
        assert main(["sample", "a red circle", "--out", str(tmp_path / "x.txt"), *missing]) == 2
        assert "x.txt: give a file name with an image extension" in caplog.text
        assert main(["sample", "a red circle", "--num-images", "0", *missing]) == 2
        assert "--num-images 0: give 1 or more" in caplog.text
    assert not list(tmp_path.glob("*.txt"))

    common = ["--model", str(tiny_models), "--params", str(params_file), "--steps", "2", "-q"]
    out = tmp_path / "samples" / "one.jpg"
    for _ in range(2):
        assert main(["sample", "a red circle", "--out", str(out), *common]) == 0
    assert Image.open(out).format == "JPEG" and "(1 replaced)" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["one.jpg"], "no temporary file left"


def test_sample_missing_model_exits_2(params_file, tmp_path, caplog) -> None:
    argv = [
        "sample",
        "a red circle",
        "--model",
        str(tmp_path / "none"),
        "--params",
        str(params_file),
    ]
    assert main(argv) == 2
    assert "FileNotFoundError" in caplog.text and str(tmp_path / "none") in caplog.text


def test_sample_from_an_empty_registry_is_one_line_and_creates_nothing(tmp_path) -> None:
    """Outside a project, with no store: exit 2, one line saying what to do, no
    traceback, and no mlflow.db or folder left behind."""
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        proc = run_cli("sample", "a star", "--model", "models:/imagen-ops@champion", cwd=tmp_path)
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no MLflow store at sqlite:///mlflow/mlflow.db" in errors[0]
    assert "make demo" in errors[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_promote_and_reproduce_without_a_store_create_nothing(tmp_path, monkeypatch) -> None:
    write_params(tmp_path / "params.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    for argv in (["promote"], ["reproduce", "models:/imagen-ops/1"]):
        assert main(argv) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_version_and_every_help_shows_an_example(capsys) -> None:
    import argparse

    import imagen_ops
    from imagen_ops.cli import EXAMPLES, build_parser

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"imagen-ops {imagen_ops.__version__}"
    assert imagen_ops.__version__ == "0.1.0"

    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from leaves(sub, (*path, name))

    commands = list(leaves(build_parser()))
    assert len(commands) == len(EXAMPLES) == 16
    for path, parser in commands:
        text = parser.format_help()
        assert "examples:\n  " in text and f"imagen-ops {path[0]}" in text, path


def test_data_synth_writes_data_and_report(params_file, tmp_path, capsys, caplog) -> None:
    data, report = tmp_path / "data", tmp_path / "reports" / "ingest.json"
    argv = [
        "data",
        "synth",
        "--params",
        str(params_file),
        "--n",
        "6",
        "--out",
        str(data),
        "--report",
        str(report),
        "--workers",
        "1",
        "-q",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(report.read_text())
    assert (printed["seen"], printed["kept"], printed["rejected_total"], printed["rows"]) == (
        6,
        6,
        0,
        6,
    )
    table = read_table(data)
    assert len(table) == 6 and table["source"].eq("synth").all()
    assert all((data / p).is_file() for p in table["path"])

    # a second run renders nothing new: the table and the tracked report stay as they were
    report_bytes, table_bytes = report.read_bytes(), (data / "captions.parquet").read_bytes()
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["seen"], again["kept"], again["rows"]) == (0, 0, 6)
    assert report.read_bytes() == report_bytes
    assert (data / "captions.parquet").read_bytes() == table_bytes

    # a growing source: each run adds data.synth.new_per_run scenes after the ones it has
    assert main([*argv, "-S", "data.synth.new_per_run=2"]) == 0
    grown = json.loads(capsys.readouterr().out)
    assert (grown["seen"], grown["kept"], grown["rows"]) == (2, 2, 8)
    assert json.loads(report.read_text()) == grown
    ids = read_table(data)["id"].tolist()
    assert len(set(ids)) == 8 and ids[:6] == table["id"].tolist()

    # other settings would only append: the run refuses, naming them, and changes nothing
    table_bytes = (data / "captions.parquet").read_bytes()
    assert main([*argv, "-S", "data.synth.caption_variety=1.0"]) == 2
    assert "other data.synth settings" in caplog.text and "scene 0" in caplog.text
    assert (data / "captions.parquet").read_bytes() == table_bytes
    # so would another image size (the scenes' captions and specs are the same)
    caplog.clear()
    assert main([*argv, "-S", "data.synth.resolution=48"]) == 2
    assert "scenes of [32] px, data.synth.resolution is 48" in caplog.text
    assert (data / "captions.parquet").read_bytes() == table_bytes


def test_params_apply_merges_a_recipe_and_validates(tmp_path, monkeypatch) -> None:
    params = write_params(tmp_path / "params.yaml")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  base:\n    train:\n      steps: 77\n")
    monkeypatch.chdir(tmp_path)  # as the README says it: the project's params.yaml
    assert main(["params", "apply", str(recipe)]) == 0
    merged = tiny_params("stages.base.train.steps=77")
    from imagen_ops.config import load_params

    assert load_params(params) == merged, "only the recipe's key changed"
    commented = params.read_text().replace("steps: 77", "steps: 77  # keep me", 1)
    params.write_text("# header comment\n" + commented)
    recipe.write_text("stages:\n  base:\n    train:\n      steps: 78\n")
    assert main(["params", "apply", str(recipe), "--params", str(params)]) == 0
    text = params.read_text()
    assert text.startswith("# header comment\n") and "steps: 78  # keep me" in text
    assert load_params(params) == tiny_params("stages.base.train.steps=78")
    # -S overrides are written over the recipe, into the file (they were ignored before)
    argv = ["params", "apply", str(recipe), "--params", str(params)]
    assert main([*argv, "-S", "stages.base.train.steps=79", "-S", "sample.seed=5"]) == 0
    text = params.read_text()
    assert "steps: 79  # keep me" in text
    assert load_params(params) == tiny_params("stages.base.train.steps=79", "sample.seed=5")
    before = params.read_text()
    assert main([*argv, "-S", "stages.base.train.stepz=1"]) == 2, "a bad override is refused"
    recipe.write_text("stages:\n  base:\n    train:\n      stepz: 1\n")
    assert main(argv) == 2
    assert params.read_text() == before, "an invalid recipe leaves params.yaml untouched"


def test_params_show_prints_every_resolved_parameter(capsys, caplog) -> None:
    from imagen_ops.config import flatten, load_params

    root = Path(__file__).resolve().parents[1]
    argv = ["params", "show", "--params", str(root / "params.yaml")]
    assert main(argv) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_params(root / "params.yaml").model_dump(mode="json")
    written = flatten(yaml.safe_load((root / "params.yaml").read_text()))
    defaults = set(flatten(shown)) - set(written)
    assert "stages.base.train.grad_clip" in defaults, "keys the file leaves out are shown too"
    # a section, one value, and -S overrides over both
    assert main([*argv, "stages.base.train", "-S", "stages.base.train.steps=100"]) == 0
    section = yaml.safe_load(capsys.readouterr().out)
    assert (
        section["steps"] == 100
        and section["grad_clip"] == shown["stages"]["base"]["train"]["grad_clip"]
    )
    assert main([*argv, "sample.guidance"]) == 0
    assert json.loads(capsys.readouterr().out) == shown["sample"]["guidance"]
    assert main([*argv, "paths.golden"]) == 0
    assert capsys.readouterr().out == f"{shown['paths']['golden']}\n"
    assert main([*argv, "sample.guidanse"]) == 2
    assert "no parameter 'sample.guidanse'" in caplog.text


def test_repo_recipes_apply_to_the_repo_params(tmp_path) -> None:
    root = Path(__file__).resolve().parents[1]
    for recipe in sorted((root / "configs").glob("*.yaml")):
        out = tmp_path / f"{recipe.stem}.yaml"
        assert (
            main(
                [
                    "params",
                    "apply",
                    str(recipe),
                    "--params",
                    str(root / "params.yaml"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        from imagen_ops.config import flatten, load_params

        assert load_params(out).recipe == recipe.stem  # registered versions are tagged so
        # only the recipe's leaves change: every other line, null values included, is kept
        source = root / "params.yaml"
        old, new = (flatten(yaml.safe_load(p.read_text())) for p in (source, out))
        lost = Counter(source.read_text().splitlines()) - Counter(out.read_text().splitlines())
        changed = [k for k in old if old[k] != new[k]]
        # one line per changed leaf, except a flow mapping's leaves (`layout: {steps: ...}`),
        # which share their line
        flow = set(re.findall(r"^\s*(\w+): \{", source.read_text(), re.MULTILINE))
        parents = [k.rpartition(".")[0] for k in changed]
        shared = Counter(p for p in parents if p.rpartition(".")[2] in flow)
        assert sum(lost.values()) == len(changed) - sum(n - 1 for n in shared.values()), lost
        # a second apply of the same recipe changes nothing
        again = tmp_path / f"{recipe.stem}.again.yaml"
        argv = ["params", "apply", str(recipe), "--params", str(out), "--out", str(again)]
        assert main(argv) == 0 and again.read_text() == out.read_text()


def test_sample_from_a_folder_imports_no_mlflow(tiny_models, params_file, tmp_path) -> None:
    """Cascade loading lives outside the MLflow layer: a folder needs no MLflow."""
    argv = [
        *("sample", "a red circle", "--model", str(tiny_models), "--params", str(params_file)),
        *("--steps", "1", "-q", "--out", str(tmp_path / "x.png")),
    ]
    script = (
        "import sys\nfrom imagen_ops.cli import main\n"
        f"assert main({argv!r}) == 0\nprint('mlflow' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert Image.open(tmp_path / "x.png").size == (32, 32)


def test_model_summary_of_the_projects_params_yaml(capsys) -> None:
    """The shipped recipe (a layout head in its base stage) summarises without error, and
    the head's parameters count."""
    project = str(Path(__file__).resolve().parents[1] / "params.yaml")
    assert main(["model", "summary", "--params", project]) == 0
    base = capsys.readouterr().out.strip().splitlines()[1].split()
    plain_args = ["--params", project, "-S", "stages.base.unet.layout_grid=0"]
    plain_args += ["-S", "stages.base.unet.layout_modes=1"]
    plain_args += ["-S", "stages.base.unet.layout_condition=posterior"]
    plain_args += ["-S", "stages.base.train.layout.steps=0"]
    assert main(["model", "summary", *plain_args]) == 0
    plain = capsys.readouterr().out.strip().splitlines()[1].split()
    assert base[0] == plain[0] == "base" and float(base[2]) > float(plain[2])
