"""Does the frozen text encoder's token sequence say which color goes with which shape?

    python benchmarks/probe_encoder.py [--params params.yaml] [--out probe.json]

Imagen conditions the U-Net on the encoder's token embeddings; binding ("a red circle and
a blue square") and relations can only be learned if each noun's token tells its color and
its place. For every hidden layer of the configured encoder, linear probes (logistic
regression on the standardised token vector) read from the token of each noun:
- the color bound to it (8 colors; chance 0.125),
- the relation between the two objects, read at the second noun (4 relations; 0.25).
Two-object captions of the data generator's words, every ordered color / shape / relation
combination; the probes are tested on captions whose color pair never occurs in training,
so they must read the binding, not remember the pair. The last layer is what the U-Net
sees (`text.encoder`); an earlier layer that reads better would be a candidate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from imagen_ops.config import load_params
from imagen_ops.data.shapes import COLORS, RELATIONS, SHAPES, Scene, SceneObject, caption_for
from imagen_ops.text.encoders import load_text_encoder

from common import machine, table


def captions() -> list[dict]:
    """Every two-object caption the generator writes (`caption_for`): binding and the four
    relations, each ordered color and shape pair."""
    rows = []
    for (c1, c2), (s1, s2) in itertools.product(
        itertools.permutations(COLORS, 2), itertools.permutations(SHAPES, 2)
    ):
        objects = (SceneObject(s1, c1, 0.3, (0.3, 0.5)), SceneObject(s2, c2, 0.3, (0.7, 0.5)))
        for category, relation in [("binding", None)] + [("position", r) for r in RELATIONS]:
            scene = Scene(category, objects, (255, 255, 255), "plain", relation)
            rows.append({"text": caption_for(scene), "colors": (c1, c2), "relation": relation})
    return rows


@torch.no_grad()
def noun_tokens(encoder, texts: list[str], batch: int = 128) -> list[torch.Tensor]:
    """Per hidden layer, (N, 2, D): the first token of each caption's two nouns (words 2
    and -1: "a red circle ... a blue square")."""
    layers: list[list[torch.Tensor]] = []
    for i in range(0, len(texts), batch):
        enc = encoder.tokenizer(texts[i : i + batch], padding=True, return_tensors="pt")
        hidden = encoder.model(**enc.to(encoder.device), output_hidden_states=True).hidden_states
        index = []
        for j in range(len(enc["input_ids"])):
            words = enc.word_ids(j)
            last = max(w for w in words if w is not None)
            index.append([words.index(2), words.index(last)])
        index = torch.tensor(index, device=encoder.device)[..., None]
        layers = layers or [[] for _ in hidden]
        for parts, h in zip(layers, hidden, strict=True):
            parts.append(h.gather(1, index.expand(-1, -1, h.shape[-1])).float().cpu())
    return [torch.cat(parts) for parts in layers]


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularised logistic regression fitted on `train`."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(x[train]), y[train]).backward()
        opt.step()
    return (head(x[~train]).argmax(1) == y[~train]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--held-out", type=float, default=0.5, help="fraction of color pairs")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    params = load_params(args.params)
    rows = captions()
    pairs = sorted({r["colors"] for r in rows})
    test_pairs = set(random.Random(0).sample(pairs, round(args.held_out * len(pairs))))
    train = torch.tensor([r["colors"] not in test_pairs for r in rows])
    color = {c: i for i, c in enumerate(COLORS)}
    relation = {r: i for i, r in enumerate(RELATIONS)}
    c1 = torch.tensor([color[r["colors"][0]] for r in rows])
    c2 = torch.tensor([color[r["colors"][1]] for r in rows])
    spatial = torch.tensor([r["relation"] is not None for r in rows])
    rel = torch.tensor([relation[r["relation"]] for r in rows if r["relation"]])

    encoder = load_text_encoder(params.text)
    layers = noun_tokens(encoder, [r["text"] for r in rows])
    results = []
    for k, tokens in enumerate(layers):
        results.append(
            {
                "layer": k,
                "color_of_noun1": probe(tokens[:, 0], c1, train),
                "color_of_noun2": probe(tokens[:, 1], c2, train),
                "relation_at_noun2": probe(tokens[spatial, 1], rel, train[spatial]),
            }
        )
    print(f"{machine()}\n{params.text.encoder}: {len(rows)} captions, {int(train.sum())} train")
    print(table(list(results[0]), [list(r.values()) for r in results]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
