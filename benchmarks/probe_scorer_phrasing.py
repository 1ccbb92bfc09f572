"""Does the scorer read a relation in every phrasing? Relation flips by phrasing (#13, #14).

    python benchmarks/probe_scorer_phrasing.py [--scorer artifacts/scorer]

Every validation position scene, captioned in each of the generator's phrasings ("to the
left of", "left of", "to the left side of", ...): how often the scorer ranks the image's
caption above the same caption with the opposite relation. `train_scorer`'s own
`relation_flip` accuracy is this over the captions the data has, so a scorer trained on
one template can pass it and still fail on words the user types.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from imagen_ops.config import load_params
from imagen_ops.data.prepare import PreparedData
from imagen_ops.data.shapes import OPPOSITE, PHRASINGS, Scene, caption_for
from imagen_ops.images import from_uint8
from imagen_ops.scorer import load_scorer
from imagen_ops.text.encoders import load_text_encoder

from common import machine, parse_args, path_options


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    path_options(parser, "scorer", "prepared")
    args = parse_args(parser)
    params = load_params(args.params)
    print(f"machine: {machine()}\n")

    scorer = load_scorer(Path(args.scorer))
    prepared = PreparedData.open(Path(args.prepared))
    specs = prepared.table["scene"]
    records = [
        r for r in prepared.indices("val") if json.loads(specs.iloc[r])["category"] == "position"
    ]
    scenes = [Scene.from_dict(json.loads(specs.iloc[r])) for r in records]
    images = scorer.embed_images(from_uint8(prepared.images(scorer.resolution)[np.array(records)]))
    encoder = load_text_encoder(params.text)

    def cosines(captions: list[str]) -> torch.Tensor:
        text = scorer.embed_text(encoder.encode(captions, layer=scorer.text_layer))
        return (images * text).sum(-1)

    for k in range(PHRASINGS["position"]):
        phrased = [replace(s, phrasing=k) for s in scenes]
        true = cosines([caption_for(s) for s in phrased])
        flipped = cosines([caption_for(replace(s, relation=OPPOSITE[s.relation])) for s in phrased])
        wins = (true > flipped).float().mean().item()
        example = caption_for(phrased[0])
        print(f"phrasing {k} ({example!r}): relation flips {wins:.3f} of {len(scenes)}")


if __name__ == "__main__":
    main()
