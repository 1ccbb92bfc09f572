"""One trainer for any cascade stage (Imagen trains its stages independently).

The loop: build the step's micro-batches (ahead, on threads, on CUDA), accumulate gradients
(DDP syncs on the last micro-batch), clip, skip non-finite updates, step AdamW or Adafactor
at the warmup-cosine learning rate of the step, update the EMA, log, checkpoint. The data
order, the noise and the learning rate are functions of the step, so a checkpoint's step,
optimizer state and EMA are the whole state of a run: resuming is exact. A stage with a
layout head (unet.layout_grid) first fits the head alone (train.layout), once per run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from imagen_ops.cascade import Cascade, Stage, load_stage
from imagen_ops.config import TrainConfig, TrainSettings, flatten
from imagen_ops.data.dataset import Batch, StageData, prefetch, step_generator
from imagen_ops.data.prepare import PreparedData
from imagen_ops.device import environment, use_bf16
from imagen_ops.files import sha256_files, sha256_tree
from imagen_ops.images import make_grid, to_uint8
from imagen_ops.models.unet import layout_loss
from imagen_ops.pipeline import TRAIN_CODE, code_digest
from imagen_ops.text.cache import EmbeddingCache
from imagen_ops.train import distributed
from imagen_ops.train.checkpoint import (
    latest_valid,
    prune_runs,
    remove_partial,
    save_checkpoint,
    touch,
)
from imagen_ops.train.ema import EMA
from imagen_ops.train.loss import TrainingNoise, diffusion_loss, draw_noise
from imagen_ops.train.tracking import MetricsCSV, NullTracker, Tracker

__all__ = ["TrainPaths", "TrainResult", "Trainer", "TrainingDivergedError", "lr_at"]

log = logging.getLogger(__name__)

# Threads that build batches ahead on CUDA. One thread drawing the per-example noise of a
# 256-image 64 px batch held the H200's sr64 trainer to 58 % of its step rate (BENCHMARKS:
# the gpu recipe on one H200 again; the batch builder's threads).
PREFETCH_WORKERS = 4


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite losses or gradients, or non-finite weights."""


@dataclass(frozen=True)
class TrainPaths:
    prepared: Path  # output of the prepare stage
    cache: Path  # output of the encode_text stage
    out: Path  # the trained stage: config.json, model/ema safetensors
    checkpoints: Path  # resumable state
    metrics: Path  # CSV of training metrics (DVC plots)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    skipped_steps: int
    seconds: float
    images_per_s: float  # the name MLflow logs it under


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def _stage_digest(path: Path) -> str:
    """Content identity of a warm-start source (config + EMA weights), not its location:
    a registry download lands in a new temporary folder every time."""
    return sha256_files({name: path / name for name in ("config.json", "ema.safetensors")})


class Trainer:
    """Trains one stage (`settings`) from prepared data and the embedding cache."""

    def __init__(
        self,
        settings: TrainSettings,
        paths: TrainPaths,
        *,
        init_from: Path | None = None,
        tracker: Tracker | None = None,
        progress: bool = True,
    ):
        self.settings, self.paths, self.progress = settings, paths, progress
        self.cfg = settings.stage
        self.tcfg = self.cfg.train
        self.dist = distributed.setup(self.tcfg.device)
        self.device = self.dist.device
        self.tracker = tracker if tracker is not None and self.dist.is_main else NullTracker()
        if self.tcfg.batch_size % (self.dist.world_size * self.tcfg.grad_accum):
            raise ValueError(
                f"train.batch_size {self.tcfg.batch_size} is not divisible by "
                f"world size x grad_accum = {self.dist.world_size * self.tcfg.grad_accum}"
            )

        prepared = PreparedData.open(paths.prepared)
        cache = EmbeddingCache.open(paths.cache, settings.text, prepared.table["caption"].tolist())
        lowres = settings.lowres
        self.data = StageData(prepared, cache, self.cfg.resolution, lowres, crop=self.tcfg.crop)
        self.captions = prepared.table["caption"].tolist()
        # A compiled step specialises on the text length: padded to the cache's one length,
        # every batch reuses one graph (per-batch lengths made inductor recompile with dynamic
        # shapes, and its backward failed a stride check on torch 2.13)
        self.text_length = int(cache.manifest["stored_length"]) if self.tcfg.compile else None
        self.val = (
            StageData(prepared, cache, self.cfg.resolution, lowres, split="val")
            if len(prepared.indices("val"))
            else None
        )
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
            torch.manual_seed(self.tcfg.seed)
            self.stage = Stage.build(settings.name, self.cfg, cache.dim, lowres)
        self.warm_started = init_from is not None  # its layout head, if any, is fitted
        if init_from is not None:
            self._warm_start(init_from)
        self.net = self.stage.net.to(self.device)
        if self.tcfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = EMA(self.net, self.tcfg.ema_decay)
        self.optimizer = _optimizer(list(self.net.parameters()), self.tcfg, self.device)
        self.model: nn.Module = self.net
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if self.tcfg.compile:
            self.model = torch.compile(self.model)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.fingerprint = self._fingerprint(init_from)
        self.run_dir = paths.checkpoints / self.fingerprint[:16]  # this run's checkpoints
        self.metrics = MetricsCSV(paths.metrics)
        self.skipped = self.consecutive_nonfinite = 0
        self.window: list[float] = []  # losses of the steps since the last metrics row

    # ------------------------------------------------------------------ set-up helpers

    def _warm_start(self, path: Path) -> None:
        """Fine-tune from a trained stage directory (its EMA weights)."""
        source = load_stage(path)
        src, cfg = source.config, self.cfg
        checks = {  # what the weights mean: another value would train on their wrong reading
            "architecture (unet)": (src.unet, cfg.unet),
            "text width": (source.net.text_dim, self.stage.net.text_dim),
            "low-res input": (source.lowres is None, self.stage.lowres is None),
            "diffusion.objective": (src.diffusion.objective, cfg.diffusion.objective),
            "diffusion.schedule": (src.diffusion.schedule, cfg.diffusion.schedule),
        }
        differ = [name for name, (a, b) in checks.items() if a != b]
        if differ:
            raise ValueError(
                f"init_from {path}: its {', '.join(differ)} differ from stage "
                f"{self.stage.name!r} in params.yaml; a warm start continues the same model"
            )
        self.stage.net.load_state_dict(source.net.state_dict())
        log.info("warm start from %s", path)

    def _fingerprint(self, init_from: Path | None) -> str:
        """What a checkpoint must agree with to be resumed: the settings, the bytes of the
        prepared data and the embeddings, the warm start and the training code. A stage
        that DVC reruns because any of them changed starts afresh."""
        keys = {
            "stage": self.cfg.model_dump(
                mode="json",
                exclude={
                    "train": {
                        "checkpoint_every",
                        "keep_last",
                        "keep_runs",
                        "init_from",  # where the weights came from: their digest counts
                        "log_every",
                        "sample_every",
                        "device",
                    }
                },
            ),
            "text": self.settings.text.model_dump(mode="json"),
            "data": sha256_tree(self.paths.prepared),  # its split and pixels, not only its
            "cache": sha256_tree(self.paths.cache),  # source table and captions
            "init_from": _stage_digest(init_from) if init_from else None,
            "code": code_digest(TRAIN_CODE),
        }
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()

    # ----------------------------------------------------------------------- batches

    def _micro_batches(self, step: int) -> list[tuple[Batch, TrainingNoise]]:
        """This rank's micro-batches of the global batch of `step`, with their noise."""
        tc, world, rank = self.tcfg, self.dist.world_size, self.dist.rank
        indices = self.data.step_indices(tc.seed, step, tc.batch_size)
        per_rank = tc.batch_size // world
        micro = per_rank // tc.grad_accum
        offset = float(torch.rand((), generator=step_generator(tc.seed, step, "offset")))
        out = []
        for m in range(tc.grad_accum):
            start = rank * per_rank + m * micro
            positions = torch.arange(start, start + micro)
            gens = [step_generator(tc.seed, step, f"example/{int(p)}") for p in positions]
            batch = self.data.load(indices[start : start + micro], gens)
            if self.text_length is not None:
                batch = dataclasses.replace(batch, text=batch.text.padded(self.text_length))
            size = batch.images.shape[1:]
            noise = draw_noise(self.stage, gens, positions, tc.batch_size, offset, size)
            out.append((batch, noise))
        return out

    # -------------------------------------------------------------------------- loop

    def _optimize(self, step: int, micro: list[tuple[Batch, TrainingNoise]]) -> tuple[float, float]:
        """One optimizer step; returns (loss, grad norm), both NaN when the step is skipped."""
        tc = self.tcfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        torch.manual_seed(step_generator(tc.seed, step, f"rank/{self.dist.rank}").initial_seed())
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=use_bf16(tc.precision, self.device)
        )
        for m, (batch, noise) in enumerate(micro):
            batch, noise = batch.to(self.device, self.tcfg.channels_last), noise.to(self.device)
            last = m == len(micro) - 1
            sync = nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                with autocast:
                    loss = diffusion_loss(self.stage, self.model, batch, noise) / len(micro)
                loss.backward()
            total += loss.detach()
        if self.dist.enabled:  # the logged loss is the global batch's, as in one process
            torch.distributed.all_reduce(total)
            total /= self.dist.world_size
        norm = nn.utils.clip_grad_norm_(self.net.parameters(), tc.grad_clip)
        if not (torch.isfinite(norm) and torch.isfinite(total)):
            return self._skip(step)
        self.optimizer.step()
        self.ema.update(self.net, step)
        self.consecutive_nonfinite = 0
        return float(total), float(norm)

    def _skip(self, step: int) -> tuple[float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive_nonfinite += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row)",
            step,
            self.consecutive_nonfinite,
        )
        if self.consecutive_nonfinite >= self.tcfg.max_nonfinite:
            raise TrainingDivergedError(
                f"stage {self.stage.name}: {self.consecutive_nonfinite} consecutive non-finite "
                f"steps (train.max_nonfinite={self.tcfg.max_nonfinite}) at step {step}; the last "
                f"good checkpoint in {self.paths.checkpoints} is intact. Lower train.lr or "
                "use precision fp32"
            )
        return float("nan"), float("nan")

    def fit(self) -> TrainResult:
        """Train to `train.steps`, resuming from the newest matching checkpoint."""
        tc, main = self.tcfg, self.dist.is_main
        distributed.check_same(
            self.dist,
            self.fingerprint,
            "the run's fingerprint (code, data, settings)",
            hint="every node must run the same commit on the same prepared data and params",
        )
        start = self._resume()
        distributed.check_same(self.dist, start, "the step their checkpoints resume from")
        if start == 0 and tc.layout.steps and not self.warm_started:
            self._fit_layout()
        if main:  # each invocation is its own tracked run, a resumed one too
            env = {f"env.{k}": v for k, v in environment(self.device).items()}
            settings = flatten(self.cfg.model_dump(mode="json"))
            self.tracker.log_params(
                {"stage": self.stage.name, "resumed_from_step": start, **settings, **env}
            )
        bar = tqdm(
            total=tc.steps,
            initial=start,
            desc=f"train {self.stage.name}",
            unit="step",
            disable=not (self.progress and main),
            dynamic_ncols=True,
        )
        t_window, t_start, steps_run = time.perf_counter(), time.perf_counter(), 0
        loss = float("nan")
        steps = range(start, tc.steps)
        # On CUDA the next batches are built on background threads while the GPU computes.
        # On the CPU their tensor ops would compete with the step's OpenMP threads for the
        # same cores, which halves throughput (BENCHMARKS.md), so batches are built inline.
        workers = PREFETCH_WORKERS if self.device.type == "cuda" else 0
        batches = prefetch(self._micro_batches, steps, workers=workers)
        with closing(batches):  # an interrupted run stops its builders at once
            for step, micro in batches:
                loss, norm = self._optimize(step, micro)
                self.window.append(loss)
                steps_run += 1
                bar.update(1)
                done = step + 1
                if done % tc.log_every == 0 or done == tc.steps:
                    self._log(step, self.window, norm, time.perf_counter() - t_window, bar)
                    self.window, t_window = [], time.perf_counter()
                if main and (done % tc.checkpoint_every == 0 or done == tc.steps):
                    self._save_checkpoint(done)
                previews = main and self.tracker.enabled and tc.sample_every > 0
                if previews and (done % tc.sample_every == 0 or done == tc.steps):
                    self._preview(done)
        bar.close()
        seconds = time.perf_counter() - t_start
        if main:
            self._export()
        return TrainResult(
            tc.steps, loss, self.skipped, seconds, steps_run * tc.batch_size / max(seconds, 1e-9)
        )

    def _log(self, step: int, losses: list[float], norm: float, seconds: float, bar: tqdm) -> None:
        """One row for the window of `losses` that ends at `step`: its mean finite loss to
        metrics.csv and MLflow, images/s to MLflow and the bar only (the CSV is a DVC output
        and stays the same on identical reruns)."""
        finite = [v for v in losses if math.isfinite(v)]
        row = {
            "step": step + 1,
            "loss": float(np.mean(finite)) if finite else float("nan"),
            "lr": lr_at(step, self.tcfg),
            "grad_norm": norm,
            "skipped": self.skipped,
        }
        speed = len(losses) * self.tcfg.batch_size / seconds
        bar.set_postfix(  # no refresh: the bar's own interval decides when a line is written
            loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{speed:.0f}", refresh=False
        )
        if self.dist.is_main:
            self.metrics.append(row)
            logged = {k: v for k, v in row.items() if k != "step"}
            self.tracker.log_metrics({**logged, "images_per_s": speed}, step + 1)

    def _fit_layout(self) -> None:
        """Fit the layout head alone on its own loss (layout_loss, train.layout): its word-order
        plateau costs seconds of its own steps and minutes of U-Net steps (BENCHMARKS: the
        layout prior). Every rank runs the same batches from the same seed."""
        cfg, tc, head = self.tcfg.layout, self.tcfg, self.net.layout
        optimizer = torch.optim.AdamW(head.parameters(), cfg.lr)
        drop = self.cfg.diffusion.cond_drop_prob
        loss = torch.zeros(())
        for step in tqdm(
            range(cfg.steps),
            desc=f"layout {self.stage.name}",
            unit="step",
            disable=not (self.progress and self.dist.is_main),
            dynamic_ncols=True,
        ):
            gen = step_generator(tc.seed, step, "layout")
            indices = self.data.step_indices(tc.seed, step, cfg.batch_size)
            batch = self.data.load(indices, [gen] * len(indices)).to(self.device)
            keep = torch.rand(len(indices), generator=gen) >= drop  # as guidance trains it
            mask = batch.text.mask & keep.to(self.device)[:, None]
            loss = layout_loss(head(batch.text.tokens.float(), mask), batch.images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if self.dist.enabled:  # CUDA kernels need not agree bit for bit: rank 0's head wins
            for p in head.parameters():
                torch.distributed.broadcast(p.data, src=0)
        if self.dist.is_main:
            log.info("layout head fitted alone: %d steps, loss %.4f", cfg.steps, loss.item())

    def close(self) -> None:
        """Leave the process group (torchrun runs)."""
        distributed.cleanup(self.dist)

    # ------------------------------------------------------------------- persistence

    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "skipped": self.skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "history": self.metrics.rows,
            "window": list(self.window),  # losses since the last row: the next row's too
            "fingerprint": self.fingerprint,
            "threads": torch.get_num_threads(),
            "device": self.device.type,
        }

    def _save_checkpoint(self, step: int) -> None:
        weights = {"model": self.net.state_dict(), "ema": self.ema.state_dict()}
        path = save_checkpoint(
            self.run_dir, step, self.stage, weights, self._state(step), self.tcfg.keep_last
        )
        log.info("checkpoint %s", path)

    def _resume(self) -> int:
        """Continue from the newest valid checkpoint of this run's fingerprint, if any."""
        touch(self.run_dir)
        if self.dist.is_main:
            prune_runs(self.paths.checkpoints, self.run_dir.name, self.tcfg.keep_runs)
            remove_partial(self.run_dir)
        ckpt = latest_valid(self.run_dir)
        if ckpt is None or ckpt.state.get("fingerprint") != self.fingerprint:
            earlier = [p.name for p in self.paths.checkpoints.iterdir() if p != self.run_dir]
            if earlier:
                log.warning(
                    "stage %s: no checkpoint of this run (fingerprint %s; data or settings "
                    "differ from the earlier runs %s); starting afresh",
                    self.stage.name,
                    self.run_dir.name,
                    ", ".join(sorted(earlier)),
                )
            return 0
        self.net.load_state_dict(ckpt.weights["model"])
        self.ema.load_state_dict(ckpt.weights["ema"])
        state = ckpt.state
        written_on = state.get("device", self.device.type)  # older checkpoints: unrecorded
        if written_on != self.device.type:
            log.warning(
                "stage %s: %s was written on %s, this process trains on %s: the devices' "
                "kernels round differently, so the resumed run's weights will differ from an "
                "uninterrupted run's (resume it on %s to continue it exactly)",
                self.stage.name,
                ckpt.path,
                written_on,
                self.device.type,
                written_on,
            )
        threads = state.get("threads", torch.get_num_threads())
        if written_on == self.device.type == "cpu" and threads != torch.get_num_threads():
            log.warning(
                "stage %s: %s was written with %d threads, this process runs %d: the resumed "
                "run's weights will differ from an uninterrupted run's in their last bits "
                "(set OMP_NUM_THREADS=%d to continue it exactly)",
                self.stage.name,
                ckpt.path,
                threads,
                torch.get_num_threads(),
                threads,
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped, self.consecutive_nonfinite = state["skipped"], state["consecutive_nonfinite"]
        self.metrics = MetricsCSV(self.paths.metrics, state["history"])
        self.window = list(state.get("window", []))
        log.info("resumed stage %s from %s (step %d)", self.stage.name, ckpt.path, state["step"])
        return int(state["step"])

    def _export(self) -> None:
        """The trained stage for sampling and the registry: config + raw and EMA weights.
        Weights with a non-finite value are never written: the stage fails instead."""
        weights = {"model": self.net.state_dict(), "ema": self.ema.state_dict()}
        bad = [
            f"{f}.{k}" for f, sd in weights.items() for k, v in sd.items() if not v.isfinite().all()
        ]
        if bad:
            raise TrainingDivergedError(
                f"stage {self.stage.name}: non-finite weights ({', '.join(bad[:3])}); nothing "
                f"exported to {self.paths.out}. Lower train.lr or use precision fp32"
            )
        # Not the fingerprint: it names the code, and a refactor that trains the same
        # weights must give the same stage, digest and registered version
        self.stage.save(self.paths.out, weights, {"trained_steps": self.tcfg.steps})
        self.metrics.flush()
        self.metrics.write_chart(f"training: stage {self.stage.name}")
        log.info("stage %s written to %s", self.stage.name, self.paths.out)

    def _preview(self, step: int) -> None:
        """A labelled grid sampled with the EMA weights for a few validation captions."""
        if self.val is None:
            return
        net = copy.deepcopy(self.net).eval()
        net.load_state_dict(
            {k: v.to(net.state_dict()[k].dtype) for k, v in self.ema.params.items()}
        )
        stage = Stage(self.stage.name, self.cfg, net, self.stage.lowres)
        idx = self.val.records[:8]
        batch = self.val.load(idx)
        images = Cascade([stage], self.settings.text).sample(
            batch.text, self.settings.preview, lowres=batch.lowres
        )
        grid = make_grid(to_uint8(images), [self.captions[i] for i in idx])
        self.tracker.log_image(grid, f"samples/{self.stage.name}_step_{step:08d}.png")
