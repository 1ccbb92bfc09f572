"""The embedded default data set: scenes of colored shapes whose captions are exact.

Every scene is sampled from its own generator, seeded by (seed, index), so scene k is the
same whatever the number of workers, and rendered anti-aliased at `SUPERSAMPLE` times the
stored size, then box-downsampled. The scene spec travels with the caption, so evaluation
knows exactly what each caption asks for (`imagen_ops.eval.alignment`).

Coordinates are normalised: x to the right, y down, both in [0, 1]; `size` is the width of
an object's bounding box.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from imagen_ops.config import SynthConfig

__all__ = [
    "COLORS",
    "GENERATOR_VERSION",
    "NEGATIVE_KINDS",
    "PHRASINGS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "caption_for",
    "hard_negatives",
    "render_scene",
    "rgb_to_lab",
    "sample_scene",
    "shape_polygon",
    "synth_scenes",
]

GENERATOR_VERSION = 1
SUPERSAMPLE = 4

# Saturated colors chosen to stay >= 40 Delta-E (CIE76) apart in Lab, and far from the
# light, low-chroma backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 160, 60),
    "cyan": (20, 190, 210),
    "blue": (30, 90, 235),
    "purple": (140, 30, 150),
    "pink": (245, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = {2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

# The generator's phrasings: a scene's `phrasing` picks one (0: the template every caption
# had before `data.synth.caption_variety`), so the words of a relation or a conjunction
# vary while what they mean stays exact (BENCHMARKS: caption variety).
RELATION_WORDS = {
    "left_of": ("to the left of", "left of", "to the left side of"),
    "right_of": ("to the right of", "right of", "to the right side of"),
    "above": ("above", "on top of", "higher than"),
    "below": ("below", "beneath", "lower than"),
}
RELATIONS = {relation: words[0] for relation, words in RELATION_WORDS.items()}
CONJUNCTIONS = ("and", "and also", "as well as")
COUNT_WORDS = ("", "exactly ", "a group of ")
SINGLE_WORDS = ("", "a single ")
PHRASINGS = {
    "single": len(SINGLE_WORDS),
    "binding": len(CONJUNCTIONS),
    "counting": len(COUNT_WORDS),
    "position": len(next(iter(RELATION_WORDS.values()))),
}
"""How many phrasings each category's captions have."""

STAR_INNER = 0.4  # inner / outer radius of the five-pointed star
GAP = 0.07  # minimum free space between two objects' boxes (>= 2 px at 32 px)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: float
    center: tuple[float, float]

    def box(self) -> tuple[float, float, float, float]:
        """Normalised bounding box (x0, y0, x1, y1)."""
        w, h = self.size, self.size * aspect(self.shape)
        cx, cy = self.center
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


@dataclass(frozen=True)
class Scene:
    category: str
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    texture: str  # "plain", "noise" or "gradient"
    relation: str | None = None  # position scenes: objects[0] <relation> objects[1]
    phrasing: int = 0  # which of the category's PHRASINGS its caption uses

    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": GENERATOR_VERSION,
            "category": self.category,
            "relation": self.relation,
            "background": list(self.background),
            "texture": self.texture,
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "center": list(o.center)}
                for o in self.objects
            ],
        }
        if self.phrasing:  # absent for the template: specs written before it read the same
            d["phrasing"] = self.phrasing
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objects = tuple(
            SceneObject(o["shape"], o["color"], float(o["size"]), tuple(o["center"]))
            for o in d["objects"]
        )
        return cls(
            d["category"],
            objects,
            tuple(d["background"]),
            d["texture"],
            d["relation"],
            int(d.get("phrasing", 0)),
        )


# ----------------------------------------------------------------------------- geometry


def aspect(shape: str) -> float:
    """Height / width of a shape's bounding box."""
    if shape == "triangle":
        return math.sqrt(3) / 2
    if shape == "star":
        return (1 + math.cos(math.pi / 5)) / (2 * math.sin(2 * math.pi / 5))
    return 1.0


def shape_polygon(
    shape: str, center: tuple[float, float], width: float
) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape whose bounding box is centred on `center` (any units)."""
    cx, cy = center
    h = width * aspect(shape)
    if shape == "square":
        return [
            (cx - width / 2, cy - h / 2),
            (cx + width / 2, cy - h / 2),
            (cx + width / 2, cy + h / 2),
            (cx - width / 2, cy + h / 2),
        ]
    if shape == "triangle":
        return [(cx, cy - h / 2), (cx + width / 2, cy + h / 2), (cx - width / 2, cy + h / 2)]
    if shape == "star":
        r_out = width / (2 * math.sin(2 * math.pi / 5))
        top = cy - h / 2  # the upper point touches the top of the box
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_out * STAR_INNER
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), top + r_out + r * math.sin(a)))
        return pts
    raise ValueError(f"shape_polygon: {shape!r} is not polygonal (circle is drawn as an ellipse)")


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    center: tuple[float, float],
    width: float,
    fill: int | tuple[int, int, int],
) -> None:
    """Draw one shape in pixel units (used by the renderer and by the oracle's templates)."""
    if shape == "circle":
        cx, cy = center
        draw.ellipse([cx - width / 2, cy - width / 2, cx + width / 2, cy + width / 2], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, center, width), fill=fill)


# ------------------------------------------------------------------------------ color


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIE Lab (D65) float32 (..., 3)."""
    c = np.asarray(rgb, dtype=np.float32) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
        dtype=np.float32,
    )
    xyz = (c @ m.T) / np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    ).astype(np.float32)


# ---------------------------------------------------------------------------- sampling


def _place(
    rng: np.random.Generator,
    sizes: list[tuple[float, float]],
    placed: list[tuple[float, float, float, float]],
    tries: int = 200,
) -> list[tuple[float, float]] | None:
    """Centres for boxes of (w, h) that stay inside the image and GAP apart, or None."""
    centers = []
    for w, h in sizes:
        for _ in range(tries):
            cx = rng.uniform(w / 2 + GAP / 2, 1 - w / 2 - GAP / 2)
            cy = rng.uniform(h / 2 + GAP / 2, 1 - h / 2 - GAP / 2)
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            if all(
                box[0] > b[2] + GAP
                or b[0] > box[2] + GAP
                or box[1] > b[3] + GAP
                or b[1] > box[3] + GAP
                for b in placed
            ):
                placed.append(box)
                centers.append((cx, cy))
                break
        else:
            return None
    return centers


def _objects(
    rng: np.random.Generator, shapes: list[str], colors: list[str], size_range: tuple[float, float]
) -> tuple[SceneObject, ...]:
    while True:
        sizes = [float(round(rng.uniform(*size_range), 3)) for _ in shapes]
        centers = _place(
            rng, [(s, s * aspect(sh)) for s, sh in zip(sizes, shapes, strict=True)], []
        )
        if centers is not None:
            return tuple(
                SceneObject(sh, c, s, (round(x, 4), round(y, 4)))
                for sh, c, s, (x, y) in zip(shapes, colors, sizes, centers, strict=True)
            )


def _position_pair(rng: np.random.Generator, relation: str) -> tuple[SceneObject, ...]:
    """Two objects whose relation holds along its axis and dominates the other axis."""
    while True:
        shapes = [str(s) for s in rng.choice(SHAPES, 2)]
        colors = [str(c) for c in rng.choice(list(COLORS), 2, replace=False)]
        objs = _objects(rng, shapes, colors, (0.25, 0.36))
        (ax, ay), (bx, by) = objs[0].center, objs[1].center
        along, across = (
            (bx - ax, by - ay) if relation in ("left_of", "right_of") else (by - ay, bx - ax)
        )
        if relation in ("right_of", "below"):
            along = -along
        if along > 0.3 and abs(across) < 0.5 * along:
            return objs


def sample_scene(rng: np.random.Generator, cfg: SynthConfig) -> Scene:
    """Draw one scene: category, objects, background."""
    cats = list(cfg.categories)
    p = np.array([cfg.categories[c] for c in cats], dtype=float)
    category = str(rng.choice(cats, p=p / p.sum()))
    relation = None
    if category == "single":
        objects = _objects(
            rng, [str(rng.choice(SHAPES))], [str(rng.choice(list(COLORS)))], (0.3, 0.6)
        )
    elif category == "binding":
        shapes = [str(s) for s in rng.choice(SHAPES, 2)]
        colors = [str(c) for c in rng.choice(list(COLORS), 2, replace=False)]
        objects = _objects(rng, shapes, colors, (0.25, 0.4))
    elif category == "counting":
        n = int(rng.integers(2, 5))
        objects = _objects(
            rng, [str(rng.choice(SHAPES))] * n, [str(rng.choice(list(COLORS)))] * n, (0.25, 0.3)
        )
    else:
        relation = str(rng.choice(list(RELATIONS)))
        objects = _position_pair(rng, relation)
    gray = int(rng.integers(215, 251))
    tint = rng.integers(-6, 7, size=3)
    background = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
    texture = "plain"
    if rng.random() < cfg.textured_fraction:
        texture = str(rng.choice(["noise", "gradient"]))
    return Scene(category, objects, background, texture, relation)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: SceneObject) -> str:
    return f"{_article(obj.color)} {obj.color} {obj.shape}"


def caption_for(scene: Scene) -> str:
    """The caption is a function of the scene: it names exactly what was drawn, in the
    scene's phrasing."""
    objs, k = scene.objects, scene.phrasing
    if scene.category == "single":
        if k:
            return f"{SINGLE_WORDS[k]}{objs[0].color} {objs[0].shape}"
        return _phrase(objs[0])
    if scene.category == "binding":
        return f"{_phrase(objs[0])} {CONJUNCTIONS[k]} {_phrase(objs[1])}"
    if scene.category == "counting":
        obj = objs[0]
        return f"{COUNT_WORDS[k]}{NUMBERS[len(objs)]} {obj.color} {PLURALS[obj.shape]}"
    return f"{_phrase(objs[0])} {RELATION_WORDS[scene.relation][k]} {_phrase(objs[1])}"


NEGATIVE_KINDS = ("color_swap", "relation_flip", "count_change", "color_change", "shape_change")
OPPOSITE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def hard_negatives(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """Captions that differ from the scene's in exactly one compositional fact, by kind:

    - color_swap: two objects trade colors ("a blue circle and a red square" for "a red
      circle and a blue square"); only where their colors and shapes differ;
    - relation_flip: the opposite relation (position scenes);
    - count_change: another number of objects (counting scenes);
    - color_change / shape_change: one object takes a color / shape the scene lacks.

    These are the negatives a bag-of-words text-image scorer cannot tell apart from the
    true caption (the same words, other bindings), so training against them and measuring
    on them is what makes a scorer useful for compositional prompts."""
    objs, out = scene.objects, {}
    replace = dataclasses.replace
    if len(objs) == 2 and scene.category in ("binding", "position"):
        a, b = objs
        if a.color != b.color and a.shape != b.shape:
            swapped = (replace(a, color=b.color), replace(b, color=a.color))
            out["color_swap"] = caption_for(replace(scene, objects=swapped))
    if scene.category == "position":
        out["relation_flip"] = caption_for(replace(scene, relation=OPPOSITE[scene.relation]))
    if scene.category == "counting":
        n = int(rng.choice([k for k in NUMBERS if k != len(objs)]))
        out["count_change"] = caption_for(replace(scene, objects=(objs[0],) * n))
    k = int(rng.integers(len(objs)))
    same = scene.category == "counting"  # every counted object shares color and shape
    targets = range(len(objs)) if same else [k]
    color = str(rng.choice([c for c in COLORS if c not in {o.color for o in objs}]))
    recolored = tuple(replace(o, color=color) if i in targets else o for i, o in enumerate(objs))
    out["color_change"] = caption_for(replace(scene, objects=recolored))
    shape = str(rng.choice([s for s in SHAPES if s not in {o.shape for o in objs}]))
    reshaped = tuple(replace(o, shape=shape) if i in targets else o for i, o in enumerate(objs))
    out["shape_change"] = caption_for(replace(scene, objects=reshaped))
    return out


# --------------------------------------------------------------------------- rendering


def _background(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    base = np.broadcast_to(np.array(scene.background, dtype=np.float32), (size, size, 3))
    if scene.texture == "noise":
        base = base + rng.normal(0, 4.0, size=(size, size, 1))
    elif scene.texture == "gradient":
        ramp = np.linspace(-10, 10, size, dtype=np.float32)
        base = base + (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def render_scene(scene: Scene, size: int, seed: int = 0) -> Image.Image:
    """Render at SUPERSAMPLE x `size` and box-downsample: anti-aliased at every size."""
    big = size * SUPERSAMPLE
    rng = np.random.default_rng(seed)
    image = _background(scene, size, rng).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_shape(
            draw,
            obj.shape,
            (obj.center[0] * big, obj.center[1] * big),
            obj.size * big,
            COLORS[obj.color],
        )
    return image.reduce(SUPERSAMPLE)


@dataclass(frozen=True)
class SynthRecord:
    index: int
    png: bytes
    caption: str
    scene: dict[str, Any]


def _render_one(args: tuple[int, SynthConfig]) -> SynthRecord:
    index, cfg = args
    rng = np.random.default_rng([cfg.seed, GENERATOR_VERSION, index])
    scene = sample_scene(rng, cfg)
    buf = io.BytesIO()
    render_scene(scene, cfg.resolution, seed=int(rng.integers(2**31))).save(buf, format="PNG")
    # drawn last: the scenes and images are those of caption_variety 0, only words change
    if cfg.caption_variety and rng.random() < cfg.caption_variety:
        phrasing = int(rng.integers(1, PHRASINGS[scene.category]))
        scene = dataclasses.replace(scene, phrasing=phrasing)
    return SynthRecord(index, buf.getvalue(), caption_for(scene), scene.to_dict())


def synth_scenes(cfg: SynthConfig, workers: int = 0, start: int = 0) -> Iterator[SynthRecord]:
    """Yield records `start`..`cfg.n-1` in order; `workers` processes render them (0: inline)."""
    jobs = ((i, cfg) for i in range(start, cfg.n))
    if workers <= 1:
        yield from map(_render_one, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_render_one, jobs, chunksize=64)
