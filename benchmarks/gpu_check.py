"""The gpu recipe end to end on one GPU inside a wall-clock budget: throughput, MFU, alignment.

    python benchmarks/gpu_check.py encoder DIR        # here: an fp16 copy of the encoder
    python benchmarks/gpu_check.py run --encoder DIR [--recipe configs/gpu.yaml]
                                       [--minutes 9] [--work /tmp/gpu_check] [--out DIR]

A lent GPU machine has no network and a few minutes, so `run` does in one process what
`dvc repro` does, through the same library calls, and scales the recipe to the time left:

1. data: the recipe's synthetic set (synth -> prepare -> encode_text);
2. each stage: a short run of the real Trainer (compilation included), then its optimizer
   step timed on one fixed batch (the model alone) and the trainer's own images/s (what
   the data pipeline lets through); MFU against the card's dense bf16 peak, peak memory,
   and (torch.profiler) the share of the step the GPU spends in kernels, and kernels per
   step: a step that waits on the host gains little from a faster card;
3. training: every stage with its recipe steps and warm-up scaled down to its share of the
   time left (the table says which fraction of the recipe each stage ran);
4. alignment: the trained cascade samples the held-out prompts (eval.per_category of each
   category, the evaluate stage's selection) and the exact evaluator scores them; then the
   evaluate stage's guidance sweep (eval.guidance_sweep on eval.sweep_samples prompts).

The machine cannot download the text encoder, and the packaged MiniLM weights (91 MB)
exceed what travels, so `encoder` writes the same weights in float16 (46 MB) to a folder
that `run --encoder` loads as a local encoder (the cache records its own weights id).
`--device cpu` with `-S` overrides runs the same path at toy size (a dry run off the GPU).
Every run starts from an empty `--work` folder: an earlier run's would be resumed, not timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from imagen_ops.cascade import Cascade, load_stage
from imagen_ops.config import (
    Params,
    SampleConfig,
    apply_overrides,
    deep_merge,
    parse_params,
)
from imagen_ops.data.ingest import ingest
from imagen_ops.data.prepare import PreparedData, prepare
from imagen_ops.data.sources import synth_source
from imagen_ops.device import resolve_device
from imagen_ops.eval.alignment import CATEGORIES, alignment_report, judge_all
from imagen_ops.eval.evaluate import held_out
from imagen_ops.images import make_grid, to_uint8
from imagen_ops.models.summary import summarize
from imagen_ops.pipeline import train_settings
from imagen_ops.text.cache import build_cache
from imagen_ops.text.encoders import load_text_encoder
from imagen_ops.train.tracking import NullTracker
from imagen_ops.train.trainer import Trainer, TrainPaths

from common import machine, table

log = logging.getLogger("gpu_check")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s
RESERVE_S = 60.0  # 1,000 held-out prompts sampled and judged in 12-15 s on an H200, the sweep
DRY_STEPS, DRY_LOG_EVERY, PROBE_STEPS, PROFILE_STEPS = 20, 5, 10, 3


class Rates(NullTracker):
    """A tracker that keeps the trainer's images/s per logging window (and nothing else)."""

    def __init__(self) -> None:
        self.images_per_s: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.images_per_s.append(metrics["images_per_s"])


def export_encoder(params: Params, out: Path) -> None:
    """The configured encoder's weights in float16, with its tokenizer, as a local folder."""
    encoder = load_text_encoder(params.text)
    encoder.model.half().save_pretrained(out)
    encoder.tokenizer.save_pretrained(out)
    log.info("wrote %s (%s)", out, encoder.name)


def load_recipe(args: argparse.Namespace) -> tuple[dict[str, Any], Params]:
    raw = yaml.safe_load(Path(args.params).read_text())
    if args.recipe:
        raw = deep_merge(raw, yaml.safe_load(Path(args.recipe).read_text()))
    raw = apply_overrides(raw, [*args.set, f"text.encoder={Path(args.encoder).resolve()}"])
    return raw, parse_params(raw, args.recipe or args.params)


def make_data(params: Params, work: Path) -> dict[str, float]:
    """synth -> prepare -> encode_text, as the DVC stages run them; seconds per step."""
    seconds, start = {}, time.perf_counter()
    records = synth_source(params.data.synth, workers=os.cpu_count() or 1)
    ingest(records, work / "data", params.data.ingest, progress=False)
    seconds["synth"] = time.perf_counter() - start
    start = time.perf_counter()
    sizes = sorted({s.resolution for s in params.stages.values()})
    manifest = prepare(work / "data", work / "prepared", sizes, params.data.prepare, False)
    seconds["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    captions = PreparedData.open(work / "prepared").table["caption"].tolist()
    build_cache(
        captions,
        load_text_encoder(params.text),
        work / "text_cache",
        progress=False,
    )
    seconds["encode_text"] = time.perf_counter() - start
    log.info("data: %d images, %s", manifest["count"], manifest["splits"])
    return seconds


def trainer_for(raw: dict[str, Any], name: str, work: Path, run: str, **train: Any) -> Trainer:
    """Stage `name`'s Trainer with `train` keys replaced, writing under work/run/."""
    params = parse_params(deep_merge(raw, {"stages": {name: {"train": train}}}))
    paths = TrainPaths(
        prepared=work / "prepared",
        cache=work / "text_cache",
        out=work / run / name,
        checkpoints=work / run / "checkpoints" / name,
        metrics=work / run / f"{name}.csv",
    )
    return Trainer(train_settings(params, name), paths, tracker=Rates(), progress=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fixed_batch(trainer: Trainer) -> list[tuple[Any, Any]]:
    """Step 0's micro-batches, on the device: what `probe` and `kernel_time` repeat."""
    dev, cl = trainer.device, trainer.tcfg.channels_last
    return [(b.to(dev, cl), n.to(dev)) for b, n in trainer._micro_batches(0)]


def probe(trainer: Trainer, micro: list[tuple[Any, Any]], steps: int) -> float:
    """Seconds per optimizer step on one fixed batch already on the device (no data work):
    the Trainer's own step, so the compiled graph and the optimizer are the real ones."""
    trainer._optimize(0, micro)
    sync(trainer.device)
    start = time.perf_counter()
    for step in range(steps):
        trainer._optimize(step, micro)
    sync(trainer.device)
    return (time.perf_counter() - start) / steps


def kernel_time(trainer: Trainer, micro: list[tuple[Any, Any]], steps: int) -> dict[str, float]:
    """GPU kernel seconds and kernels per optimizer step (torch.profiler). Kernel time over
    the unprofiled step time is the share of the step the GPU computes; well under 1, the
    step waits on the host (launches, syncs), which a faster GPU does not shorten."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(steps):
            trainer._optimize(step, micro)
        sync(trainer.device)
    busy = [  # the device's own events: an op's row repeats its kernels' time
        e
        for e in prof.key_averages()
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    ]
    return {
        "kernel_s": sum(e.self_device_time_total for e in busy) / 1e6 / steps,
        "kernels": sum(e.count for e in busy) / steps,
    }


def launch_us(device: torch.device, n: int = 5000) -> float:
    """Microseconds per tiny eager op, launched and synchronised: the host's share of a
    step made of many small kernels (one host differs from the next)."""
    x = torch.zeros((), device=device)
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    sync(device)
    return (time.perf_counter() - start) / n * 1e6


def measure_stage(
    raw: dict[str, Any], name: str, work: Path, flops: float, peak: float | None
) -> dict[str, Any]:
    """A short real run of stage `name` (compiles), then its optimizer step alone."""
    stage = parse_params(raw).stages[name]
    tc = stage.train
    start = time.perf_counter()
    trainer = trainer_for(
        raw,
        name,
        work,
        "dry",
        steps=DRY_STEPS,
        log_every=DRY_LOG_EVERY,
        checkpoint_every=DRY_STEPS,
        warmup_steps=1,
        layout={"steps": 0},  # the U-Net's steps: the layout head's fit is timed in the run
    )
    trainer.fit()
    dry = time.perf_counter() - start
    trainer_rate = statistics.median(trainer.tracker.images_per_s[1:])  # [0]: compilation
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    micro = fixed_batch(trainer)
    step_s = probe(trainer, micro, PROBE_STEPS)
    model_rate = tc.batch_size / step_s
    kernels: dict[str, Any] = {}
    if cuda:
        try:
            kernels = kernel_time(trainer, micro, PROFILE_STEPS)
            kernels["gpu_busy"] = kernels["kernel_s"] / step_s
        except Exception as err:  # a diagnosis: never worth the run's budget
            log.exception("profiling stage %s failed", name)
            kernels = {"profile_error": f"{type(err).__name__}: {err}"[:500]}
    return {
        **kernels,
        "px": tc.crop or stage.resolution,
        "batch": tc.batch_size,
        "compile": tc.compile,
        "model_images_per_s": model_rate,
        "trainer_images_per_s": trainer_rate,
        "tflops": flops * model_rate / 1e12,
        "mfu": flops * model_rate / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_run_s": dry,
        "overhead_s": max(0.0, dry - DRY_STEPS * tc.batch_size / trainer_rate),
        "recipe_steps": tc.steps,
        "recipe_minutes": tc.steps * tc.batch_size / trainer_rate / 60,
    }


def throughput(raw: dict[str, Any], work: Path, dev: torch.device) -> dict[str, Any]:
    """Per stage; a stage whose compiled run fails is measured again eagerly (recorded)."""
    params = parse_params(raw)
    peak = None
    if dev.type == "cuda":
        peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
    flops = {r["stage"]: r["gflops_train_step"] * 1e9 for r in summarize(params.stages)}
    stages = {}
    for name, cfg in params.stages.items():
        try:
            stages[name] = measure_stage(raw, name, work, flops[name], peak)
        except Exception as err:
            if not cfg.train.compile:
                raise
            log.exception("stage %s failed compiled; measuring it eagerly", name)
            raw = deep_merge(raw, {"stages": {name: {"train": {"compile": False}}}})
            stages[name] = measure_stage(raw, name, work, flops[name], peak)
            stages[name]["compile_error"] = f"{type(err).__name__}: {err}"[:2000]
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rows = [
        [
            name,
            s["px"],
            s["batch"],
            s["compile"],
            round(s["model_images_per_s"]),
            round(s["trainer_images_per_s"]),
            round(s["tflops"], 1),
            f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a",
            f"{s['gpu_busy']:.0%}" if "gpu_busy" in s else "n/a",
            round(s["kernels"]) if "kernels" in s else "n/a",
            round(s["peak_gib"], 1) if s["peak_gib"] is not None else "n/a",
            round(s["first_run_s"], 1),
            round(s["recipe_minutes"], 1),
        ]
        for name, s in stages.items()
    ]
    header = [
        "stage",
        "px",
        "batch",
        "compiled",
        "images/s (step)",
        "images/s (trainer)",
        "TFLOP/s",
        "MFU",
        "GPU busy",
        "kernels/step",
        "peak GiB",
        "first run s",
        "recipe min",
    ]
    print(table(header, rows), flush=True)
    return {"raw": raw, "stages": stages}


def train_all(raw: dict[str, Any], work: Path, stages: dict[str, Any], deadline: float) -> None:
    """Every stage with its recipe steps and warm-up scaled to fit the time left. Each stage
    takes its share of what is left when it starts. A real run reuses the first run's
    compiled code (on the CPU its set-up cost ~0 of the first run's 57 s), so its set-up is
    first assumed to cost a quarter of the first run's, then what the last real run's did."""
    ratio = 0.25  # a real run's set-up time over its first run's: compiled code is reused
    names = list(stages)
    for i, (name, cfg) in enumerate(parse_params(raw).stages.items()):
        rest = [stages[n] for n in names[i:]]
        left = deadline - time.monotonic() - RESERVE_S - ratio * sum(s["overhead_s"] for s in rest)
        scale = max(0.0, min(1.0, left / sum(s["recipe_minutes"] * 60 for s in rest)))
        tc, stage = cfg.train, stages[name]
        steps = max(2, round(tc.steps * scale))
        print(f"training {name}: {steps} of the recipe's {tc.steps} steps", flush=True)
        start = time.perf_counter()
        trainer = trainer_for(
            raw,
            name,
            work,
            "models",
            steps=steps,
            warmup_steps=min(steps - 1, round(tc.warmup_steps * scale)),
        )
        fit = trainer.fit()
        seconds = time.perf_counter() - start
        del trainer
        overhead = seconds - steps * tc.batch_size / stage["trainer_images_per_s"]
        ratio = max(0.0, overhead) / max(stage["overhead_s"], 1e-3)
        stage.update(
            {"steps": steps, "scale": scale, "train_s": seconds, "final_loss": fit.final_loss}
        )


def alignment(params: Params, work: Path, dev: torch.device, out: Path) -> dict[str, Any]:
    """The trained cascade on the evaluate stage's held-out prompts, by the exact evaluator;
    then each other `eval.guidance_sweep` weight on the first `eval.sweep_samples` of them,
    as the evaluate stage sweeps (a few seconds each on a GPU)."""
    cascade = Cascade(
        [load_stage(work / "models" / name, device=dev) for name in params.stages], params.text
    )
    prompts = held_out(work / "prepared", work / "text_cache", params.text, params.eval)
    scenes = [json.loads(s) for s in prompts.scenes]
    settings = params.sample.plain()
    seeds = [settings.seed + k for k in range(len(prompts.records))]

    def score(point: SampleConfig, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        start = time.perf_counter()
        images = to_uint8(cascade.sample(prompts.text[:n], point, seeds[:n]))
        ms = (time.perf_counter() - start) / n * 1e3
        drawn = list(images)
        report = alignment_report(drawn, scenes[:n], judge_all(drawn, scenes[:n]))
        weights = " ".join(f"{w:g}" for w in point.per_stage("guidance", len(params.stages)))
        print(
            f"alignment ({n} held-out prompts, {images.shape[1]} px, {point.sampler} "
            f"{point.steps}, guidance {weights}): balanced {report['balanced']:.3f}, "
            + ", ".join(f"{c} {report[c]:.3f}" for c in CATEGORIES if report[c] is not None)
            + f", single_exact {report['single_exact']:.3f}; sampling {ms:.1f} ms per image",
            flush=True,
        )
        return images, {**report, "guidance": weights, "sampling_ms_per_image": ms}

    print()
    images, report = score(settings, len(seeds))
    make_grid(images[:32], prompts.captions[:32]).save(out / "gpu_check_grid.png")
    n_sweep = min(params.eval.sweep_samples, len(seeds))
    sweep = [
        score(point, n_sweep)[1]
        for point in (settings.updated(guidance=w) for w in params.eval.guidance_sweep)
        if point != settings
    ]
    return {**report, "guidance_sweep": sweep}


def run(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.minutes * 60
    raw, params = load_recipe(args)
    dev = resolve_device(args.device)
    work, out = Path(args.work), Path(args.out)
    if work.exists() and any(work.iterdir()):
        # An earlier run's data and checkpoints would be resumed, not measured: the dry
        # runs would train no step and the budget would be spent on nothing.
        raise SystemExit(f"--work {work} holds an earlier run: remove it or pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "recipe": args.recipe}

    def save() -> None:
        result["total_s"] = args.minutes * 60 - (deadline - time.monotonic())
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2))

    print(f"machine: {result['machine']}\n", flush=True)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result["launch_us"] = launch_us(dev)
    print(f"one tiny op launched and synchronised: {result['launch_us']:.1f} us", flush=True)
    result["data_seconds"] = make_data(params, work)
    save()
    measured = throughput(raw, work, dev)
    raw, result["stages"] = measured["raw"], measured["stages"]
    save()
    train_all(raw, work, result["stages"], deadline)
    save()
    rows = [
        [
            n,
            s["steps"],
            s["recipe_steps"],
            f"{s['scale']:.0%}",
            round(s["train_s"]),
            s["final_loss"],
        ]
        for n, s in result["stages"].items()
    ]
    print(table(["stage", "steps", "recipe steps", "of recipe", "seconds", "final loss"], rows))
    result["alignment"] = alignment(params, work, dev, out)
    save()
    print(f"total {result['total_s']:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--recipe", default="configs/gpu.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encoder", help="write an fp16 copy of the configured text encoder")
    enc.add_argument("out", type=Path)
    go = sub.add_parser("run", help="data, throughput, training and alignment in a budget")
    go.add_argument("--encoder", required=True, help="a local encoder folder (see `encoder`)")
    go.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget")
    go.add_argument("--device", default="cuda")
    go.add_argument("--work", default="/tmp/gpu_check")
    go.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "encoder":
        params = parse_params(yaml.safe_load(Path(args.params).read_text()), args.params)
        export_encoder(params, args.out)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu for a dry run at toy size)")
    run(args)


if __name__ == "__main__":
    main()
