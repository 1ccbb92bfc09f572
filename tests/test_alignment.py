"""The shapes alignment oracle: ground truth passes, everything else fails for the right reason."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from functools import cache

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagen_ops.config import SynthConfig
from imagen_ops.data.shapes import (
    Scene,
    SceneObject,
    caption_for,
    render_scene,
    sample_scene,
)
from imagen_ops.eval.alignment import (
    CATEGORIES,
    alignment_report,
    classify_shape,
    connected_components,
    detect_objects,
    judge,
    score_image,
)

N_SCENES = 320
BALANCED = SynthConfig(categories=dict.fromkeys(CATEGORIES, 1.0))
BG = (235, 236, 233)


def _scenes(seed: int, n: int = N_SCENES) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i]), BALANCED) for i in range(n)]


def _render(scene: Scene, path: str, seed: int = 0) -> np.ndarray:
    """`path` is a size, or "64->32": the way the 32 px training data is made."""
    if path == "64->32":
        big = render_scene(scene, 64, seed=seed)
        return np.asarray(big.resize((32, 32), Image.Resampling.BOX))
    return np.asarray(render_scene(scene, int(path), seed=seed))


@cache
def _ground_truth(path: str) -> tuple[tuple[str, str, bool], ...]:
    """(category, caption, correct) for every ground-truth scene rendered along `path`."""
    out = []
    for i, scene in enumerate(_scenes(seed=11)):
        verdict = score_image(_render(scene, path, seed=i), scene.to_dict())
        out.append((scene.category, caption_for(scene), bool(verdict["correct"])))
    return tuple(out)


def _accuracy(rows: list[tuple[str, str, bool]]) -> tuple[float, list[str]]:
    return float(np.mean([ok for _, _, ok in rows])), [cap for _, cap, ok in rows if not ok]


@pytest.mark.parametrize("path", ["32", "64", "128", "64->32"])
def test_ground_truth_scores_high(path: str) -> None:
    acc, failures = _accuracy(list(_ground_truth(path)))
    assert acc >= 0.98, f"{path}: accuracy {acc:.3f}; failing captions: {failures[:5]}"


@pytest.mark.parametrize("path", ["32", "64", "128", "64->32"])
@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_every_category(path: str, category: str) -> None:
    rows = [r for r in _ground_truth(path) if r[0] == category]
    assert len(rows) >= 50, "the balanced mix should give every category enough scenes"
    acc, failures = _accuracy(rows)
    assert acc >= 0.98, f"{path}/{category}: accuracy {acc:.3f}; failing: {failures[:5]}"


@pytest.mark.parametrize("size", [32, 64])
def test_uniform_noise_scores_low(size: int) -> None:
    rng = np.random.default_rng(size)
    scenes = _scenes(seed=12, n=100)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in scenes]
    report = alignment_report(images, [s.to_dict() for s in scenes])
    assert report["overall"] <= 0.05


@pytest.mark.parametrize("texture", ["plain", "noise", "gradient"])
def test_background_only_scores_zero(texture: str) -> None:
    scenes = _scenes(seed=13, n=40)
    images = [
        _render(dataclasses.replace(s, objects=(), texture=texture), "64", seed=i)
        for i, s in enumerate(scenes)
    ]
    assert all(detect_objects(im) == [] for im in images)
    assert alignment_report(images, [s.to_dict() for s in scenes])["overall"] == 0.0


def test_mismatched_pairs_score_low() -> None:
    scenes = _scenes(seed=14, n=150)
    images = [_render(s, "64", seed=i) for i, s in enumerate(scenes)]
    others = []
    for i, scene in enumerate(scenes):
        j = (i + 1) % len(scenes)
        while caption_for(scenes[j]) == caption_for(scene):
            j = (j + 1) % len(scenes)
        others.append(scenes[j].to_dict())
    assert alignment_report(images, others)["overall"] < 0.1


# ------------------------------------------------------------------- targeted checks


def _obj(shape: str, color: str, x: float, y: float, size: float = 0.3) -> SceneObject:
    return SceneObject(shape, color, size, (x, y))


def _scene(category: str, *objects: SceneObject, relation: str | None = None) -> Scene:
    return Scene(category, objects, BG, "plain", relation)


def _verdict(drawn: Scene, asked: Scene, size: int = 64) -> dict[str, bool | None]:
    return score_image(np.asarray(render_scene(drawn, size)), asked.to_dict())


@pytest.mark.parametrize("size", [32, 64])
def test_recolored_object_fails_color(size: int) -> None:
    asked = _scene(
        "binding", _obj("square", "blue", 0.25, 0.3), _obj("triangle", "yellow", 0.7, 0.7)
    )
    assert _verdict(asked, asked, size)["correct"]
    drawn = dataclasses.replace(
        asked, objects=(dataclasses.replace(asked.objects[0], color="red"), asked.objects[1])
    )
    verdict = _verdict(drawn, asked, size)
    json.dumps(verdict)
    assert verdict["color"] is False and verdict["correct"] is False
    assert verdict["count"] is True


@pytest.mark.parametrize("relation", ["left_of", "right_of", "above", "below"])
def test_swapped_positions_fail_position(relation: str) -> None:
    near, far = (0.25, 0.5), (0.75, 0.55)
    if relation in ("above", "below"):
        near, far = (0.5, 0.25), (0.55, 0.75)
    if relation in ("right_of", "below"):
        near, far = far, near
    a, b = _obj("circle", "red", *near), _obj("star", "cyan", *far)
    asked = _scene("position", a, b, relation=relation)
    assert _verdict(asked, asked)["correct"]
    swapped = _scene(
        "position",
        dataclasses.replace(a, center=b.center),
        dataclasses.replace(b, center=a.center),
        relation=relation,
    )
    verdict = _verdict(swapped, asked)
    assert verdict["position"] is False and verdict["correct"] is False
    assert verdict["color"] and verdict["shape"] and verdict["count"]


def test_dropped_object_fails_count() -> None:
    objs = [_obj("star", "green", x, y, 0.27) for x, y in ((0.2, 0.2), (0.75, 0.25), (0.3, 0.75))]
    asked = _scene("counting", *objs)
    assert _verdict(asked, asked)["correct"]
    verdict = _verdict(_scene("counting", *objs[:2]), asked)
    assert verdict["count"] is False and verdict["correct"] is False
    assert verdict["color"] and verdict["shape"]


@pytest.mark.parametrize("size", [32, 64])
def test_square_for_circle_fails_shape(size: int) -> None:
    asked = _scene("single", _obj("circle", "orange", 0.45, 0.55, 0.35))
    assert _verdict(asked, asked, size)["correct"]
    verdict = _verdict(_scene("single", _obj("square", "orange", 0.45, 0.55, 0.35)), asked, size)
    assert verdict["shape"] is False and verdict["correct"] is False
    assert verdict["color"] and verdict["count"] and verdict["position"] is None


def test_counting_with_a_wrong_shape_fails_shape() -> None:
    objs = [_obj("triangle", "pink", x, 0.5, 0.27) for x in (0.2, 0.5, 0.8)]
    asked = _scene("counting", *objs)
    drawn = _scene("counting", objs[0], dataclasses.replace(objs[1], shape="circle"), objs[2])
    verdict = _verdict(drawn, asked)
    assert verdict["shape"] is False and verdict["count"] and verdict["color"]


def test_detection_matches_geometry() -> None:
    """A circle's area is pi/4 * size^2 and its centroid is its centre."""
    scene = _scene("single", _obj("circle", "purple", 0.4, 0.6, 0.4))
    (det,) = detect_objects(np.asarray(render_scene(scene, 128)))
    assert (det.color, det.shape) == ("purple", "circle")
    assert det.centroid == pytest.approx((0.4, 0.6), abs=2e-3)
    assert all(type(v) is float for v in (*det.centroid, det.area))
    assert det.area == pytest.approx(math.pi / 4 * 0.4**2, rel=0.02)


def test_elongated_blob_is_unknown() -> None:
    im = Image.new("L", (4 * 64, 4 * 64))
    ImageDraw.Draw(im).ellipse([32, 96, 224, 160], fill=255)  # 3:1
    assert classify_shape(np.asarray(im.reduce(4), dtype=np.float32) / 255)[0] == "unknown"


def _bfs_components(labels: np.ndarray) -> int:
    """Reference: number of 8-connected components of equal non-negative labels."""
    seen = np.zeros(labels.shape, bool)
    h, w = labels.shape
    count = 0
    for start in zip(*np.nonzero(labels >= 0), strict=True):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    inside = 0 <= q[0] < h and 0 <= q[1] < w
                    if inside and not seen[q] and labels[q] == labels[y, x]:
                        seen[q] = True
                        queue.append(q)
    return count


def test_connected_components_match_bfs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = np.where(rng.random((23, 31)) < 0.5, rng.integers(0, 3, (23, 31)), -1)
        comps = connected_components(labels.astype(np.int8))
        assert comps.max() + 1 == _bfs_components(labels)
        assert ((comps >= 0) == (labels >= 0)).all()
        for k in range(comps.max() + 1):
            assert len(np.unique(labels[comps == k])) == 1
    spiral = np.full((9, 9), -1, np.int8)
    spiral[0, :], spiral[:, 8], spiral[8, :], spiral[2:, 0], spiral[2, :7] = 0, 0, 0, 0, 0
    assert connected_components(spiral).max() == 0


# ----------------------------------------------------------------------------- report


def test_report_is_json_and_counts_categories() -> None:
    scenes = [
        _scene("single", _obj("circle", "red", 0.5, 0.5)),
        _scene("binding", _obj("square", "blue", 0.25, 0.3), _obj("star", "pink", 0.7, 0.7)),
    ]
    images = [np.asarray(render_scene(s, 32)) for s in scenes]
    report = alignment_report(images, [s.to_dict() for s in scenes])
    json.dumps(report)
    assert report["overall"] == 1.0 and report["n"] == 2
    assert (report["n_single"], report["n_binding"], report["n_position"]) == (1, 1, 0)
    assert report["counting"] is None and report["position_accuracy"] is None
    assert report["color_accuracy"] == report["shape_accuracy"] == report["count_accuracy"] == 1.0


def test_report_balances_categories_and_explains_failures() -> None:
    """Three passing singles and one failing binding: pooled 0.75, balanced 0.5."""
    single = _scene("single", _obj("circle", "red", 0.5, 0.5))
    asked = _scene("binding", _obj("circle", "red", 0.25, 0.3), _obj("square", "blue", 0.7, 0.7))
    swapped = _scene("binding", _obj("circle", "blue", 0.25, 0.3), _obj("square", "red", 0.7, 0.7))
    drawn = [single] * 3 + [swapped]
    images = [np.asarray(render_scene(s, 64)) for s in drawn]
    report = alignment_report(images, [s.to_dict() for s in [single] * 3 + [asked]])
    assert report["overall"] == 0.75 and report["balanced"] == 0.5
    assert report["single_exact"] == 1.0
    assert report["failures"] == {"single": {}, "binding": {"colors_swapped": 1}}
    json.dumps(report)


def _failure(drawn: Scene, asked: Scene, size: int = 64) -> str | None:
    return judge(np.asarray(render_scene(drawn, size)), asked.to_dict()).failure


RED_CIRCLE, BLUE_SQUARE = _obj("circle", "red", 0.25, 0.3), _obj("square", "blue", 0.72, 0.7)
PAIR = _scene("binding", RED_CIRCLE, BLUE_SQUARE)


@pytest.mark.parametrize(
    ("drawn", "asked", "reason"),
    [
        (PAIR, PAIR, None),
        (_scene("binding", RED_CIRCLE), PAIR, "object_missing"),
        (
            _scene("single", RED_CIRCLE, _obj("circle", "red", 0.72, 0.7)),
            _scene("single", RED_CIRCLE),
            "extra_object",
        ),
        (
            _scene("binding", _obj("circle", "red", 0.25, 0.3), _obj("square", "red", 0.72, 0.7)),
            PAIR,
            "color_leaked",
        ),
        (
            _scene("single", _obj("circle", "cyan", 0.5, 0.5)),
            _scene("single", RED_CIRCLE),
            "wrong_color",
        ),
        (
            _scene("binding", _obj("circle", "blue", 0.25, 0.3), _obj("square", "red", 0.72, 0.7)),
            PAIR,
            "colors_swapped",
        ),
        (
            _scene("binding", _obj("star", "red", 0.25, 0.3), BLUE_SQUARE),
            PAIR,
            "wrong_shape",
        ),
        (
            _scene("position", _obj("circle", "red", 0.72, 0.5), _obj("square", "blue", 0.25, 0.5)),
            _scene(
                "position",
                _obj("circle", "red", 0.25, 0.5),
                _obj("square", "blue", 0.72, 0.5),
                relation="left_of",
            ),
            "wrong_relation",
        ),
        (
            _scene("counting", *(_obj("star", "green", x, 0.5, 0.27) for x in (0.2, 0.5))),
            _scene("counting", *(_obj("star", "green", x, 0.5, 0.27) for x in (0.2, 0.5, 0.8))),
            "wrong_count",
        ),
        (
            _scene(
                "counting", _obj("square", "green", 0.3, 0.5), _obj("square", "green", 0.52, 0.5)
            ),
            _scene(
                "counting", _obj("square", "green", 0.2, 0.5), _obj("square", "green", 0.7, 0.5)
            ),
            "objects_merged",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) or v is None else "",
)
def test_failure_reasons(drawn: Scene, asked: Scene, reason: str | None) -> None:
    """Each kind of mistake, drawn on purpose, is named as that mistake."""
    assert _failure(drawn, asked) == reason


def test_input_validation() -> None:
    scene = _scene("single", _obj("circle", "red", 0.5, 0.5)).to_dict()
    good = np.full((64, 64, 3), 235, np.uint8)
    for bad in (good.astype(np.float32), good[..., :2], good[:, :48], good[:16, :16], good[..., 0]):
        with pytest.raises(ValueError, match=r"\(S, S, 3\)"):
            score_image(bad, scene)
    with pytest.raises(ValueError, match="category"):
        score_image(good, {**scene, "category": "style"})
    with pytest.raises(ValueError, match="version"):
        score_image(good, {**scene, "version": 99})
    with pytest.raises(ValueError, match="color"):
        score_image(good, {**scene, "objects": [{"shape": "circle", "color": "teal"}]})
    with pytest.raises(ValueError, match="one scene per image"):
        alignment_report([good], [scene, scene])
