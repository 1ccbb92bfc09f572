"""The evaluate stage: sample the cascade for held-out prompts and measure the images.

1. sample the whole cascade for the held-out prompts: `eval.per_category` validation
   captions of each category where the data carries scene specs, else the first
   `eval.num_samples` (their embeddings come from the cache; the encoder never runs),
   timing each stage;
2. FID / KID against the same prompts' real images (features cached per data version),
   CLIP score where a CLIP model is configured, exact shapes alignment where the data
   carries scene specs;
3. a guidance sweep: alignment, KID and CLIP score for each `eval.guidance_sweep` value of
   `sample.guidance` (the paper's quality / alignment trade-off);
4. reports/scores.json (the headline numbers: DVC metrics), reports/metrics.json (every
   measurement and failure reason), reports/guidance_sweep.csv (DVC plots), and PNGs,
   a grid and a self-contained HTML report under artifacts/eval/.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagen_ops.cascade import Cascade
from imagen_ops.charts import chart_path, save_chart, sweep_chart
from imagen_ops.config import EvalConfig, SampleConfig, TextConfig
from imagen_ops.data.prepare import PreparedData
from imagen_ops.device import resolve_device
from imagen_ops.eval.alignment import CATEGORIES, Judgement, alignment_report, judge_all
from imagen_ops.eval.fid import InceptionFeatures, cached_features, fid_kid
from imagen_ops.eval.ranking import auc, spearman
from imagen_ops.eval.report import write_report
from imagen_ops.files import atomic_dir, write_json_atomic, write_text_atomic
from imagen_ops.images import from_uint8, make_grid, to_uint8
from imagen_ops.scorer import Scorer
from imagen_ops.text.cache import EmbeddingCache
from imagen_ops.text.encoders import TextEmbeddings

__all__ = [
    "EvalPaths",
    "HeldOut",
    "SampleFn",
    "cascade_sampler",
    "evaluate",
    "held_out",
    "sample_images",
    "score_images",
]

log = logging.getLogger(__name__)
METRICS_VERSION = 2  # 2: alignment.balanced, failures, single_exact; balanced sampling


@dataclass(frozen=True)
class EvalPaths:
    out: Path  # artifacts/eval: images, grid, chart, report.html
    metrics: Path  # reports/metrics.json
    scores: Path  # reports/scores.json: the headline numbers (DVC metrics)
    sweep: Path  # reports/guidance_sweep.csv
    feature_cache: Path  # real-image Inception features, keyed by their pixels
    timings: Path  # reports/timings.json: seconds per image and stage (untracked)


@dataclass(frozen=True)
class HeldOut:
    """The held-out prompts evaluation samples for, with what scoring them needs."""

    records: np.ndarray  # indices into the prepared table
    captions: list[str]
    scenes: list[str | None]  # JSON scene specs (synthetic data), else None
    text: TextEmbeddings  # cached encoder embeddings of the captions
    prepared: PreparedData  # their real images, and the data version
    scorer_text: TextEmbeddings | None = None  # the same at the scorer's layer

    def real_images(self, resolution: int) -> np.ndarray:
        return self.prepared.images(resolution)[self.records]

    @property
    def digest(self) -> str:
        """sha256 of the data version, the records and their captions: the eval set's id."""
        spec = [self.prepared.manifest["source_table_sha256"], self.records.tolist(), self.captions]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


SampleFn = Callable[..., tuple[np.ndarray, dict]]
"""(embeddings, settings, seeds, scorer_text=None) -> (uint8 images, seconds per image in
each stage); `scorer_text` (the embeddings at the scorer's layer) is given for best of N."""


def held_out(
    prepared_dir: Path,
    cache_dir: Path,
    text: TextConfig,
    cfg: EvalConfig,
    scorer_layer: int | None = None,
) -> HeldOut:
    """The validation records evaluation samples for, with their cached embeddings (and at
    `scorer_layer`, the scorer's, when given): the first `eval.per_category` of each prompt
    category where the data has scene specs (every category weighs the same whatever the
    data's mix), else the first `eval.num_samples`."""
    prepared = PreparedData.open(prepared_dir)
    table = prepared.table
    cache = EmbeddingCache.open(cache_dir, text, table["caption"].tolist())
    val = prepared.indices("val")
    if len(val) == 0:
        raise ValueError("the validation split is empty; raise data.prepare.val_fraction")
    scenes = table["scene"].iloc[val]
    num, per_category = cfg.num_samples, cfg.per_category
    if per_category and all(isinstance(s, str) for s in scenes):
        category = np.array([json.loads(s)["category"] for s in scenes])
        chosen = [val[category == c][:per_category] for c in CATEGORIES]
        # interleaved (single, binding, counting, position, single, ...), so the grid and
        # the sweep's first prompts cover every category too
        rank = np.concatenate([np.arange(len(ids)) for ids in chosen])
        kind = np.concatenate([np.full(len(ids), k) for k, ids in enumerate(chosen)])
        records = np.concatenate(chosen)[np.lexsort((kind, rank))]
        for c in CATEGORIES:
            if (found := int((category == c).sum())) < per_category:
                log.warning(
                    "only %d validation prompts of category %s (eval.per_category=%d); raise "
                    "data.prepare.val_fraction",
                    found,
                    c,
                    per_category,
                )
    else:
        records = val[:num]
        if len(records) < num:
            log.warning("only %d validation prompts (eval.num_samples=%d)", len(records), num)
    return HeldOut(
        records,
        table["caption"].iloc[records].tolist(),
        [s if isinstance(s, str) else None for s in table["scene"].iloc[records]],
        cache.lookup(records),
        prepared,
        None if scorer_layer is None else cache.lookup(records, scorer_layer),
    )


def cascade_sampler(cascade: Cascade, progress: bool = True) -> SampleFn:
    """The SampleFn of a cascade (batched by `settings.batch_size`)."""

    def sample_fn(text, settings, seeds, scorer_text=None):
        return sample_images(cascade, text, settings, seeds, progress, scorer_text)

    return sample_fn


def sample_images(
    cascade: Cascade,
    text: TextEmbeddings,
    settings: SampleConfig,
    seeds: Sequence[int],
    progress: bool = True,
    scorer_text: TextEmbeddings | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """uint8 images for every embedding row, and seconds per image spent in each stage."""
    spent = dict.fromkeys((s.name for s in cascade.stages), 0.0)
    marks: list[tuple[str, float]] = []

    def on_step(stage: str, i: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i == 0:
            marks.append((stage, time.perf_counter()))

    out = cascade.sample(
        text, settings, seeds, scorer_text=scorer_text, callback=on_step, progress=progress
    )
    marks.append(("end", time.perf_counter()))
    for (stage, t0), (_, t1) in itertools.pairwise(marks):
        spent[stage] += t1 - t0
    return to_uint8(out), {k: v / len(text) for k, v in spent.items()}


def score_images(
    images: np.ndarray,
    captions: Sequence[str],
    scenes: Sequence[str | None],
    real_features: torch.Tensor | None,
    extractor: InceptionFeatures | None,
    cfg: EvalConfig,
    *,
    with_fid: bool,
    device: torch.device,
    text: TextEmbeddings | None = None,
    scorer: Scorer | None = None,
    judged: Sequence[Judgement] | None = None,
    features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Every metric of one set of generated images (None, with a reason, where unavailable).

    With a `scorer` (and the captions' `text` embeddings at its layer): the in-domain CLIP
    score, and where the exact oracle judges the images, how well the scorer's cosine
    separates correct from incorrect images (AUC) and ranks them (Spearman). `judged`: the
    oracle's verdicts when the caller already has them (`judge_scenes`), `features` the
    images' Inception features likewise."""
    metrics: dict[str, Any] = {"num_images": len(images)}
    if extractor is not None and real_features is not None:
        if features is None:
            features = extractor(images)
        metrics.update(fid_kid(real_features, features, with_fid=with_fid))
    else:
        metrics.update(dict.fromkeys(("fid", "kid_mean", "kid_std")))
        metrics["fid_reason"] = "eval.fid is false"
    if cfg.clip_model:
        from imagen_ops.eval.clip_score import clip_score

        metrics["clip_score"] = clip_score(images, captions, cfg.clip_model, device)
        metrics["clip_model"] = cfg.clip_model
    else:
        metrics["clip_score"] = None
        metrics["clip_score_reason"] = "no CLIP model configured (eval.clip_model)"
    if judged is None:
        judged = judge_scenes(images, scenes)
    if judged is not None:
        specs = [json.loads(s) for s in scenes]
        metrics["alignment"] = alignment_report(list(images), specs, judged)
    else:
        metrics["alignment"] = None
        metrics["alignment_reason"] = "the data carries no scene specs (not synthetic shapes)"
    if scorer is not None and text is not None:
        cosine = scorer_cosines(scorer, images, text, device)
        metrics["in_domain_clip_score"] = float(100 * np.clip(cosine, 0, None).mean())
        if judged is not None:
            correct = np.array([j.correct for j in judged])
            metrics["scorer_validation"] = {
                "auc": auc(cosine, correct),
                "spearman": spearman(cosine, correct),
            }
    else:
        metrics["in_domain_clip_score"] = None
        metrics["in_domain_clip_score_reason"] = "no scorer (stage train_scorer)"
    return metrics


def judge_scenes(images: np.ndarray, scenes: Sequence[str | None]) -> list[Judgement] | None:
    """The exact oracle's verdict on each image; None when the data has no scene specs."""
    if any(s is None for s in scenes):
        return None
    return judge_all(list(images), [json.loads(s) for s in scenes])


@torch.no_grad()
def scorer_cosines(
    scorer: Scorer,
    images: np.ndarray,
    text: TextEmbeddings,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """The scorer's cosine of each uint8 image with its caption."""
    scorer = scorer.to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = from_uint8(images[start : start + batch_size]).to(device)
        t = text[start : start + batch_size].to(device)
        out.append(scorer.similarity(x, t).cpu())
    return torch.cat(out).numpy()


def evaluate(
    cfg: EvalConfig,
    settings: SampleConfig,
    sample_fn: SampleFn,
    prompts: HeldOut,
    paths: EvalPaths,
    *,
    stage_count: int,
    model_sha256: str,
    device: str = "auto",
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """Run the evaluate stage; returns the metrics written to `paths.metrics`.

    `model_sha256` (cascade.cascade_digest of the weights sample_fn uses) and the eval
    set's digest are recorded, so registration can refuse metrics of other weights.
    `scorer` (stage train_scorer) adds the in-domain CLIP score; `prompts` must then carry
    their embeddings at its layer (`held_out(..., scorer_layer=scorer.text_layer)`)."""
    if scorer is not None and prompts.scorer_text is None:
        raise ValueError(
            "a scorer reads the prompts at its own layer: build them with "
            "held_out(..., scorer_layer=scorer.text_layer)"
        )
    dev = resolve_device(device)
    n = len(prompts.records)
    seeds = [settings.seed + k for k in range(n)]
    rerank, settings = settings.rerank, settings.plain()
    images, seconds = sample_fn(prompts.text, settings, seeds)
    resolution = images.shape[1]
    extractor = InceptionFeatures(device=dev, batch_size=cfg.fid_batch_size) if cfg.fid else None
    real = None
    if extractor is not None:
        real = cached_features(paths.feature_cache, prompts.real_images(resolution), extractor)

    def score(sampled: np.ndarray, **kw: Any) -> dict:
        """score_images for images of the first len(sampled) held-out prompts."""
        k = len(sampled)
        return score_images(
            sampled,
            prompts.captions[:k],
            prompts.scenes[:k],
            None if real is None else real[:k],
            extractor,
            cfg,
            device=dev,
            text=None if prompts.scorer_text is None else prompts.scorer_text[:k],
            scorer=scorer,
            **kw,
        )

    judged = judge_scenes(images, prompts.scenes)  # the metrics' and the grid's verdicts
    # the headline's features, computed once: the sweep's point at its settings reuses them
    features = None if extractor is None else extractor(images)
    metrics = score(images, judged=judged, features=features, with_fid=True)

    sweep = []
    n_sweep = min(cfg.sweep_samples, n)
    for weight in cfg.guidance_sweep:
        point_settings = settings.updated(guidance=weight)
        if point_settings == settings:  # the headline's own images, not sampled twice
            swept, kw = images[:n_sweep], {"judged": None if judged is None else judged[:n_sweep]}
            kw["features"] = None if features is None else features[:n_sweep]
        else:
            swept, _ = sample_fn(prompts.text[:n_sweep], point_settings, seeds[:n_sweep])
            kw = {}
        point = score(swept, with_fid=False, **kw)
        sweep.append(_sweep_row(point_settings, stage_count, swept, point))

    if rerank > 1 and scorer is not None:  # best of N, beside the plain numbers
        reranked, _ = sample_fn(
            prompts.text, settings.updated(rerank=rerank), seeds, scorer_text=prompts.scorer_text
        )
        point = score(reranked, with_fid=False)
        keys = ("kid_mean", "kid_std", "in_domain_clip_score", "alignment")
        metrics["reranked"] = {"rerank": rerank, **{k: point.get(k) for k in keys}}

    result = {
        "version": METRICS_VERSION,
        "model_sha256": model_sha256,
        "scorer_sha256": None if scorer is None else scorer.sha256,
        "eval_set_sha256": prompts.digest,
        "resolution": resolution,
        **metrics,
        "sampling": settings.record(stage_count),
    }
    verdicts = None if judged is None else [j.failure or "pass" for j in judged]
    _write_outputs(paths, result, sweep, images, verdicts, prompts, cfg)
    write_json_atomic(paths.timings, {"seconds_per_image": seconds, "device": str(dev)})
    return result


SCORES = ("fid", "kid_mean", "clip_score", "in_domain_clip_score")
ALIGNMENT_SCORES = ("balanced", "overall", "single", "counting", "binding", "position")


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reviewer compares across runs, rounded (reports/scores.json), nested
    as in metrics.json: `dvc metrics show`, MLflow and the flow's table all name the
    balanced alignment `alignment.balanced`."""

    def rounded(value: Any) -> Any:
        return round(value, 4) if isinstance(value, float) else value

    alignment = metrics.get("alignment") or {}
    return {
        "alignment": {k: rounded(alignment.get(k)) for k in ALIGNMENT_SCORES},
        **{k: rounded(metrics.get(k)) for k in SCORES},
    }


def _sweep_row(
    settings: SampleConfig, stage_count: int, images: Any, point: dict[str, Any]
) -> dict[str, Any]:
    """One sweep point: `guidance` is the base stage's weight (the plots' x axis),
    `guidance_stages` every stage's, `n` the prompts it scored (`eval.sweep_samples`: the
    first n of the headline's, which is why its numbers differ from the headline's)."""
    alignment = point.get("alignment") or {}
    weights = settings.per_stage("guidance", stage_count)
    return {
        "guidance": weights[0],
        "guidance_stages": " ".join(f"{w:g}" for w in weights),
        "n": len(images),
        "alignment.balanced": alignment.get("balanced"),
        "kid_mean": point.get("kid_mean"),
        "kid_std": point.get("kid_std"),
        "clip_score": point.get("clip_score"),
        "in_domain_clip_score": point.get("in_domain_clip_score"),
    }


def _write_outputs(
    paths: EvalPaths,
    result: dict[str, Any],
    sweep: list[dict[str, Any]],
    images: np.ndarray,
    verdicts: list[str] | None,
    prompts: HeldOut,
    cfg: EvalConfig,
) -> None:
    """Samples, grid (marked "pass" or the failure reason where judged), report, sweep
    table and chart, metrics and scores."""
    g = cfg.grid_size
    marks = None if verdicts is None else verdicts[:g]
    grid = make_grid(images[:g], prompts.captions[:g], verdicts=marks)
    chart = sweep_chart(sweep)  # empty axes without a sweep: DVC's plot file always exists
    with atomic_dir(paths.out) as tmp:
        (tmp / "samples").mkdir()
        for k, image in enumerate(images):
            Image.fromarray(image).save(tmp / "samples" / f"{k:04d}.png")
        grid.save(tmp / "grid.png")
        write_report(tmp, result, sweep, grid, chart)
    columns = list(sweep[0]) if sweep else ["guidance"]
    lines = [",".join(columns)] + [
        ",".join("" if r[c] is None else f"{r[c]}" for c in columns) for r in sweep
    ]
    write_text_atomic(paths.sweep, "\n".join(lines) + "\n")
    save_chart(chart, chart_path(paths.sweep))  # DVC's image plot of the sweep (offline)
    write_json_atomic(paths.metrics, result)
    write_json_atomic(paths.scores, headline(result))
    log.info("metrics: %s", json.dumps({k: result.get(k) for k in ("fid", "kid_mean")}))
