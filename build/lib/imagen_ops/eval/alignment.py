"""Exact compositional-alignment oracle for the synthetic shapes data set.

The shapes generator (`imagen_ops.data.shapes`) knows exactly what each caption asks for, so a
generated image can be checked for object color, shape, count and relative position without a
learned detector, in the spirit of GenEval (Ghosh et al. 2023) and DrawBench's color,
counting and positional categories (Saharia et al. 2022):

1. Label pixels with the nearest palette color in CIE Lab (`label_pixels`).
2. Split each color into 8-connected components; drop specks (`connected_components`).
3. Estimate each component's per-pixel coverage and classify its shape by soft IoU
   (sum of minima / sum of maxima) against templates drawn by the renderer's own
   `draw_shape`, supersampled and box-filtered like the renderer so anti-aliased edges match
   exactly (`classify_shape`). Each template is placed from the blob's bounding box and from
   its area and centroid; at 32 px the box alone misplaces small stars (their tips cover
   under half a pixel) and confuses 8 px circles with squares.
4. Compare the detections with the scene spec (`score_detections`).

Thresholds, and why (Delta-E is CIE76, as in `shapes.rgb_to_lab`):

- `MAX_DELTA_E = 20`: the closest palette pair (purple/pink) is 41 apart, so balls of radius
  20 are disjoint and a pixel can never be near two colors. Anti-aliased edges mix a color
  with the background; across all backgrounds the generator draws, the closest such mix to a
  *different* palette color is 22 (purple fading into the background passes near pink), so
  edge pixels are left unlabelled instead of forming a wrong-colored halo.
- `MIN_CHROMA = 15`: backgrounds are light grays with a +-6 tint (chroma <= 8); every pixel
  within 20 of a palette color has chroma >= 18 (cyan, the least saturated, has 38).
- `MIN_AREA_FRACTION = 0.005`: the smallest object (a star 0.25 wide) covers 2% of the image;
  a quarter of that separates objects from specks of edge blending or noise.
- `MIN_SHAPE_IOU = 0.7`: ground-truth shapes match their own template at soft IoU >= 0.84
  at 32 px (>= 0.91 at 64 px; stars are the hardest), and beat the best wrong template by
  >= 0.06 at 32 px (circle vs square is the closest pair, then star vs circle). A blob that
  fits no template to 0.7, e.g. a 2:1 ellipse (0.65), is "unknown" rather than forced into
  the nearest shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from imagen_ops.data.shapes import (
    COLORS,
    GENERATOR_VERSION,
    RELATIONS,
    SHAPES,
    SUPERSAMPLE,
    aspect,
    draw_shape,
    rgb_to_lab,
    shape_polygon,
)

__all__ = [
    "CATEGORIES",
    "FAILURES",
    "Detection",
    "Judgement",
    "alignment_report",
    "classify_shape",
    "connected_components",
    "detect_objects",
    "failure_of",
    "judge",
    "judge_all",
    "label_pixels",
    "score_detections",
    "score_image",
]

log = logging.getLogger(__name__)

CATEGORIES = ("single", "binding", "counting", "position")
MAX_DELTA_E = 20.0
MIN_CHROMA = 15.0
MIN_AREA_FRACTION = 0.005
MIN_AREA_PIXELS = 3
MIN_SHAPE_IOU = 0.7
MIN_SIZE = 32  # objects are >= 0.25 of the width: 8 px at 32 px, below which shapes blur
RING_ALPHA = 0.05  # edge pixels grown into a component must carry at least this coverage
RING_STEPS = 2  # an anti-aliased edge is at most two pixels deep

_COLOR_NAMES = tuple(COLORS)
_PALETTE_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)
_PALETTE_LAB = rgb_to_lab(_PALETTE_RGB.astype(np.uint8))
_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))  # every undirected 8-neighbour pair once


@dataclass(frozen=True)
class Detection:
    """One detected object; centroid normalised to [0, 1] (x right, y down)."""

    color: str
    shape: str  # one of SHAPES, or "unknown"
    centroid: tuple[float, float]
    area: float  # fraction of the image, from per-pixel coverage


# ------------------------------------------------------------------------------ input


def _check_image(image: Any) -> np.ndarray:
    """Reject anything but a square uint8 RGB array the oracle can resolve."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        got = type(image).__name__ if not isinstance(image, np.ndarray) else image.dtype
        raise ValueError(f"expected a uint8 numpy array of shape (S, S, 3), got {got}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a uint8 image of shape (S, S, 3), got shape {image.shape}")
    if image.shape[0] < MIN_SIZE:
        raise ValueError(f"expected shape (S, S, 3) with S >= {MIN_SIZE}, got {image.shape}")
    return image


def _check_scene(scene: Any) -> dict[str, Any]:
    """Reject scene specs this oracle does not know how to read."""
    if not isinstance(scene, dict):
        raise ValueError(f"scene must be a dict (Scene.to_dict()), got {type(scene).__name__}")
    if scene.get("version") != GENERATOR_VERSION:
        raise ValueError(
            f"scene version {scene.get('version')!r} is not supported "
            f"(this oracle reads version {GENERATOR_VERSION})"
        )
    if scene.get("category") not in CATEGORIES:
        raise ValueError(
            f"unknown scene category {scene.get('category')!r}; expected one of {CATEGORIES}"
        )
    objects = scene.get("objects")
    if not isinstance(objects, list) or not objects:
        raise ValueError("scene has no 'objects' list")
    for o in objects:
        if not isinstance(o, dict) or o.get("color") not in COLORS or o.get("shape") not in SHAPES:
            raise ValueError(
                f"scene object {o!r} needs a color in {_COLOR_NAMES} and a shape in {SHAPES}"
            )
    if scene["category"] == "position" and (
        len(objects) != 2 or scene.get("relation") not in RELATIONS
    ):
        raise ValueError(f"position scenes need two objects and a relation in {tuple(RELATIONS)}")
    return scene


# ------------------------------------------------------------------- pixels and blobs


def label_pixels(image: np.ndarray) -> np.ndarray:
    """Palette index per pixel, or -1 for background and unclear (edge-blend) pixels."""
    lab = rgb_to_lab(image)
    d2 = (lab**2).sum(-1, keepdims=True) - 2 * lab @ _PALETTE_LAB.T + (_PALETTE_LAB**2).sum(-1)
    nearest = d2.argmin(-1)
    near = np.take_along_axis(d2, nearest[..., None], -1)[..., 0] < MAX_DELTA_E**2
    colorful = np.hypot(lab[..., 1], lab[..., 2]) >= MIN_CHROMA
    return np.where(near & colorful, nearest, -1).astype(np.int8)


def _pair_slices(dy: int, dx: int, h: int, w: int) -> tuple[tuple[slice, slice], ...]:
    """Slices a, b such that pixel a[i] and b[i] are neighbours offset by (dy, dx)."""
    a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    b = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
    return a, b


def connected_components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal labels (-1 = none): ids 0..k-1, -1 elsewhere.

    Min-label propagation with pointer jumping: each pixel holds the index of a pixel of its
    own component, so `comp[comp]` shortcuts chains and it converges in a few sweeps.
    """
    h, w = labels.shape
    n = h * w
    fg = labels >= 0
    edges = []
    for dy, dx in _NEIGHBOURS:
        a, b = _pair_slices(dy, dx, h, w)
        edges.append((a, b, fg[a] & (labels[a] == labels[b])))
    comp = np.where(fg, np.arange(n).reshape(h, w), n)
    while True:
        new = comp.copy()
        for a, b, same in edges:
            m = np.where(same, np.minimum(comp[a], comp[b]), n)
            np.minimum(new[a], m, out=new[a])
            np.minimum(new[b], m, out=new[b])
        flat = np.append(new.ravel(), n)
        while not np.array_equal(jumped := flat[flat], flat):
            flat = jumped
        new = flat[:n].reshape(h, w)
        if np.array_equal(new, comp):
            break
        comp = new
    out = np.full((h, w), -1, dtype=np.int32)
    out[fg] = np.unique(comp[fg], return_inverse=True)[1]
    return out


# ------------------------------------------------------------------------- coverage


def _dilate4(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _coverage(rgb: np.ndarray, labels: np.ndarray, core: np.ndarray, color: int) -> np.ndarray:
    """Per-pixel coverage of one object, from the renderer's blend: p = a*c + (1 - a)*bg.

    The labelled core keeps only pixels within MAX_DELTA_E of the color, which for a
    saturated color means coverage >~ 0.8, so the mask would shrink by a color-dependent
    margin. Projecting each pixel onto the background->color line in sRGB (the space the
    renderer box-filters in) recovers the edge coverage, so templates compare fairly.
    """
    free = labels < 0
    bg_pixels = rgb[free & ~_dilate4(_dilate4(core))]
    bg = np.median(bg_pixels, axis=0) if len(bg_pixels) else np.full(3, 235.0, np.float32)
    c = _PALETTE_RGB[color]
    direction = c - bg
    proj = np.clip((rgb - bg) @ direction / max(float(direction @ direction), 1.0), 0.0, 1.0)
    grown = core.copy()
    for _ in range(RING_STEPS):
        grown |= _dilate4(grown) & free & (proj > RING_ALPHA)
    return np.where(grown, proj, 0.0).astype(np.float32)


def _region(core: np.ndarray) -> tuple[int, int, int, int]:
    """A window around a component big enough for any template fitted to it."""
    ys, xs = np.nonzero(core)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    pad = 2 + max(y1 - y0, x1 - x0) // 2
    return y0 - pad, y1 + pad, x0 - pad, x1 + pad


def _crop(array: np.ndarray, y0: int, y1: int, x0: int, x1: int, fill: Any) -> np.ndarray:
    """array[y0:y1, x0:x1] with out-of-image parts filled, so windows may overhang edges."""
    h, w = array.shape[:2]
    out = np.full((y1 - y0, x1 - x0, *array.shape[2:]), fill, dtype=array.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


# ------------------------------------------------------------------------ templates


@cache
def _unit_moments(shape: str) -> tuple[float, float]:
    """(area / box area, centroid y offset from the box centre / width) of a shape."""
    if shape == "circle":
        return math.pi / 4, 0.0
    pts = np.array(shape_polygon(shape, (0.0, 0.0), 1.0))
    x, y = pts[:, 0], pts[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    return float(abs(area) / aspect(shape)), float(cy)


def _template(
    shape: str, center: tuple[float, float], width: float, hw: tuple[int, int]
) -> np.ndarray:
    """Coverage of a shape drawn like the renderer does: supersampled, then box-filtered."""
    s = SUPERSAMPLE
    im = Image.new("L", (hw[1] * s, hw[0] * s), 0)
    draw_shape(ImageDraw.Draw(im), shape, (center[0] * s, center[1] * s), width * s, 255)
    return np.asarray(im.reduce(s), dtype=np.float32) / 255.0


def _moments(alpha: np.ndarray) -> tuple[float, float, float]:
    """Total coverage and its centroid (x, y) in pixel units (pixel i spans [i, i + 1))."""
    total = float(alpha.sum())
    cy = float((np.arange(alpha.shape[0]) + 0.5) @ alpha.sum(1)) / total
    cx = float((np.arange(alpha.shape[1]) + 0.5) @ alpha.sum(0)) / total
    return total, cx, cy


def _fits(
    shape: str,
    alpha: np.ndarray,
    box: tuple[float, float, float, float],
    moments: tuple[float, float, float],
) -> list[tuple[tuple[float, float], float]]:
    """Candidate (box centre, width) placements of `shape` for a coverage map.

    The bounding box (x0, x1, y0, y1 of coverage >= 0.5) gives two widths via `aspect`:
    from its width and from its height. Sharp tips (triangle apex, star points) cover less
    than half a pixel and shrink that box, so a third fit matches the template's area and
    centroid to the blob's moments, which no single pixel can bias.
    """
    x0, x1, y0, y1 = box
    center = ((x0 + x1) / 2, (y0 + y1) / 2)
    total, cx, cy = moments
    fill, offset = _unit_moments(shape)
    width = math.sqrt(total / (fill * aspect(shape)))
    return [
        (center, x1 - x0),
        (center, (y1 - y0) / aspect(shape)),
        ((cx, cy - offset * width), width),
    ]


def _box(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """Pixel-edge bounding box (x0, x1, y0, y1) of the pixels at least half covered."""
    inside = alpha >= 0.5 if (alpha >= 0.5).any() else alpha > 0
    rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
    return float(cols[0]), float(cols[-1] + 1), float(rows[0]), float(rows[-1] + 1)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(float(np.maximum(a, b).sum()), 1e-9))


def classify_shape(alpha: np.ndarray) -> tuple[str, float]:
    """Best-matching shape for a coverage map and its soft IoU; "unknown" below MIN_SHAPE_IOU."""
    box, moments = _box(alpha), _moments(alpha)
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:
        for center, width in _fits(shape, alpha, box, moments):
            iou = _soft_iou(alpha, _template(shape, center, width, alpha.shape))
            if iou > best_iou:
                best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else "unknown"), best_iou


# ------------------------------------------------------------------------ detection


def _detect(rgb: np.ndarray, labels: np.ndarray, comps: np.ndarray, k: int) -> Detection:
    size = labels.shape[0]
    core = comps == k
    color = int(labels[core][0])
    y0, y1, x0, x1 = _region(core)
    alpha = _coverage(
        _crop(rgb, y0, y1, x0, x1, 235.0),
        _crop(labels, y0, y1, x0, x1, -1),
        _crop(core, y0, y1, x0, x1, False),
        color,
    )
    shape, _ = classify_shape(alpha)
    total, cx, cy = _moments(alpha)
    return Detection(
        _COLOR_NAMES[color], shape, (float(cx + x0) / size, float(cy + y0) / size), total / size**2
    )


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Colored objects in a generated image, largest first."""
    rgb = _check_image(image).astype(np.float32)
    labels = label_pixels(image)
    comps = connected_components(labels)
    counts = np.bincount(comps[comps >= 0])
    min_pixels = max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * labels.size)
    kept = np.nonzero(counts >= min_pixels)[0]
    dets = [_detect(rgb, labels, comps, int(k)) for k in kept]
    return sorted(dets, key=lambda d: -d.area)


# -------------------------------------------------------------------------- scoring


def _find(dets: Sequence[Detection], color: str, shape: str) -> Detection | None:
    """The detection of (color, shape), else the only one of that color, else None."""
    exact = [d for d in dets if d.color == color and d.shape == shape]
    if exact:
        return exact[0]
    same_color = [d for d in dets if d.color == color]
    return same_color[0] if len(same_color) == 1 else None


def _relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """a <relation> b along its axis, and that axis dominates (as the generator guarantees)."""
    dx, dy = b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]
    along, across = {
        "left_of": (dx, dy),
        "right_of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return bool(along > 0 and abs(along) > abs(across))


def score_detections(dets: Sequence[Detection], scene: dict[str, Any]) -> dict[str, bool | None]:
    """Requirement-level verdicts for detections against a scene spec.

    color: every requested color is present and no other color is.
    shape: every requested (color, shape) pair is present, and every object of a requested
        color has a requested shape (so "three green stars" with a green circle fails).
    count: as many objects as requested.
    position: position scenes only; the relation holds between the two objects (matched by
        color and shape, or by color alone when the shape is wrong).
    correct: all of the above, which is exactly the per-category rule: e.g. counting needs N
        objects, all of the requested color and shape; position needs exactly the two
        requested objects in the stated relation.
    """
    scene = _check_scene(scene)
    wanted = {(o["color"], o["shape"]) for o in scene["objects"]}
    wanted_colors = {c for c, _ in wanted}
    found = {(d.color, d.shape) for d in dets}
    color = wanted_colors == {d.color for d in dets}
    shape = wanted <= found and all(
        (d.color, d.shape) in wanted for d in dets if d.color in wanted_colors
    )
    count = len(dets) == len(scene["objects"])
    position = None
    if scene["category"] == "position":
        a_spec, b_spec = scene["objects"]
        a = _find(dets, a_spec["color"], a_spec["shape"])
        b = _find(dets, b_spec["color"], b_spec["shape"])
        position = (
            a is not None
            and b is not None
            and a is not b
            and _relation_holds(a, b, scene["relation"])
        )
    correct = color and shape and count and position is not False
    return {
        "correct": correct,
        "color": color,
        "shape": shape,
        "count": count,
        "position": position,
    }


FAILURES = (
    "object_missing",
    "objects_merged",
    "extra_object",
    "wrong_count",
    "color_leaked",
    "wrong_color",
    "colors_swapped",
    "wrong_shape",
    "wrong_relation",
)


def failure_of(
    dets: Sequence[Detection], scene: dict[str, Any], verdict: dict[str, bool | None]
) -> str | None:
    """Why an image failed its scene (None when it passed): the first of, in this order,

    - the number of objects is off: `objects_merged` when fewer objects were found and one
      of them fits no shape (two touching same-colored objects form one blob), else
      `wrong_count` for counting prompts, `object_missing` / `extra_object` for the others;
    - the colors are off: `color_leaked` when two colors were asked for and every object
      took one of them, else `wrong_color`;
    - the shapes are off: `colors_swapped` when two objects were drawn with each other's
      color (a red square and a blue circle for "a red circle and a blue square"), else
      `wrong_shape`;
    - `wrong_relation`: the right two objects, in the wrong place.
    """
    if verdict["correct"]:
        return None
    objects, category = scene["objects"], scene["category"]
    if len(dets) < len(objects):
        if any(d.shape == "unknown" for d in dets):
            return "objects_merged"
        return "wrong_count" if category == "counting" else "object_missing"
    if len(dets) > len(objects):
        return "wrong_count" if category == "counting" else "extra_object"
    wanted_colors = {o["color"] for o in objects}
    found_colors = {d.color for d in dets}
    if found_colors != wanted_colors:
        leaked = len(wanted_colors) > 1 and len(found_colors) == 1 and found_colors <= wanted_colors
        return "color_leaked" if leaked else "wrong_color"
    if not verdict["shape"]:
        if len(objects) == 2:
            (c1, s1), (c2, s2) = ((o["color"], o["shape"]) for o in objects)
            if s1 != s2 and {(d.color, d.shape) for d in dets} == {(c1, s2), (c2, s1)}:
                return "colors_swapped"
        return "wrong_shape"
    return "wrong_relation"


@dataclass(frozen=True)
class Judgement:
    """The oracle's reading of one image: its objects, verdicts and failure reason."""

    detections: tuple[Detection, ...]
    verdict: dict[str, bool | None]
    failure: str | None

    @property
    def correct(self) -> bool:
        return bool(self.verdict["correct"])


def judge(image: np.ndarray, scene: dict[str, Any]) -> Judgement:
    """Detect, score and explain one image against the scene its caption describes."""
    scene = _check_scene(scene)
    dets = detect_objects(image)
    verdict = score_detections(dets, scene)
    return Judgement(tuple(dets), verdict, failure_of(dets, scene, verdict))


def score_image(image: np.ndarray, scene: dict[str, Any]) -> dict[str, bool | None]:
    """Does `image` show what the caption of `scene` asks for? See `score_detections`."""
    return judge(image, scene).verdict


def _mean(values: Sequence[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def judge_all(images: Sequence[np.ndarray], scenes: Sequence[dict[str, Any]]) -> list[Judgement]:
    if len(images) != len(scenes):
        raise ValueError(
            f"got {len(images)} images but {len(scenes)} scenes; pass one scene per image"
        )
    return [judge(im, sc) for im, sc in zip(images, scenes, strict=True)]


def alignment_report(
    images: Sequence[np.ndarray],
    scenes: Sequence[dict[str, Any]],
    judgements: Sequence[Judgement] | None = None,
) -> dict[str, Any]:
    """Accuracies over a set of generated images: per category, their balanced mean (the
    headline: a category mix cannot hide a failing category), the pooled mean, per
    requirement, single-object exactness, and the failure reasons per category."""
    if not images:
        raise ValueError("alignment_report needs at least one image")
    judged = list(judgements) if judgements is not None else judge_all(images, scenes)
    if len(judged) != len(images) or len(scenes) != len(images):
        raise ValueError(
            f"got {len(images)} images, {len(scenes)} scenes and {len(judged)} judgements; "
            "pass one of each per image"
        )
    report: dict[str, Any] = {"overall": _mean([j.correct for j in judged]), "n": len(judged)}
    failures: dict[str, dict[str, int]] = {}
    present = []
    for cat in CATEGORIES:
        mine = [j for j, sc in zip(judged, scenes, strict=True) if sc["category"] == cat]
        report[cat], report[f"n_{cat}"] = _mean([j.correct for j in mine]), len(mine)
        if mine:
            present.append(report[cat])
            reasons = [j.failure for j in mine if j.failure is not None]
            failures[cat] = {r: reasons.count(r) for r in FAILURES if r in reasons}
    report["balanced"] = float(np.mean(present))
    singles = [j for j, sc in zip(judged, scenes, strict=True) if sc["category"] == "single"]
    report["single_exact"] = _mean([len(j.detections) == 1 for j in singles])
    for req in ("color", "shape", "count", "position"):
        values = [j.verdict[req] for j in judged if j.verdict[req] is not None]
        report[f"{req}_accuracy"] = _mean(values)
    report["failures"] = failures
    log.info(
        "alignment over %d images: balanced %.3f, pooled %.3f",
        len(judged),
        report["balanced"],
        report["overall"],
    )
    return report
