"""The trainer: learning, exact resume after SIGKILL, DDP equivalence, the non-finite guard."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imagen_ops import pipeline
from imagen_ops.cascade import load_stage
from imagen_ops.data.dataset import StageData, prefetch, step_generator
from imagen_ops.data.prepare import PreparedData
from imagen_ops.models.unet import mode_errors
from imagen_ops.pipeline import train_settings
from imagen_ops.text.cache import EmbeddingCache
from imagen_ops.train import trainer as trainer_module
from imagen_ops.train.loss import diffusion_loss
from imagen_ops.train.trainer import Trainer, TrainingDivergedError, TrainPaths, lr_at

from .conftest import tiny_params, write_params


def paths_for(tiny_data, out: Path, stage: str = "base") -> TrainPaths:
    return TrainPaths(
        tiny_data["prepared"],
        tiny_data["cache"],
        out / "model" / stage,
        out / "checkpoints" / stage,
        out / f"train_{stage}.csv",
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {
        **{f"model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()},
        **{f"ema.{k}": v for k, v in load_file(str(path / "ema.safetensors")).items()},
    }


def train_base(tiny_data, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """Train the tiny base stage with `overrides` into `out`; its exported weights."""
    Trainer(
        train_settings(tiny_params(*overrides), "base"), paths_for(tiny_data, out), progress=False
    ).fit()
    return weights(out / "model" / "base")


def logged_losses(csv: Path) -> list[float]:
    return [float(row.split(",")[1]) for row in csv.read_text().splitlines()[1:]]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_lr_schedule_warms_up_and_decays():
    cfg = (
        tiny_params("stages.base.train.steps=100", "stages.base.train.warmup_steps=10")
        .stages["base"]
        .train
    )
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(cfg.lr / 10) and lrs[9] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])), "cosine decay is monotone"
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.01)


def test_loss_falls_when_overfitting(tiny_data, tmp_path):
    params = tiny_params(
        "stages.base.train.steps=80",
        "stages.base.train.lr=0.003",
        "stages.base.train.log_every=10",
        "stages.base.train.checkpoint_every=1000",
    )
    Trainer(train_settings(params, "base"), paths_for(tiny_data, tmp_path), progress=False).fit()
    losses = logged_losses(tmp_path / "train_base.csv")
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses}"


def test_sr_stage_trains_on_crops_and_rebuilds_from_config(tiny_data, tmp_path):
    params = tiny_params("stages.sr32.train.crop=16")
    result = Trainer(
        train_settings(params, "sr32"), paths_for(tiny_data, tmp_path, "sr32"), progress=False
    ).fit()
    assert result.steps == 6 and result.skipped_steps == 0
    stage = load_stage(tmp_path / "model" / "sr32", weights="model")
    assert stage.lowres == 16 and stage.net.super_resolution
    # the rebuilt network computes exactly what the saved weights define
    state = load_file(str(tmp_path / "model" / "sr32" / "model.safetensors"))
    assert all(torch.equal(v, state[k]) for k, v in stage.net.state_dict().items())


def _cli_train(params_file: Path, tiny_data, out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "imagen_ops.cli",
        "train",
        "--stage",
        "base",
        "--no-track",
        "-q",
        "--params",
        str(params_file),
        "--prepared",
        str(tiny_data["prepared"]),
        "--cache",
        str(tiny_data["cache"]),
        "--out",
        str(out / "model" / "base"),
        "--checkpoints",
        str(out / "checkpoints" / "base"),
        "--metrics",
        str(out / "m.csv"),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.integration
@pytest.mark.parametrize("channels_last", [False, True])
def test_sigkill_and_resume_equals_uninterrupted(tiny_data, tmp_path, channels_last):
    overrides = (
        "stages.base.train.steps=12",
        "stages.base.train.checkpoint_every=4",
        f"stages.base.train.channels_last={str(channels_last).lower()}",
    )
    params_file = write_params(tmp_path / "params.yaml", *overrides)
    train_base(tiny_data, tmp_path / "ref", *overrides)

    run = tmp_path / "killed"
    proc = _cli_train(params_file, tiny_data, run)
    deadline = time.time() + 120
    while not list((run / "checkpoints" / "base").glob("*/step_00000004")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run: after a checkpoint, before the end
    proc.wait()
    assert not (run / "model" / "base").exists(), "killed before the end: no exported model"

    resumed = _cli_train(params_file, tiny_data, run)
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert_same_weights(tmp_path / "ref" / "model" / "base", run / "model" / "base")


def test_checkpoint_of_other_settings_is_not_resumed(tiny_data, tmp_path, caplog):
    Trainer(
        train_settings(tiny_params(), "base"), paths_for(tiny_data, tmp_path), progress=False
    ).fit()
    other = tiny_params("stages.base.train.lr=0.0005")
    trainer = Trainer(train_settings(other, "base"), paths_for(tiny_data, tmp_path), progress=False)
    assert trainer._resume() == 0
    assert "afresh" in caplog.text


def test_resume_with_another_thread_count_says_the_weights_will_differ(tiny_data, tmp_path, caplog):
    """CPU kernels split their sums by thread: a checkpoint continued with another thread
    count trains other weights than the uninterrupted run. It still resumes (the run's
    position is right), and says so in one line naming the count that continues it exactly."""
    paths = paths_for(tiny_data, tmp_path)
    params = tiny_params("stages.base.train.steps=4", "stages.base.train.checkpoint_every=4")
    Trainer(train_settings(params, "base"), paths, progress=False).fit()
    threads = torch.get_num_threads()
    caplog.clear()
    assert Trainer(train_settings(params, "base"), paths, progress=False)._resume() == 4
    assert "threads" not in caplog.text  # the same count: an exact resume, nothing to say
    torch.set_num_threads(threads + 1)
    try:
        assert Trainer(train_settings(params, "base"), paths, progress=False)._resume() == 4
    finally:
        torch.set_num_threads(threads)
    (line,) = [r.getMessage() for r in caplog.records if "threads" in r.getMessage()]
    assert f"written with {threads} threads, this process runs {threads + 1}" in line
    assert f"OMP_NUM_THREADS={threads}" in line


def test_resume_on_another_device_says_the_weights_will_differ(tiny_data, tmp_path, caplog):
    """A checkpoint written on a GPU continues on the CPU (its position is right), but not
    to the uninterrupted run's weights: the resume says so, naming the device that would."""
    from imagen_ops.train.checkpoint import latest_valid, save_checkpoint

    paths = paths_for(tiny_data, tmp_path)
    params = tiny_params("stages.base.train.steps=4", "stages.base.train.checkpoint_every=4")
    trainer = Trainer(train_settings(params, "base"), paths, progress=False)
    trainer.fit()
    ckpt = latest_valid(trainer.run_dir)
    assert ckpt.state["device"] == "cpu"
    caplog.clear()
    assert Trainer(train_settings(params, "base"), paths, progress=False)._resume() == 4
    assert "written on" not in caplog.text  # the same device: nothing to say
    state = {**ckpt.state, "device": "cuda", "threads": torch.get_num_threads() + 3}
    save_checkpoint(trainer.run_dir, 5, trainer.stage, ckpt.weights, state, 2)
    assert Trainer(train_settings(params, "base"), paths, progress=False)._resume() == 4
    (line,) = [r.getMessage() for r in caplog.records if "written on" in r.getMessage()]
    assert "written on cuda, this process trains on cpu" in line and "resume it on cuda" in line
    assert "threads" not in caplog.text  # a GPU run's CPU thread count says nothing


def test_checkpoint_of_other_prepared_data_is_not_resumed(tiny_data, tmp_path, caplog):
    """Another split of the same source table (data.prepare.val_fraction) trains on other
    images: DVC reruns the stage, and its old final checkpoint must not be exported."""
    from imagen_ops.data.prepare import prepare

    paths = paths_for(tiny_data, tmp_path)
    Trainer(train_settings(tiny_params(), "base"), paths, progress=False).fit()
    assert Trainer(train_settings(tiny_params(), "base"), paths, progress=False)._resume() == 6

    resplit = tiny_params("data.prepare.val_fraction=0.5")
    prepare(tiny_data["data"], tmp_path / "prepared", [16, 32], resplit.data.prepare, False)
    other = dataclasses.replace(paths, prepared=tmp_path / "prepared")
    trainer = Trainer(train_settings(resplit, "base"), other, progress=False)
    assert trainer._resume() == 0
    assert "afresh" in caplog.text


def test_checkpoint_of_other_training_code_is_not_resumed(tiny_data, tmp_path, monkeypatch):
    """A checkpoint names the training code (dvc.yaml's code deps of train_<stage>): after
    an edit there, the rerun DVC starts trains afresh; an edit elsewhere keeps resuming.
    The exported stage does not name it: an edit that trains the same weights (a comment)
    exports the same files, so the registry sees the same model, not a new version."""
    paths = paths_for(tiny_data, tmp_path)
    settings = train_settings(tiny_params(), "base")
    Trainer(settings, paths, progress=False).fit()

    package = tmp_path / "package"
    shutil.copytree(pipeline.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "PACKAGE", package)
    (package / "eval" / "__init__.py").write_text("# an edit outside training\n", "utf-8")
    (package / "diffusion" / "__pycache__").mkdir()
    (package / "diffusion" / "__pycache__" / "x.pyc").write_bytes(b"bytecode")
    assert Trainer(settings, paths, progress=False)._resume() == 6

    with (package / "diffusion" / "schedules.py").open("a", encoding="utf-8") as f:
        f.write("# an edit to the noise schedule's module\n")
    afresh = Trainer(settings, dataclasses.replace(paths, out=tmp_path / "again"), progress=False)
    assert afresh._resume() == 0
    afresh.fit()
    for name in ("config.json", "model.safetensors", "ema.safetensors"):
        assert (paths.out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_code_digest_names_each_missing_path(tmp_path):
    first = re.escape(pipeline.TRAIN_CODE[0])  # src/imagen_ops/config.py
    with pytest.raises(FileNotFoundError, match=rf"{first} is missing"):
        pipeline.code_digest(pipeline.TRAIN_CODE, package=tmp_path)
    (tmp_path / "config.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"src/imagen_ops/choices\.py is missing"):
        pipeline.code_digest(pipeline.TRAIN_CODE, package=tmp_path)
    with pytest.raises(ValueError, match="outside src/imagen_ops/"):
        pipeline.code_digest(["flows/retrain.py"])


def run_dirs(paths: TrainPaths) -> list[Path]:
    return sorted(p for p in paths.checkpoints.iterdir() if p.is_dir())


def steps_of(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step_"))


@pytest.mark.integration
def test_second_run_resumes_its_own_checkpoints_whatever_earlier_runs_left(
    tiny_data, tmp_path, monkeypatch
):
    """Run 1 (12 steps) leaves step_12 checkpoints; run 2 (other settings, 8 steps) is
    killed after step 4: resuming it picks run 2's step 4, never run 1's later steps, its
    own checkpoints survive pruning, and it ends equal to an uninterrupted run 2."""
    paths = paths_for(tiny_data, tmp_path / "runs")
    long = ("stages.base.train.steps=12", "stages.base.train.checkpoint_every=4")
    Trainer(train_settings(tiny_params(*long), "base"), paths, progress=False).fit()
    (first,) = run_dirs(paths)
    assert steps_of(first) == ["step_00000008", "step_00000012"]

    second = ("stages.base.train.steps=8", "stages.base.train.checkpoint_every=4")
    ref = train_base(tiny_data, tmp_path / "ref", *second, "stages.base.train.lr=0.0005")
    settings = train_settings(tiny_params(*second, "stages.base.train.lr=0.0005"), "base")
    real_optimize = Trainer._optimize

    def killed_after_step_4(self, step, micro):
        if step == 4:
            raise KeyboardInterrupt  # the process dies after the step-4 checkpoint
        return real_optimize(self, step, micro)

    monkeypatch.setattr(Trainer, "_optimize", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(settings, paths, progress=False).fit()
    monkeypatch.undo()
    own = next(p for p in run_dirs(paths) if p != first)
    assert steps_of(own) == ["step_00000004"]
    assert steps_of(first) == ["step_00000008", "step_00000012"], "run 1 left as it was"

    resumed = Trainer(settings, paths, progress=False)
    assert resumed._resume() == 4
    resumed.fit()
    assert steps_of(own) == ["step_00000004", "step_00000008"]
    assert _same(weights(paths.out), ref)

    # a third run with the first run's settings resumes the first run's folder (kept: 2 runs)
    third = Trainer(train_settings(tiny_params(*long), "base"), paths, progress=False)
    assert third._resume() == 12


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        data = bytearray(path.read_bytes())
        data[-7] ^= 0xFF  # inside the last tensor's bytes: the header still parses
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_data, tmp_path, how, caplog):
    paths = paths_for(tiny_data, tmp_path)
    params = tiny_params("stages.base.train.steps=8", "stages.base.train.checkpoint_every=4")
    Trainer(train_settings(params, "base"), paths, progress=False).fit()
    (run,) = run_dirs(paths)
    newest = run / "step_00000008"
    if how == "empty":
        shutil.rmtree(newest)
        newest.mkdir()
    else:
        damage(newest / "ema.safetensors", how)
    trainer = Trainer(train_settings(params, "base"), paths, progress=False)
    caplog.clear()
    assert trainer._resume() == 4
    (line,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(newest) in line and "\n" not in line
    expected = {"truncated": "checksum", "flipped": "checksum", "empty": "no checksums.json"}
    assert expected[how] in line


def killed_after(step_limit: int, monkeypatch) -> None:
    """Make Trainer._optimize die (as a killed process would) when it reaches step_limit."""
    real = Trainer._optimize

    def optimize(self, step, micro):
        if step == step_limit:
            raise KeyboardInterrupt
        return real(self, step, micro)

    monkeypatch.setattr(Trainer, "_optimize", optimize)


def test_a_damaged_newer_checkpoint_does_not_push_out_the_new_ones(
    tiny_data, tmp_path, monkeypatch
):
    """keep_last counts the checkpoints up to the one just written: the damaged step_8 a
    resumed run fell back past must not make it delete each checkpoint it writes."""
    paths = paths_for(tiny_data, tmp_path)
    params = tiny_params(
        "stages.base.train.steps=8",
        "stages.base.train.checkpoint_every=4",
        "stages.base.train.keep_last=1",
    )
    Trainer(train_settings(params, "base"), paths, progress=False).fit()
    (run,) = run_dirs(paths)
    assert steps_of(run) == ["step_00000008"]
    damage(run / "step_00000008" / "model.safetensors", "flipped")
    killed_after(6, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(train_settings(params, "base"), paths, progress=False).fit()
    monkeypatch.undo()
    assert "step_00000004" in steps_of(run)
    assert Trainer(train_settings(params, "base"), paths, progress=False)._resume() == 4


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(tiny_data, tmp_path, monkeypatch):
    """Killed after a checkpoint in the middle of a logging window (checkpoints every 3
    steps, rows every 2): the resumed run's CSV is the uninterrupted run's, byte for byte,
    and its tracked run gets the params too."""
    params = tiny_params("stages.base.train.steps=8")
    settings = train_settings(params, "base")
    Trainer(settings, paths_for(tiny_data, tmp_path / "ref"), progress=False).fit()
    paths = paths_for(tiny_data, tmp_path / "run")
    killed_after(4, monkeypatch)  # steps 0-3 ran, the step-3 checkpoint holds step 3's loss
    with pytest.raises(KeyboardInterrupt):
        Trainer(settings, paths, progress=False).fit()
    monkeypatch.undo()
    (run,) = run_dirs(paths)
    (run / ".step_00000006.x1y2.tmp").mkdir()  # what a kill inside a save leaves
    (run / ".step_00000003.old").mkdir()
    tracker = RecordingTracker()
    Trainer(settings, paths, tracker=tracker, progress=False).fit()
    ref = (tmp_path / "ref" / "train_base.csv").read_bytes()
    assert paths.metrics.read_bytes() == ref
    assert tracker.params["resumed_from_step"] == 3 and "env.threads" in tracker.params
    assert not list(run.glob(".step_*")), "partly written checkpoints are removed"


def test_ranks_that_resume_from_different_steps_stop_at_once(monkeypatch):
    from imagen_ops.train import distributed

    def gathered(out, value):
        out[:] = [value, 0]  # rank 1 found no checkpoint

    monkeypatch.setattr(distributed.dist, "all_gather_object", gathered)
    info = distributed.DistInfo(0, 2, 0, torch.device("cpu"))
    distributed.check_same(distributed.DistInfo(0, 1, 0, torch.device("cpu")), 4, "x")
    distributed.check_same(info, 0, "the resume step")
    with pytest.raises(RuntimeError, match=r"ranks disagree on the resume step: \[4, 0\]"):
        distributed.check_same(info, 4, "the resume step")


def test_ranks_check_their_fingerprint_before_their_resume_step(tiny_data, tmp_path, monkeypatch):
    """Nodes on another commit or other data would all start at step 0 and pass the step
    check, then train two configurations in one all-reduce: the fingerprint is compared
    first."""
    from imagen_ops.train import distributed

    seen = []
    monkeypatch.setattr(
        distributed, "check_same", lambda _info, value, what, **_: seen.append((what, value))
    )
    params = tiny_params("stages.base.train.steps=1")
    trainer = Trainer(
        train_settings(params, "base"), paths_for(tiny_data, tmp_path), progress=False
    )
    trainer.fit()
    assert seen == [
        ("the run's fingerprint (code, data, settings)", trainer.fingerprint),
        ("the step their checkpoints resume from", 0),
    ]

    def gathered(out, value):
        out[:] = [value, "another"]

    monkeypatch.undo()
    monkeypatch.setattr(distributed.dist, "all_gather_object", gathered)
    info = distributed.DistInfo(0, 2, 0, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"ranks disagree on f.*same commit"):
        distributed.check_same(info, "mine", "f", hint="every node must run the same commit")


def test_non_finite_weights_are_never_exported(tiny_data, tmp_path, monkeypatch):
    paths = paths_for(tiny_data, tmp_path)
    params = tiny_params("stages.base.train.steps=4", "stages.base.train.checkpoint_every=4")
    trainer = Trainer(train_settings(params, "base"), paths, progress=False)
    real_update = trainer.ema.update

    def poisoned(net, step):
        real_update(net, step)
        next(iter(trainer.ema.params.values())).fill_(float("nan"))

    monkeypatch.setattr(trainer.ema, "update", poisoned)
    with pytest.raises(TrainingDivergedError, match="non-finite weights"):
        trainer.fit()
    assert not paths.out.exists()


def test_non_finite_steps_are_skipped_then_training_stops(tiny_data, tmp_path, monkeypatch):
    real_loss = trainer_module.diffusion_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 5, 6, 7) else loss

    monkeypatch.setattr(trainer_module, "diffusion_loss", sometimes_nan)
    params = tiny_params(
        "stages.base.train.steps=10",
        "stages.base.train.checkpoint_every=4",
        "stages.base.train.max_nonfinite=3",
    )
    paths = paths_for(tiny_data, tmp_path)
    with pytest.raises(TrainingDivergedError, match="3 consecutive non-finite"):
        Trainer(train_settings(params, "base"), paths, progress=False).fit()
    # one isolated NaN (call 2) was skipped and training went on to the step-4 checkpoint
    (step4,) = paths.checkpoints.glob("*/step_00000004")
    state = torch.load(step4 / "state.pt", weights_only=True)
    assert state["skipped"] == 1
    good = load_file(str(step4 / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not paths.out.exists()


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from pathlib import Path
from imagen_ops.config import load_params
from imagen_ops.pipeline import train_settings
from imagen_ops.train.trainer import Trainer, TrainPaths
torch.set_num_threads(1)
params = load_params(sys.argv[1])
root = Path(sys.argv[2])
prepared, cache = Path(sys.argv[3]), Path(sys.argv[4])
paths = TrainPaths(prepared, cache, root / "model", root / "ck", root / "m.csv")
trainer = Trainer(train_settings(params, "base"), paths, progress=False)
trainer.fit()
flat = torch.cat([p.detach().flatten() for p in trainer.net.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    gaps = [float((g - gathered[0]).abs().max()) for g in gathered]
    (root / "ranks.json").write_text(json.dumps(gaps))
trainer.close()
"""


@pytest.mark.integration
def test_ddp_two_ranks_match_one_process(tiny_data, tmp_path):
    overrides = (
        "stages.base.train.precision=fp32",
        "stages.base.train.steps=4",
        "stages.base.train.checkpoint_every=2",
    )
    params_file = write_params(tmp_path / "params.yaml", *overrides)
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(script),
        str(params_file),
        str(tmp_path / "ddp"),
        str(tiny_data["prepared"]),
        str(tiny_data["cache"]),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "ranks.json").read_text()) == [0.0, 0.0]

    torch.set_num_threads(1)
    try:
        single = train_base(tiny_data, tmp_path / "single", *overrides)
    finally:
        torch.set_num_threads(2)
    # Same global batch, same per-example noise: equal up to float summation order in the
    # gradient all-reduce. Adam's first updates are lr * sign(g), so a rounding difference
    # in a near-zero gradient can flip a few elements by ~lr; a wrong batch split or a
    # missing all-reduce changes almost every element. Compare the share that differs.
    assert differing_share(weights(tmp_path / "ddp" / "model"), single) < 0.005
    # the logged loss is the global batch's, not rank 0's half of it
    ddp_losses = logged_losses(tmp_path / "ddp" / "m.csv")
    single_losses = logged_losses(tmp_path / "single" / "train_base.csv")
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    other = train_base(tiny_data, tmp_path / "other", *overrides, "stages.base.train.seed=1")
    assert differing_share(single, other) > 0.5


def differing_share(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Share of weight elements (model and EMA) that differ by more than 1e-6."""
    total = sum(v.numel() for v in a.values())
    return sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in a) / total


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_seed_same_weights(tiny_data, tmp_path, dropout):
    """Dropout draws from the global generator, which each step seeds from (seed, step)."""
    for run in ("a", "b"):
        train_base(tiny_data, tmp_path / run, f"stages.base.unet.dropout={dropout}")
    assert_same_weights(tmp_path / "a" / "model" / "base", tmp_path / "b" / "model" / "base")


def test_each_step_and_stream_gets_its_own_generator():
    """No two (step, stream) pairs share a seed: with an arithmetic mix, example p + 7 of
    one step drew example p's noise of the next, and one noise tensor recurred for steps."""
    streams = ["epoch", "offset", "layout", "rank/0", "rank/1"]
    streams += [f"example/{p}" for p in range(64)]
    seeds = [step_generator(0, step, s).initial_seed() for step in range(40) for s in streams]
    assert len(set(seeds)) == len(seeds)
    first = torch.randn(8, generator=step_generator(0, 1, "example/0"))
    assert torch.equal(first, torch.randn(8, generator=step_generator(0, 1, "example/0")))
    assert not torch.equal(first, torch.randn(8, generator=step_generator(1, 1, "example/0")))


def test_gradient_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    common = ("stages.base.train.precision=fp32", "stages.base.train.steps=3")
    one = train_base(tiny_data, tmp_path / "one", *common)
    accum = train_base(tiny_data, tmp_path / "accum", *common, "stages.base.train.grad_accum=2")
    assert differing_share(one, accum) < 0.005  # the same global batch, summed in two halves


def test_adafactor_option_trains(tiny_data, tmp_path):
    params = tiny_params(
        "stages.base.train.optimizer=adafactor",
        "stages.base.train.lr=0.1",
        "stages.base.train.steps=80",
        "stages.base.train.log_every=10",
        "stages.base.train.checkpoint_every=1000",
    )
    trainer = Trainer(
        train_settings(params, "base"), paths_for(tiny_data, tmp_path), progress=False
    )
    assert isinstance(trainer.optimizer, torch.optim.Adafactor)
    trainer.fit()
    losses = logged_losses(tmp_path / "train_base.csv")
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses}"


class RecordingTracker:
    enabled = True

    def __init__(self):
        self.params, self.metrics, self.images = {}, [], []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))

    def log_image(self, image, name):
        self.images.append((name, image.size))

    def close(self, status="FINISHED"):
        pass


def test_tracker_gets_params_metrics_and_sample_grids(tiny_data, tmp_path):
    # best of N in params.yaml does not reach previews: a stage in training has no scorer
    params = tiny_params("stages.sr32.train.sample_every=4", "sample.rerank=4")
    tracker = RecordingTracker()
    (tmp_path / "train_sr32.png").write_bytes(b"stale")
    Trainer(
        train_settings(params, "sr32"),
        paths_for(tiny_data, tmp_path, "sr32"),
        tracker=tracker,
        progress=False,
    ).fit()
    assert tracker.params["stage"] == "sr32" and tracker.params["train.steps"] == 6
    # what a bit-for-bit rebuild needs besides data, params and seed
    assert tracker.params["env.threads"] == torch.get_num_threads()
    assert tracker.params["env.torch"] == torch.__version__
    assert tracker.params["env.device"] == "cpu" and tracker.params["env.cpu"]
    assert [s for s, _ in tracker.metrics] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(tracker.metrics[-1][1])
    names = [n for n, _ in tracker.images]
    assert names == ["samples/sr32_step_00000004.png", "samples/sr32_step_00000006.png"]
    # the loss chart beside the CSV (DVC's image plot of the stage), rewritten at the end
    assert Image.open(tmp_path / "train_sr32.png").size == (500, 320)


def test_no_previews_without_a_tracker(tiny_data, tmp_path, monkeypatch):
    """Preview grids cost sampling time; nothing samples them when nothing keeps them."""

    def refuse(self, step):
        raise AssertionError(f"preview sampled at step {step} with tracking off")

    monkeypatch.setattr(Trainer, "_preview", refuse)
    params = tiny_params("stages.sr32.train.sample_every=1")
    Trainer(
        train_settings(params, "sr32"), paths_for(tiny_data, tmp_path, "sr32"), progress=False
    ).fit()


def test_init_from_warm_starts_and_checks_the_architecture(tiny_data, tmp_path):
    train_base(tiny_data, tmp_path / "src")
    source = tmp_path / "src" / "model" / "base"
    trainer = Trainer(
        train_settings(tiny_params("stages.base.train.seed=3"), "base"),
        paths_for(tiny_data, tmp_path / "ft"),
        init_from=source,
        progress=False,
    )
    ema = load_file(str(source / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in trainer.net.state_dict().items())
    bad = {
        "stages.base.unet.embedding_dim=64": "architecture",
        "stages.base.diffusion.objective=eps": "diffusion.objective",
        "stages.base.diffusion.schedule=linear": "diffusion.schedule",
    }
    for override, reason in bad.items():
        with pytest.raises(ValueError, match=f"its {re.escape(reason)}"):
            Trainer(
                train_settings(tiny_params(override), "base"),
                paths_for(tiny_data, tmp_path / "bad"),
                init_from=source,
                progress=False,
            )
    # a base stage's weights into a super-resolution stage of the same U-Net
    with pytest.raises(ValueError, match="its low-res input differ"):
        Trainer(
            train_settings(tiny_params("stages.sr32.unet.efficient=false"), "sr32"),
            paths_for(tiny_data, tmp_path / "sr", "sr32"),
            init_from=source,
            progress=False,
        )


def test_compiled_training_pads_text_to_one_length_that_changes_nothing(tiny_data, tmp_path):
    """torch.compile specialises on shapes: with compile on, every batch carries the cache's
    one text length (a batch of shorter captions recompiled, and inductor's backward then
    failed on torch 2.13); the padding is masked, so the loss is the trimmed batch's."""
    lengths = {}
    for compile_ in (False, True):
        trainer = Trainer(
            train_settings(tiny_params(f"stages.base.train.compile={compile_}"), "base"),
            paths_for(tiny_data, tmp_path / str(compile_)),
            progress=False,
        )
        batches = [trainer._micro_batches(step)[0] for step in range(12)]
        lengths[compile_] = {b.text.tokens.shape[1] for b, _ in batches}
    stored = int(json.loads((tiny_data["cache"] / "manifest.json").read_text())["stored_length"])
    assert lengths[True] == {stored}
    assert min(lengths[False]) < stored  # without it, lengths vary by batch (what broke)

    padded, noise = batches[0]  # compile on, step 0
    plain = Trainer(
        train_settings(tiny_params(), "base"), paths_for(tiny_data, tmp_path / "t"), progress=False
    )
    trimmed = plain._micro_batches(0)[0][0]  # the same step's batch without compile
    assert trimmed.text.tokens.shape[1] < stored
    with torch.no_grad():
        a = diffusion_loss(trainer.stage, trainer.net, padded, noise)
        b = diffusion_loss(trainer.stage, trainer.net, trimmed, noise)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_mode_stage_trains_on_each_images_nearest_layout_mode(tiny_data, tmp_path):
    """`layout_condition: mode`: the U-Net's prior mean in training is the mode nearest each
    clean image (the assignment the head's weights learn, so sampling a mode from them
    matches training), read from the head with the step's caption dropout."""
    layout = (
        "stages.base.unet.layout_grid=2",
        "stages.base.unet.layout_modes=3",
        "stages.base.unet.layout_condition=mode",
        "stages.base.train.layout.steps=200",
    )
    trainer = Trainer(
        train_settings(tiny_params(*layout), "base"),
        paths_for(tiny_data, tmp_path),
        progress=False,
    )
    trainer._fit_layout()
    batch, noise = trainer._micro_batches(0)[0]
    seen = []
    trainer.net.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0][:, 3:6]))
    with torch.no_grad():
        diffusion_loss(trainer.stage, trainer.net, batch, noise)
        mask = batch.text.mask & noise.keep_text[:, None]
        prior = trainer.net.layout(batch.text.tokens.float(), mask)
    nearest = mode_errors(prior, batch.images).argmin(1)
    assert len(set(nearest.tolist())) > 1, "the batch's images pick different modes"
    mode = prior.means[torch.arange(len(nearest)), nearest]
    size = batch.images.shape[-2:]
    expected = torch.nn.functional.interpolate(mode, size=size, mode="bilinear")
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("modes", [1, 2])
def test_layout_head_is_fitted_alone_first_and_a_resume_does_not_refit_it(
    tiny_data, tmp_path, modes
):
    """train.layout: the head learns the images' cell means on its own before the U-Net
    trains (with modes: its nearest mode does); a run resumed from a checkpoint continues
    from its weights (fitting the head again would move them) and ends equal to an
    uninterrupted run."""
    layout = (
        "stages.base.unet.layout_grid=2",
        f"stages.base.unet.layout_modes={modes}",
        "stages.base.train.layout.steps=40",
        "stages.base.train.steps=4",
        "stages.base.train.checkpoint_every=2",
    )
    settings = train_settings(tiny_params(*layout), "base")
    data = StageData(
        PreparedData.open(tiny_data["prepared"]),
        EmbeddingCache.open(tiny_data["cache"]),
        settings.stage.resolution,
        None,
    )
    batch = data.load(data.records)

    def head_error(net) -> float:
        with torch.no_grad():
            prior = net.layout(batch.text.tokens.float(), batch.text.mask)
            return float(mode_errors(prior, batch.images).min(1).values.mean())

    fresh = Trainer(settings, paths_for(tiny_data, tmp_path / "probe"), progress=False)
    before = head_error(fresh.net)
    fresh._fit_layout()
    after = head_error(fresh.net)
    assert after < 0.5 * before, f"the head did not learn the cell means: {before} -> {after}"

    ref = train_base(tiny_data, tmp_path / "ref", *layout)
    paths = paths_for(tiny_data, tmp_path / "run")
    Trainer(settings, paths, progress=False).fit()
    (run,) = run_dirs(paths)
    shutil.rmtree(run / "step_00000004")
    shutil.rmtree(paths.out)
    resumed = Trainer(settings, paths, progress=False)
    assert resumed._resume() == 2
    resumed.fit()
    assert _same(weights(paths.out), ref)
    with pytest.raises(ValueError, match="layout_grid"):
        tiny_params("stages.base.train.layout.steps=10")
    with pytest.raises(ValueError, match=r"train\.crop"):
        tiny_params("stages.sr32.unet.layout_grid=2", "stages.sr32.train.crop=16")


def test_ema_follows_its_formula_tensor_by_tensor():
    """w_ema <- d w_ema + (1 - d) w for each floating tensor, with the warm-up decay;
    integer buffers (BatchNorm's counter) are copied."""
    from imagen_ops.train.ema import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))
    ema = EMA(net, decay=0.9)
    expected = {k: v.clone().float() for k, v in net.state_dict().items()}  # kept as float32
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(4, 5))  # BatchNorm's running stats and counter move
        ema.update(net, step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.float()
    for k, v in expected.items():
        torch.testing.assert_close(ema.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert ema.state_dict()["1.num_batches_tracked"].item() == 3


def test_prefetch_threads_deliver_the_inline_batches_in_step_order(tiny_data, tmp_path):
    """On CUDA several threads build batches ahead (PREFETCH_WORKERS). Later steps finish
    first here, yet every step arrives in order with the batch and noise built inline."""
    params = tiny_params("stages.sr32.train.crop=16")
    trainer = Trainer(
        train_settings(params, "sr32"), paths_for(tiny_data, tmp_path, "sr32"), progress=False
    )

    def slow_early(step: int):
        time.sleep(0.01 * (8 - step))
        return trainer._micro_batches(step)

    got = list(prefetch(slow_early, range(8), workers=3))
    assert [step for step, _ in got] == list(range(8))
    for step, micro in got:
        (batch, noise), (ref_batch, ref_noise) = micro[0], trainer._micro_batches(step)[0]
        assert torch.equal(batch.images, ref_batch.images)
        assert torch.equal(batch.lowres, ref_batch.lowres)
        assert torch.equal(batch.text.tokens, ref_batch.text.tokens)
        for field in dataclasses.fields(noise):
            assert torch.equal(getattr(noise, field.name), getattr(ref_noise, field.name))


def _prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("prefetch")]


def test_prefetch_raises_a_builders_error_at_its_step_and_stops_the_rest():
    built: list[int] = []

    def make(step: int) -> int:
        built.append(step)
        if step == 3:
            raise OSError("step 3: a damaged shard")
        return step

    got = []
    with pytest.raises(OSError, match="step 3: a damaged shard"):
        for _, value in prefetch(make, range(1000), workers=2, depth=4):
            got.append(value)
    assert got == [0, 1, 2]
    assert max(built) <= 3 + 4, "no more than `depth` steps are built past the failing one"
    assert not _prefetch_threads(), "the builders stopped with the consumer"


def test_prefetch_stops_its_builders_when_the_consumer_stops():
    built: list[int] = []

    def make(step: int) -> int:
        built.append(step)
        return step

    batches = prefetch(make, range(1000), workers=2, depth=4)
    assert [next(batches)[0] for _ in range(2)] == [0, 1]
    batches.close()  # what `fit` does when a step raises or the run is interrupted
    assert max(built) <= 1 + 4 and not _prefetch_threads()
    with pytest.raises(ValueError, match="workers >= 0"):
        next(prefetch(make, range(3), workers=-1))


def test_prefetch_without_workers_builds_each_step_when_asked_in_the_callers_thread():
    """workers=0 is the CPU trainer's path: nothing is built ahead and no thread starts,
    because the builder's tensor ops would compete with the step's OpenMP threads."""
    built: list[tuple[int, str]] = []

    def make(step: int) -> int:
        built.append((step, threading.current_thread().name))
        return step * 10

    batches = prefetch(make, range(5, 1000), workers=0)
    assert built == []
    assert [next(batches) for _ in range(3)] == [(5, 50), (6, 60), (7, 70)]
    main = threading.current_thread().name
    assert built == [(5, main), (6, main), (7, main)]
    assert not _prefetch_threads()
    with pytest.raises(ValueError, match="depth=4 needs workers >= 1"):
        next(prefetch(make, range(3), workers=0, depth=4))
