"""The cascade: a base stage and super-resolution stages, glued for training and sampling.

A stage is its network, its StageConfig and the width of the text embeddings it reads. It
is saved as `config.json` + safetensors and rebuilt from the JSON alone. `Cascade.sample`
is a short sequence: validate, encode the text once, run each stage on the previous
stage's output, return the final images.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from imagen_ops.config import SampleConfig, StageConfig, TextConfig, per_stage
from imagen_ops.device import use_bf16
from imagen_ops.diffusion.guidance import (
    CondDenoiser,
    Conditioning,
    classifier_free_guidance,
    thresholded,
)
from imagen_ops.diffusion.objectives import to_x0
from imagen_ops.diffusion.samplers import NoiseSource, sample
from imagen_ops.diffusion.schedules import Schedule, alpha_sigma, make_schedule, time_grid
from imagen_ops.files import atomic_dir, sha256_file
from imagen_ops.models.unet import UNet
from imagen_ops.text.encoders import TextEmbeddings, TextEncoder

__all__ = ["Cascade", "Stage", "augment_lowres", "cascade_digest", "load_stage"]

log = logging.getLogger(__name__)
STAGE_FORMAT = 1
CASCADE_FILE = "cascade.json"


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
        net = UNet(config.unet, text_dim=text_dim, super_resolution=lowres is not None)
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
            logsnr = schedule(t).expand(x.shape[0]).to(x.device)
            alpha, sigma = alpha_sigma(logsnr, like=x)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = self.net(x, logsnr, cond.text, cond.mask, cond.lowres, cond.aug_logsnr)
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
    h = hashlib.sha256()
    for name in stage_names:
        for fname in ("config.json", f"{weights}.safetensors"):
            path = Path(root) / name / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (stage {name!r} not trained?)")
            h.update(f"{name}/{fname}:{sha256_file(path)}\n".encode())
    return h.hexdigest()


class Cascade:
    """Stages in order of resolution, and the text encoder that conditions them all."""

    def __init__(self, stages: Sequence[Stage], text: TextConfig):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for prev, nxt in itertools.pairwise(stages):
            if nxt.lowres != prev.resolution:
                raise ValueError(
                    f"stage {nxt.name} conditions on {nxt.lowres} px, "
                    f"but {prev.name} makes {prev.resolution} px"
                )
        self.stages, self.text = list(stages), text
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
        `root/cascade.json` when present (a packaged model), else from the arguments."""
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
        return cls([load_stage(root / name, device=device) for name in stage_names], text)

    def write_manifest(self, root: str | Path) -> None:
        """`cascade.json`: the stage order and the text encoder, beside the stage folders."""
        spec = {"stages": [s.name for s in self.stages], "text": self.text.model_dump(mode="json")}
        (Path(root) / CASCADE_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))

    @property
    def device(self) -> torch.device:
        return next(self.stages[0].net.parameters()).device

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Embed prompts with the cascade's frozen encoder (loaded on first use)."""
        if self._encoder is None:
            from imagen_ops.text.encoders import load_text_encoder

            self._encoder = load_text_encoder(self.text)
        return self._encoder.encode(prompts)

    @torch.no_grad()
    def sample(
        self,
        text: TextEmbeddings | Sequence[str],
        settings: SampleConfig,
        seeds: Sequence[int] | None = None,
        *,
        lowres: Tensor | None = None,
        callback: Callable[[str, int, float, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) at the last stage's resolution.

        `lowres` starts the cascade at the first stage that conditions on its resolution
        (run a super-resolution stage alone on a user's image). Image k uses seed
        `seeds[k]` (default `settings.seed + k`) whatever the batch it is in.
        """
        # 1. validate and encode the text once
        if not isinstance(text, TextEmbeddings):
            text = self.encode(list(text))
        n = len(text)
        seeds = list(seeds) if seeds is not None else [settings.seed + k for k in range(n)]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        text = text.to(self.device)
        stages, x = self._stages_from(lowres)
        noise = NoiseSource(seeds, self.device)
        count = len(self.stages)
        steps, guidance, aug = (
            per_stage(getattr(settings, k), count) for k in ("steps", "guidance", "aug_level")
        )
        # 2. each stage conditions on the previous stage's output
        for i, stage in stages:
            cond = Conditioning(text.tokens, text.mask)
            if stage.lowres is not None:
                t_aug = torch.full((n,), float(aug[i]), device=self.device)
                up, aug_logsnr = augment_lowres(
                    x,
                    stage.resolution,
                    t_aug,
                    stage.schedule,
                    noise((3, stage.resolution, stage.resolution)),
                )
                cond = Conditioning(text.tokens, text.mask, up, aug_logsnr)
            denoise = thresholded(
                classifier_free_guidance(
                    stage.denoiser(use_bf16(settings.precision, self.device)), cond, guidance[i]
                ),
                settings.thresholding,
                settings.quantile,
            )
            step_cb = (
                None
                if callback is None
                else (lambda j, t, xt, x0, name=stage.name: callback(name, j, t, xt, x0))
            )
            x = sample(
                settings.sampler,
                denoise,
                noise((3, stage.resolution, stage.resolution)),
                time_grid(steps[i], stage.schedule, settings.spacing),
                stage.schedule,
                noise=noise,
                eta=settings.eta,
                callback=step_cb,
            )
        # 3. the last stage's output
        return x.clamp(-1, 1)

    def _stages_from(self, lowres: Tensor | None) -> tuple[list[tuple[int, Stage]], Tensor | None]:
        if lowres is None:
            return list(enumerate(self.stages)), None
        size = lowres.shape[-1]
        for i, stage in enumerate(self.stages):
            if stage.lowres == size:
                return list(enumerate(self.stages))[i:], lowres.to(self.device)
        sizes = [s.lowres for s in self.stages if s.lowres]
        raise ValueError(f"no stage conditions on {size} px images (they take {sizes})")
