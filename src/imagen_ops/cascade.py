"""The cascade: a base stage and super-resolution stages, glued for training and sampling.

A stage is its network, its StageConfig and the width of the text embeddings it reads. It
is saved as `config.json` + safetensors and rebuilt from the JSON alone. `Cascade.sample`
is a short sequence: validate, encode the text once, run each stage on the previous
stage's output, return the final images.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from imagen_ops.config import SEED, SampleConfig, StageConfig, StageSampling, TextConfig
from imagen_ops.device import use_bf16
from imagen_ops.diffusion.guidance import (
    CondDenoiser,
    Conditioning,
    classifier_free_guidance,
    guides,
    keep_known,
    thresholded,
)
from imagen_ops.diffusion.objectives import to_x0
from imagen_ops.diffusion.samplers import NoiseSource, evaluated_times, sample
from imagen_ops.diffusion.schedules import Schedule, alpha_sigma, make_schedule, time_grid
from imagen_ops.files import atomic_dir, sha256_files
from imagen_ops.models.unet import UNet
from imagen_ops.scorer import Scorer, load_scorer
from imagen_ops.text.encoders import TextEmbeddings, TextEncoder

__all__ = [
    "Cascade",
    "Stage",
    "StepCallback",
    "augment_lowres",
    "cascade_digest",
    "check_prompt",
    "denoising_steps",
    "image_roles",
    "load_stage",
]

log = logging.getLogger(__name__)
STAGE_FORMAT = 1
CASCADE_FILE = "cascade.json"
SCORER_DIR = "scorer"  # a packaged cascade's scorer, beside the stage folders
StepCallback = Callable[[str, int, float, Tensor, Tensor], None]
"""(stage name, step index, t, x_t, x0 prediction), called at every denoising step."""


MAX_PROMPT_CHARS = 2000


def check_prompt(prompt: Any) -> str:
    """The stripped prompt, or a ValueError saying what is wrong with it: the caption
    checks of ingestion (text, not empty, no control characters, bounded length)."""
    from imagen_ops.data.ingest import Rejected, check_caption

    try:
        return check_caption(prompt, MAX_PROMPT_CHARS, "the longest prompt")
    except Rejected as err:
        raise ValueError(err.detail) from None


def augment_lowres(
    lowres: Tensor, size: int, t_aug: Tensor, schedule: Schedule, noise: Tensor
) -> tuple[Tensor, Tensor]:
    """Noise-conditioning augmentation (Saharia et al. 2022, section 2.5; Ho et al. 2021).

    Upsample the low-res image to `size`, then diffuse it to level t_aug with the stage's
    schedule. Returns the augmented image and its log-SNR, which the network also sees.
    The same function serves training (random t_aug) and sampling (a fixed level).
    """
    up = F.interpolate(lowres, size=(size, size), mode="bilinear", align_corners=False)
    logsnr = schedule(t_aug)
    alpha, sigma = alpha_sigma(logsnr, like=up)
    return alpha * up + sigma * noise, logsnr


@dataclass
class Stage:
    """One trained (or training) cascade stage."""

    name: str
    config: StageConfig
    net: UNet
    lowres: int | None  # resolution of the conditioning image; None for the base stage

    @classmethod
    def build(cls, name: str, config: StageConfig, text_dim: int, lowres: int | None) -> Stage:
        net = UNet(
            config.unet,
            text_dim=text_dim,
            super_resolution=lowres is not None,
            objective=config.diffusion.objective,
        )
        return cls(name, config, net, lowres)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def schedule(self) -> Schedule:
        return make_schedule(self.config.diffusion, self.resolution)

    def denoiser(self, bf16: bool = False) -> CondDenoiser:
        """(x_t, t, cond) -> x0 through the network and the stage's objective.

        `bf16` runs the network under bfloat16 autocast; the sampler's state and the x0
        conversion stay in float32."""
        schedule, objective = self.schedule, self.config.diffusion.objective

        def denoise(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            if x.shape[0] == 1:  # oneDNN convolves one image with other kernels than a
                # batch, whose sums round differently: as two, a seed's image is the same
                # at every batch size, bit for bit
                return denoise(torch.cat([x, x]), t, cond.repeat2(cond))[:1]
            logsnr = schedule(t).expand(x.shape[0]).to(x.device)
            alpha, sigma = alpha_sigma(logsnr, like=x)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = self.net(
                    x,
                    logsnr,
                    cond.text,
                    cond.mask,
                    cond.lowres,
                    cond.aug_logsnr,
                    layout_key=cond.layout_key,
                )
            return to_x0(out.float(), x, alpha, sigma, objective)

        return denoise

    def config_dict(self) -> dict[str, Any]:
        return {
            "format": STAGE_FORMAT,
            "name": self.name,
            "stage": self.config.model_dump(mode="json"),
            "text_dim": self.net.text_dim,
            "lowres": self.lowres,
        }

    def write(
        self,
        directory: Path,
        weights: dict[str, dict[str, Tensor]],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write config.json and one `<name>.safetensors` per entry of `weights` into a folder."""
        for fname, state in weights.items():
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state.items()},
                str(directory / f"{fname}.safetensors"),
            )
        config = {**self.config_dict(), **(extra or {})}
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    def save(
        self,
        path: str | Path,
        weights: dict[str, dict[str, Tensor]],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """`write` into `path`, replacing it atomically."""
        with atomic_dir(path) as tmp:
            self.write(tmp, weights, extra)


def load_stage(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> Stage:
    """Rebuild a stage from its directory: config.json alone defines the network."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a stage directory (no config.json)")
    cfg = json.loads(config_path.read_text())
    if cfg.get("format") != STAGE_FORMAT:
        raise ValueError(
            f"{config_path}: stage format {cfg.get('format')}, expected {STAGE_FORMAT}"
        )
    stage = Stage.build(
        cfg["name"], StageConfig.model_validate(cfg["stage"]), cfg["text_dim"], cfg["lowres"]
    )
    weights_path = path / f"{weights}.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    stage.net.load_state_dict(load_file(str(weights_path)))
    stage.net.to(device).eval().requires_grad_(False)
    return stage


def cascade_digest(root: str | Path, stage_names: Sequence[str], weights: str = "ema") -> str:
    """sha256 over each stage's config.json and weights, in cascade order: the identity of
    a trained cascade, which metrics carry so they cannot be attached to other weights."""
    files = {}
    for name in stage_names:
        for fname in ("config.json", f"{weights}.safetensors"):
            path = Path(root) / name / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (stage {name!r} not trained?)")
            files[f"{name}/{fname}"] = path
    return sha256_files(files)


class Cascade:
    """Stages in order of resolution, and the text encoder that conditions them all."""

    def __init__(self, stages: Sequence[Stage], text: TextConfig, scorer: Scorer | None = None):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for prev, nxt in itertools.pairwise(stages):
            if nxt.lowres != prev.resolution:
                raise ValueError(
                    f"stage {nxt.name} conditions on {nxt.lowres} px, "
                    f"but {prev.name} makes {prev.resolution} px"
                )
        self.stages, self.text, self.scorer = list(stages), text, scorer
        self._encoder: TextEncoder | None = None

    @classmethod
    def from_dir(
        cls,
        root: str | Path,
        stage_names: Sequence[str] | None = None,
        text: TextConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> Cascade:
        """Load `root/<stage>/` for each stage. The order and the text encoder come from
        `root/cascade.json` when present (a packaged model), else from the arguments; a
        scorer packaged in `root/scorer/` comes along (best-of-N reranking)."""
        root = Path(root)
        manifest = root / CASCADE_FILE
        if manifest.is_file():
            spec = json.loads(manifest.read_text())
            stage_names, text = spec["stages"], TextConfig.model_validate(spec["text"])
        if stage_names is None or text is None:
            raise FileNotFoundError(
                f"{root} has no {CASCADE_FILE}; give the stage order and "
                "the text encoder (params.yaml)"
            )
        stages = [load_stage(root / name, device=device) for name in stage_names]
        scorer = None
        if (root / SCORER_DIR / "config.json").is_file():
            scorer = load_scorer(root / SCORER_DIR, device, cache_layer=text.layer)
        return cls(stages, text, scorer)

    def write_manifest(self, root: str | Path, **extra: Any) -> None:
        """`cascade.json`: the stage order and the text encoder (and `extra` sections, such
        as a packaged model's sampling defaults), beside the stage folders."""
        spec = {
            "stages": [s.name for s in self.stages],
            "text": self.text.model_dump(mode="json"),
            **extra,
        }
        (Path(root) / CASCADE_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))

    @property
    def device(self) -> torch.device:
        return next(self.stages[0].net.parameters()).device

    def encode(self, prompts: Sequence[str], layer: int | None = None) -> TextEmbeddings:
        """Embed prompts with the cascade's frozen encoder (loaded on first use) at `layer`
        (default text.layer; the scorer reads its own), rounded as the embedding cache
        stores them, so a prompt gets the embedding it trained on."""
        checked = []
        for k, prompt in enumerate(prompts):
            try:
                checked.append(check_prompt(prompt))
            except ValueError as err:
                raise ValueError(f"prompt {k + 1}: {err}") from None
        return self._text_encoder().encode(checked, layer).as_stored()

    def _text_encoder(self) -> TextEncoder:
        """The frozen encoder, loaded on first use."""
        if self._encoder is None:
            from imagen_ops.text.encoders import load_text_encoder

            self._encoder = load_text_encoder(self.text)
        return self._encoder

    def work(
        self,
        settings: SampleConfig,
        n: int,
        *,
        widths: Sequence[int] | None = None,
        from_image: bool = False,
        lowres_size: int | None = None,
    ) -> float:
        """Pixel-steps of a `sample` call for `n` images (image-to-image / inpainting with
        `from_image`, super-resolution of a `lowres_size` image): over the stages it runs,
        the network's passes x pixels, two passes at the steps guidance runs (the serving
        budget's unit). Prompts of one padded width (`widths`, from `Cascade.widths`; by
        default one width for all) are batched together, and a batch of one is two passes
        where guidance does not run (Stage.denoiser)."""
        runs = self._runs(settings, from_image, lowres_size)
        if widths is not None and len(widths) != n:
            raise ValueError(f"{len(widths)} widths for {n} prompts")
        groups = list(Counter(widths).values()) if widths is not None else [n]
        size, interval = settings.batch_size, settings.guidance_interval

        def pixel_steps(stage: Stage, plan: StageSampling, ts: list[float], repeat: int) -> int:
            together = [g * repeat for g in groups]
            batches = [min(size, r - s) for r in together for s in range(0, r, size)]
            rows, lone = sum(batches), batches.count(1)
            guided = [guides(plan.guidance, interval, t) for t in evaluated_times(ts)]
            return stage.resolution**2 * sum(rows * (1 + g) + lone * (not g) for g in guided)

        work = sum(pixel_steps(*run, 1) for run in runs)
        if settings.rerank > 1:  # best of N: N candidates through the first stage
            work += pixel_steps(*runs[0], settings.rerank)
        return float(work)

    def widths(self, prompts: Sequence[str]) -> list[int]:
        """The prompts' padded widths (TextEncoder.widths), which batch them when sampled."""
        return self._text_encoder().widths(prompts)

    def _runs(
        self, settings: SampleConfig, from_image: bool, lowres_size: int | None
    ) -> list[tuple[Stage, StageSampling, list[float]]]:
        """(stage, its settings, the time grid it runs) for each stage a call runs: all, or
        for super-resolution those from the first one that conditions on the image's size
        (else from the first super-resolution stage); image-to-image runs the last
        `strength` of each stage's steps."""
        plan = settings.resolve(len(self.stages))
        strength = settings.strength if from_image else 1.0
        first = 0
        if lowres_size is not None:
            sr = [i for i, stage in enumerate(self.stages) if stage.lowres is not None]
            if not sr:
                raise ValueError("this cascade has no super-resolution stage to take an image")
            first = next((i for i in sr if self.stages[i].lowres == lowres_size), sr[0])
        runs = []
        for stage, sampling in zip(self.stages[first:], plan[first:], strict=True):
            steps = denoising_steps(sampling.steps, strength)
            grid = time_grid(sampling.steps, stage.schedule, settings.spacing)[-steps - 1 :]
            runs.append((stage, sampling, grid))
        return runs

    @torch.no_grad()
    def sample(
        self,
        text: TextEmbeddings | str | Sequence[str],
        settings: SampleConfig,
        seeds: Sequence[int] | None = None,
        *,
        image: Tensor | None = None,
        mask: Tensor | None = None,
        lowres: Tensor | None = None,
        scorer_text: TextEmbeddings | None = None,
        callback: StepCallback | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) at the last stage's resolution.

        - `image` (1 or B, 3, H, W) in [-1, 1], any size: image-to-image. Every stage starts
          from the image (resized to it), noised to the time where the last `strength` of
          each stage's steps start (`denoising_steps`), not from noise.
        - `mask` (1 or B, 1, H, W) with `image`: inpainting. Pixels where the mask is > 0.5
          are generated, the others keep the image's pixels (exactly, at the last stage).
        - `lowres` (1 or B, 3, H, W): super-resolve a user image: the cascade starts at the
          first stage that conditions on an image, with `lowres` resized to its input.
        - `scorer_text`: for best of N when `text` is embeddings, the prompts' embeddings at
          the scorer's layer (`text.scorer_layer`) where it is not text.layer.
        Image k uses seed `seeds[k]` (default `settings.seed + k`) whatever batch it is in;
        up to `settings.batch_size` prompts of one padded width go through the network at a
        time, so an image does not depend on the other prompts.
        """
        # 1. validate and encode the text once
        prompts = None
        if not isinstance(text, TextEmbeddings):
            prompts = [text] if isinstance(text, str) else list(text)  # one prompt, or several
            if not prompts:
                raise ValueError("no prompts: pass a prompt or a list of them")
            text = self.encode(prompts)
        n = len(text)
        seeds = checked_seeds(seeds) if seeds is not None else [settings.seed + k for k in range(n)]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        negative = None
        if settings.negative_prompt is not None:
            negative = self.encode([settings.negative_prompt]).to(self.device)
        image, mask, lowres = (_batch_of(name, t, n) for name, t in _inputs(image, mask, lowres))
        runs = self._runs(settings, image is not None, None if lowres is None else lowres.shape[-1])
        if lowres is not None:  # a user image of any size: resized to the stage's input
            lowres = _resized(lowres, runs[0][0].lowres)
        rerank = settings.rerank
        if rerank > 1:
            scorer_text = self._scorer_text(rerank, text, prompts, scorer_text)
        per_stage = [len(ts) - 1 for *_, ts in runs]
        steps = sum(per_stage) + (rerank * per_stage[0] if rerank > 1 else 0)
        bar = tqdm(total=n * steps, desc="sample", unit="img-step", disable=not progress)

        def on_step(name: str, j: int, t: float, x: Tensor, x0: Tensor) -> None:
            bar.update(len(x))
            if callback is not None:
                callback(name, j, t, x, x0)

        def through(runs, text, seeds, inputs) -> Tensor:
            """Batches of images, each through `runs`. A batch holds prompts of one padded
            width (TextEmbeddings.widths), so no image's shapes depend on the other prompts."""
            out: list[Tensor | None] = [None] * len(text)
            widths = text.widths()
            for width in sorted(set(widths)):
                group = [k for k, w in enumerate(widths) if w == width]
                for start in range(0, len(group), settings.batch_size):
                    rows = group[start : start + settings.batch_size]
                    images = self._sample_batch(
                        text[torch.tensor(rows)].fitted(width).to(self.device),
                        negative,
                        [seeds[k] for k in rows],
                        *(None if t is None else t[rows].to(self.device) for t in inputs),
                        settings=settings,
                        runs=runs,
                        callback=on_step,
                    )
                    for k, image in zip(rows, images, strict=True):
                        out[k] = image
            return torch.stack(out)

        inputs = (image, mask, lowres)
        if rerank > 1:  # 2. best of N: candidates through the first stage, scored
            pick = torch.arange(n).repeat_interleave(rerank)
            candidates = [candidate_seed(seeds[k], j) for k in range(n) for j in range(rerank)]
            first = through(
                runs[:1], text[pick], candidates, [None if t is None else t[pick] for t in inputs]
            )
            best = candidate_scores(self.scorer, first, scorer_text, rerank).argmax(1)
            seeds = [candidates[k * rerank + int(j)] for k, j in enumerate(best)]
        # 3. batches of images, each through the stages
        images = through(runs, text, seeds, inputs)
        bar.close()
        return images

    def _scorer_text(
        self,
        rerank: int,
        text: TextEmbeddings,
        prompts: list[str] | None,
        scorer_text: TextEmbeddings | None,
    ) -> TextEmbeddings:
        """The prompts' embeddings at the scorer's layer, which best of N scores with."""
        if self.scorer is None:
            raise ValueError(
                f"sample.rerank={rerank} needs the cascade's scorer (stage train_scorer; a "
                "registered model carries it): none is loaded"
            )
        layer = self.scorer.text_layer
        if scorer_text is not None:
            if len(scorer_text) != len(text):
                raise ValueError(f"{len(scorer_text)} scorer embeddings for {len(text)} prompts")
            return scorer_text
        if layer == self.text.layer:
            return text
        if prompts is None:
            raise ValueError(
                f"best of N reads the prompts at the scorer's layer {layer} (text.scorer_layer), "
                f"not text.layer {self.text.layer}: pass the prompts as text, or their "
                "embeddings at that layer as `scorer_text`"
            )
        return self.encode(prompts, layer)

    def _sample_batch(
        self,
        text: TextEmbeddings,
        negative: TextEmbeddings | None,
        seeds: Sequence[int],
        image: Tensor | None,
        mask: Tensor | None,
        x: Tensor | None,
        *,
        settings: SampleConfig,
        runs: list[tuple[Stage, StageSampling, list[float]]],
        callback: StepCallback,
    ) -> Tensor:
        """One batch through the stages of `runs`; `x` is the low-res input of the first."""
        n, noise = len(text), NoiseSource(seeds, self.device)
        bf16 = use_bf16(settings.precision, self.device)
        for stage, plan, ts in runs:
            size = (3, stage.resolution, stage.resolution)
            known = None if image is None else _resized(image, stage.resolution)
            generated = None if mask is None else _generated(mask, stage.resolution)
            cond = Conditioning(
                text.tokens,
                text.mask,
                layout_key=_layout_key(stage, text, seeds, known, generated),
            )
            if stage.lowres is not None:
                t_aug = torch.full((n,), float(plan.aug_level), device=self.device)
                up, aug_logsnr = augment_lowres(  # in [-1, 1], as the stage was trained
                    x.clamp(-1, 1), stage.resolution, t_aug, stage.schedule, noise(size)
                )
                cond = replace(cond, lowres=up, aug_logsnr=aug_logsnr)
            uncond = None
            if negative is not None:
                uncond = cond.with_text(
                    negative.tokens.expand(n, -1, -1), negative.mask.expand(n, -1)
                )
            denoise = thresholded(
                classifier_free_guidance(
                    stage.denoiser(bf16),
                    cond,
                    plan.guidance,
                    uncond,
                    settings.guidance_interval,
                ),
                settings.thresholding,
                settings.quantile,
            )
            x = noise(size)
            if known is not None:  # image-to-image: the image noised to where `ts` starts
                t0 = torch.tensor(ts[0], device=known.device)
                alpha, sigma = alpha_sigma(stage.schedule(t0), like=known)
                x = alpha * known + sigma * x
                if generated is not None:
                    denoise = keep_known(denoise, known, generated)
            x = sample(
                settings.sampler,
                denoise,
                x,
                ts,
                stage.schedule,
                noise=noise,
                eta=settings.eta,
                callback=lambda j, t, xt, x0, name=stage.name: callback(name, j, t, xt, x0),
            )
        return x.clamp(-1, 1)


LAYOUT_STREAM = 1
"""spawn key of the generator that draws a seed's layout mode (`layout_condition: mode`)."""


def _layout_key(
    stage: Stage,
    text: TextEmbeddings,
    seeds: Sequence[int],
    known: Tensor | None,
    generated: Tensor | None,
) -> Tensor | None:
    """What a `layout_condition: mode` stage conditions on (UNet.forward's `layout_key`): for
    image-to-image the input image at the stage's size (`known`, the x0 it stands for), else
    each seed's mode drawn from the caption's weights (inpainting: given the pixels outside
    `generated`), by a uniform from a stream of its own, so no noise draw moves. Both halves
    of guidance read the same key, each taking its own nearest mode."""
    if stage.config.unet.layout_condition != "mode":
        return None
    if known is not None and generated is None:
        return known
    words = [_seed_word(int(s), (LAYOUT_STREAM,)) for s in seeds]
    u = torch.tensor([(w >> 11) / 2.0**53 for w in words], device=text.tokens.device)
    prior = stage.net.layout(text.tokens, text.mask)
    if known is not None and generated is not None:  # inpainting
        prior = prior.given(known, ~generated)
    return prior.drawn(u)


def _generated(mask: Tensor, size: int) -> Tensor:
    """Where inpainting draws at `size` px: the mask's area share there above one half."""
    return F.interpolate(mask, size=(size, size), mode="area") > 0.5


def candidate_scores(scorer: Scorer, images: Tensor, text: TextEmbeddings, n: int) -> Tensor:
    """The scorer's cosines (prompts, n) of each prompt's n candidates (`images`, prompt by
    prompt) with its caption (`text`, one row per prompt). A prompt's candidates are scored
    together in a call of their own, its text at its own width: no pick depends on the
    other prompts (best of N)."""
    widths = text.widths()

    def scores(k: int) -> Tensor:
        own = text[torch.full((n,), k)].fitted(widths[k]).to(images.device)
        return scorer.similarity(images[k * n : (k + 1) * n], own)

    return torch.stack([scores(k) for k in range(len(text))])


def checked_seeds(seeds: Sequence[Any]) -> list[int]:
    """`seeds` as Python ints, each a `Seed` (what params.yaml, the CLI and requests take):
    a float or a bool is refused, not rounded to another image's seed."""
    out = []
    for k, seed in enumerate(seeds):
        try:
            if isinstance(seed, bool):
                raise TypeError("a bool")
            out.append(SEED.validate_python(operator.index(seed)))
        except (TypeError, ValidationError) as err:
            detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else err
            raise ValueError(f"seed {k + 1} is {seed!r}: {detail}") from None
    return out


def candidate_seed(seed: int, j: int) -> int:
    """Seed of candidate j of a prompt with seed `seed` (best-of-N): candidate 0 is the
    prompt's own seed, so N = 1 is plain sampling; the others are derived, reproducibly."""
    if j == 0:
        return seed
    return _seed_word([seed, j]) >> 1


def _seed_word(entropy: int | list[int], spawn_key: tuple[int, ...] = ()) -> int:
    """A 64-bit word NumPy's SeedSequence derives from `entropy`: the one way a prompt's
    seed spawns another stream's, independent of the seed's own noise."""
    return int(np.random.SeedSequence(entropy, spawn_key=spawn_key).generate_state(1, np.uint64)[0])


def image_roles(
    image: Tensor | None, mask: Tensor | None, strength: float | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(image, mask, lowres) for `Cascade.sample` from a user's image: with a mask it is
    inpainted, with a strength it starts image-to-image, alone it is super-resolved. The
    one reading of an image for the CLI (--image / --mask / --strength) and the served
    model (columns image / mask / strength)."""
    if strength is not None and image is None:
        raise ValueError(f"strength {strength:g} is for image-to-image: give the image too")
    roles = (None, None, image) if mask is None and strength is None else (image, mask, None)
    _inputs(*roles)  # a mask without an image
    return roles


def denoising_steps(steps: int, strength: float) -> int:
    """Steps image-to-image runs: the last `strength` of a `steps`-step grid (diffusers'
    convention, a fraction of the steps), halves rounded up and at least 1 where diffusers
    floors and may run none. Counted on the decimal the user wrote: 25 x 0.58 is 14.5, so
    15 steps, where the float product (14.4999...) would round down."""
    exact = Fraction(repr(float(strength))) * steps
    return max(1, math.floor(exact + Fraction(1, 2)))


def _inputs(
    image: Tensor | None, mask: Tensor | None, lowres: Tensor | None
) -> list[tuple[str, Tensor | None]]:
    if mask is not None and image is None:
        raise ValueError("a mask needs the image to inpaint")
    if image is not None and lowres is not None:
        raise ValueError("give an image (image-to-image, inpainting) or a low-res image, not both")
    return [("image", image), ("mask", mask), ("lowres", lowres)]


def _batch_of(name: str, images: Tensor | None, n: int) -> Tensor | None:
    """A (1 or n, C, H, W) float tensor broadcast to n rows; a clear error otherwise."""
    if images is None:
        return None
    channels = 1 if name == "mask" else 3
    if images.ndim != 4 or images.shape[1] != channels or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"{name} must be (1 or {n}, {channels}, H, H) square images, got {tuple(images.shape)}"
        )
    if images.shape[0] not in (1, n):
        raise ValueError(f"{images.shape[0]} {name}s for {n} prompts")
    return images.float().expand(n, -1, -1, -1)


def _resized(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
