"""Image conversions and labelled sample grids (used by training previews and evaluation)."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from imagen_ops.files import atomic_path

__all__ = [
    "from_uint8",
    "image_format",
    "image_pixels",
    "make_grid",
    "read_image",
    "save_image",
    "to_uint8",
]


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """uint8 (B, H, W, 3) -> [-1, 1] float (B, 3, H, W)."""
    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1


def read_image(data: bytes, *, mask: bool = False, max_pixels: int = 40_000_000) -> Tensor:
    """A user's image file as a (1, 3, S, S) tensor in [-1, 1], or with `mask` a (1, 1, S, S)
    one in [0, 1] (white: generate), S the shorter side (centre crop). Decoding takes the
    ingest checks (formats, pixel limit, truncation), which raise `Rejected` with a reason."""
    from PIL import ImageOps

    from imagen_ops.config import IngestConfig
    from imagen_ops.data.ingest import decode_image, pillow_guard, to_rgb

    with pillow_guard(max_pixels):
        im = to_rgb(decode_image(data, IngestConfig(min_side=1, max_pixels=max_pixels)))
    if im.width != im.height:
        side = min(im.size)
        im = ImageOps.fit(im, (side, side), method=Image.Resampling.BICUBIC)
    if mask:
        return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None, None]
    return from_uint8(np.asarray(im)[None])


def image_pixels(data: bytes) -> int | None:
    """Width x height from an image file's header, before any decoding (what a budget
    checks first); None where the header is unreadable (`read_image` says why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width * im.height
    except Exception:  # any broken header: read_image says what is wrong
        return None


def image_format(path: str | Path) -> str:
    """Pillow's format for `path`'s extension, or a ValueError naming the file: checked
    before the work whose result it will hold."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(
            f"{path}: give a file name with an image extension Pillow writes (.png, .jpg, "
            ".webp, ...)"
        )
    return fmt


def save_image(image: Image.Image, path: str | Path) -> None:
    """Write `image` atomically (a crash leaves no half-written file), in the format of the
    file's extension."""
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


PASS, FAIL = (0, 140, 0), (200, 0, 0)


def make_grid(
    images: np.ndarray,
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    cell: int = 128,
    verdicts: Sequence[str | None] | None = None,
) -> Image.Image:
    """A grid of uint8 images, each upscaled to `cell` px (nearest) with its caption below.

    `verdicts` marks each cell: "pass" (a green frame), a failure reason (a red frame and
    the reason under the caption) or None (no mark)."""
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    label = (28 if captions is not None else 0) + (12 if verdicts is not None else 0)
    grid = Image.new("RGB", (columns * cell, rows * (cell + label)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for k, image in enumerate(images):
        x, y = (k % columns) * cell, (k // columns) * (cell + label)
        grid.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if captions is not None:
            lines = textwrap.wrap(captions[k], width=cell // 6)[:2]
            draw.multiline_text(
                (x + 2, y + cell + 1), "\n".join(lines), fill="black", font=font, spacing=1
            )
        if verdicts is not None and verdicts[k] is not None:
            color = PASS if verdicts[k] == "pass" else FAIL
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=color, width=3)
            draw.text((x + 2, y + cell + label - 12), verdicts[k], fill=color, font=font)
    return grid
