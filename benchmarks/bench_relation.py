"""Does the base model read the relation word? (issue #13)

    python benchmarks/bench_relation.py [--models artifacts/models] [--n 64]

Two measures on the first N held-out position prompts ("a red circle to the left of a blue
square"), each against the same prompt with the opposite relation ("... to the right of
..."), with the same noise:

1. layout: sample the base stage for both captions with the same seeds. A model that
   follows the word swaps the two objects along the relation's axis; one that ignores it
   draws the same layout for both (the seed's noise alone decides where things go).
   Over the pairs where each of the two colors was found exactly once in both images:
   `flipped`, the fraction whose order along the axis changed with the word, and
   `holds` / `holds_flipped`, the evaluator's position verdict for each caption (about
   0.25 at random: the right side, and the relation's axis dominating).
2. mean: what the denoiser predicts at high noise, where the layout is decided, is the
   conditional mean of the images. The contrast of a prediction is its first half minus its
   second half along the relation's axis (left - right, top - bottom), projected on the
   first object's color minus the second's, signed so that "A left of B" should be
   positive. `mean_relation[logsnr]` is (contrast for the caption - contrast for the flipped
   one) / 2, as a fraction of the same contrast in the training images of those relations:
   1 where the prediction moves the colors as much as the data does, 0 where the relation
   word changes nothing.
3. the control: `mean_color[logsnr]`, how far the prediction's mean color moves toward a
   third color when the first object's color word is replaced by it ("a green circle ..."
   for "a red circle ..."), as a fraction of how far the rendered scene's mean color moves
   (the object's share of the image). A model that reads the words but not their order
   scores well here and 0 on the relation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from imagen_ops.cascade import Cascade, load_stage
from imagen_ops.config import load_params
from imagen_ops.data.prepare import PreparedData
from imagen_ops.data.shapes import COLORS, OPPOSITE, Scene, caption_for, render_scene
from imagen_ops.diffusion.objectives import to_x0
from imagen_ops.diffusion.schedules import alpha_sigma
from imagen_ops.eval.alignment import Detection, detect_objects, score_detections
from imagen_ops.images import from_uint8, to_uint8

from common import machine, parse_args, path_options

AXIS = {"left_of": 0, "right_of": 0, "above": 1, "below": 1}  # x, y
SIGN = {"left_of": 1, "right_of": -1, "above": 1, "below": -1}  # A before B along the axis
LOGSNRS = (-6.0, -4.0, -2.0, 0.0)


def offset(dets: list[Detection], scene: dict) -> np.ndarray | None:
    """Centroid of the second object minus the first's, matched by color; None unless
    each color was found exactly once."""
    found = []
    for obj in scene["objects"]:
        same = [d for d in dets if d.color == obj["color"]]
        if len(same) != 1:
            return None
        found.append(np.array(same[0].centroid))
    return found[1] - found[0]


def rgb(name: str) -> torch.Tensor:
    return torch.tensor(COLORS[name], dtype=torch.float32) / 127.5 - 1


def recolored(scene: dict) -> tuple[dict, torch.Tensor]:
    """The scene with its first object in the first color the scene lacks, and the unit
    direction from the old color to the new one."""
    used = {o["color"] for o in scene["objects"]}
    new = next(c for c in COLORS if c not in used)
    first = dict(scene["objects"][0], color=new)
    step = rgb(new) - rgb(scene["objects"][0]["color"])
    return dict(scene, objects=[first, *scene["objects"][1:]]), step / step.dot(step)


def color_shift(before: torch.Tensor, after: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """How far the images' mean color moved along `direction` (B, 3, H, W) -> (B,)."""
    return ((after - before).mean((-2, -1)) * direction).sum(-1)


def contrast(images: torch.Tensor, scenes: list[dict]) -> torch.Tensor:
    """(B,) first half minus second half along each scene's axis, on color A - color B,
    signed by the relation: positive where A comes first as the scene says."""
    out = []
    for image, scene in zip(images, scenes, strict=True):
        half = image.shape[-1] // 2
        axis = -1 if AXIS[scene["relation"]] == 0 else -2
        first = image.narrow(axis, 0, half).mean((-2, -1))
        second = image.narrow(axis, half, half).mean((-2, -1))
        a, b = (rgb(o["color"]) for o in scene["objects"])
        out.append(SIGN[scene["relation"]] * ((first - second) @ (a - b)))
    return torch.stack(out)


def layout(cascade: Cascade, settings, scenes: list[dict], flipped: list[dict]) -> dict:
    seeds = [settings.seed + k for k in range(len(scenes))]
    images = [
        to_uint8(cascade.sample([caption_for(Scene.from_dict(s)) for s in batch], settings, seeds))
        for batch in (scenes, flipped)
    ]
    pairs = changed = holds = holds_flipped = 0
    for a, b, scene, other in zip(*images, scenes, flipped, strict=True):
        dets_a, dets_b = detect_objects(a), detect_objects(b)
        da, db = offset(dets_a, scene), offset(dets_b, other)
        if da is None or db is None:
            continue
        axis = AXIS[scene["relation"]]
        pairs += 1
        changed += bool(np.sign(da[axis]) != np.sign(db[axis]))
        holds += bool(score_detections(dets_a, scene)["position"])
        holds_flipped += bool(score_detections(dets_b, other)["position"])
    return {
        "pairs": pairs,
        "flipped": changed / pairs if pairs else None,
        "holds": holds / pairs if pairs else None,
        "holds_flipped": holds_flipped / pairs if pairs else None,
    }


@torch.no_grad()
def mean_predictions(
    cascade: Cascade, scenes: list[dict], mean_image: torch.Tensor, k: int
) -> dict[float, torch.Tensor]:
    """Per log-SNR, (N, 3, H, W): the prediction for each scene's caption averaged over k
    noise draws around the mean image (the same draws for every caption)."""
    stage = cascade.stages[0]
    objective = stage.config.diffusion.objective
    noise = torch.randn(k, *mean_image.shape, generator=torch.Generator().manual_seed(0))
    text = cascade.encode([caption_for(Scene.from_dict(s)) for s in scenes])
    out = {}
    for logsnr in LOGSNRS:
        alpha, sigma = alpha_sigma(torch.tensor(logsnr))
        x_t = alpha * mean_image + sigma * noise  # the layout is not in x_t yet
        means = []
        for i in range(len(scenes)):
            tokens = text.tokens[i : i + 1].float().expand(k, -1, -1)
            pred = stage.net(
                x_t, torch.full((k,), logsnr), tokens, text.mask[i : i + 1].expand(k, -1)
            )
            means.append(to_x0(pred, x_t, alpha, sigma, objective).mean(0))
        out[logsnr] = torch.stack(means)
    return out


def rendered(scenes: list[dict], resolution: int) -> torch.Tensor:
    images = [np.asarray(render_scene(Scene.from_dict(s), resolution)) for s in scenes]
    return from_uint8(np.stack(images))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    path_options(parser, "models", "prepared")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--noise", type=int, default=8, help="noise draws per prompt (mean)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parse_args(parser)
    params = load_params(args.params)
    print(f"machine: {machine()}\n")

    prepared = PreparedData.open(Path(args.prepared))
    table = prepared.table
    val = [json.loads(s) for s in table["scene"].iloc[prepared.indices("val")]]
    scenes = [s for s in val if s["category"] == "position"][: args.n]
    flipped = [dict(s, relation=OPPOSITE[s["relation"]]) for s in scenes]
    base = load_stage(Path(args.models) / params.stage_names()[0])
    cascade = Cascade([base], params.text)
    settings = params.sample.for_stages([0], len(params.stages))

    train = prepared.indices("train")
    images = prepared.images(base.resolution)
    real = from_uint8(images[train])  # one gathered read of the memory-mapped shards
    train_scenes = [json.loads(s) for s in table["scene"].iloc[train]]
    position = [i for i, s in enumerate(train_scenes) if s["category"] == "position"]
    data = float(contrast(real[position], [train_scenes[i] for i in position]).mean())

    recolor = [recolored(s) for s in scenes]
    other = [r for r, _ in recolor]
    directions = torch.stack([d for _, d in recolor])
    res = base.resolution
    truth = color_shift(rendered(scenes, res), rendered(other, res), directions).mean()
    preds = {
        name: mean_predictions(cascade, batch, real.mean(0), args.noise)
        for name, batch in (("caption", scenes), ("flipped", flipped), ("recolored", other))
    }
    relation, color = {}, {}
    for logsnr in LOGSNRS:
        caption = preds["caption"][logsnr]
        # the flipped scenes' signs are opposite, so the sum is twice the word's effect
        both = contrast(caption, scenes) + contrast(preds["flipped"][logsnr], flipped)
        relation[f"{logsnr:g}"] = float(both.mean() / 2 / data)
        moved = color_shift(caption, preds["recolored"][logsnr], directions).mean()
        color[f"{logsnr:g}"] = float(moved / truth)
    result = {
        "prompts": len(scenes),
        **layout(cascade, settings, scenes, flipped),
        "data_contrast": data,
        "mean_relation": relation,
        "mean_color": color,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
