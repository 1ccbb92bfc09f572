"""The contrastive scorer: hard negatives differ by one fact, training learns, I/O is exact."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from imagen_ops.config import ScorerConfig, SynthConfig
from imagen_ops.data.shapes import (
    NUMBERS,
    RELATIONS,
    caption_for,
    hard_negatives,
    sample_scene,
)
from imagen_ops.images import from_uint8
from imagen_ops.scorer import Scorer, load_scorer
from imagen_ops.text.cache import EmbeddingCache
from imagen_ops.train.scorer import ScorerPaths, train_scorer, word_swap

from .conftest import TINY_SCORER, tiny_params

CATEGORIES = ("single", "binding", "counting", "position")


@pytest.mark.parametrize("category", CATEGORIES)
def test_hard_negatives_change_exactly_one_fact(category: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, SynthConfig(categories={category: 1.0}))
        true = caption_for(scene)
        negatives = hard_negatives(scene, rng)
        assert {"color_change", "shape_change"} <= set(negatives)
        assert true not in negatives.values()
        if "color_swap" in negatives:  # the same words, other bindings
            swapped = negatives["color_swap"]
            assert Counter(swapped.replace("an ", "a ").split()) == Counter(
                true.replace("an ", "a ").split()
            )
        if category == "position":
            flipped = negatives["relation_flip"]
            assert sum(RELATIONS[r] in flipped for r in RELATIONS) == 1
            assert flipped.split()[:3] == true.split()[:3]
        if category == "counting":
            assert negatives["count_change"].split()[0] in NUMBERS.values()
            assert negatives["count_change"].split()[1:] == true.split()[1:]
        assert ("color_swap" in negatives) == (
            category in ("binding", "position")
            and len({o.color for o in scene.objects}) == 2
            and len({o.shape for o in scene.objects}) == 2
        )


def test_word_swap() -> None:
    rng = np.random.default_rng(0)
    swapped = word_swap("a cat on a mat", rng)
    assert swapped != "a cat on a mat" and sorted(swapped.split()) == sorted(
        ["a", "cat", "on", "a", "mat"]
    )
    assert word_swap("cat", rng) is None and word_swap("a a", rng) is None


def scorer_config(**changes) -> ScorerConfig:
    return ScorerConfig(**{**TINY_SCORER, **changes})


def test_scorer_trains_saves_and_reports(tiny_data, tmp_path) -> None:
    from imagen_ops.text.encoders import load_text_encoder

    params = tiny_params()
    encoder = load_text_encoder(params.text)

    def run(name: str):
        paths = ScorerPaths(
            tiny_data["prepared"], tiny_data["cache"], tmp_path / name, tmp_path / f"{name}.json"
        )
        report = train_scorer(
            scorer_config(), params.text, 16, paths, encoder=encoder, progress=False
        )
        return paths, report

    paths, report = run("a")
    assert report["loss_end"] < 0.9 * report["loss_start"]  # it learns
    assert json.loads(paths.metrics.read_text()) == report
    accuracy = report["hard_negative_accuracy"]
    assert {"color_change", "shape_change"} <= set(accuracy)
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert all(n > 0 for n in report["hard_negative_n"].values())

    # the saved scorer is the trained one, and training is deterministic
    scorer = load_scorer(paths.out)
    again, _ = run("b")
    first = (paths.out / "scorer.safetensors").read_bytes()
    assert (again.out / "scorer.safetensors").read_bytes() == first
    cache = EmbeddingCache.open(tiny_data["cache"], params.text, scorer_captions(tiny_data))
    from imagen_ops.data.prepare import PreparedData

    prepared = PreparedData.open(tiny_data["prepared"])
    records = prepared.indices("val")[:4]
    images = from_uint8(prepared.images(32)[records])  # any size: resized to 16 px
    cos = scorer.similarity(images, cache.lookup(records))
    assert cos.shape == (4,) and bool(((cos >= -1) & (cos <= 1)).all())


def scorer_captions(tiny_data) -> list[str]:
    from imagen_ops.data.prepare import PreparedData

    return PreparedData.open(tiny_data["prepared"]).table["caption"].tolist()


def test_scorer_rejects_what_it_cannot_use(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train-scorer"):
        load_scorer(tmp_path)
    scorer = Scorer(scorer_config(), 16, 8)
    scorer.save(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**config, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        load_scorer(tmp_path / "s")
    assert torch.isfinite(scorer.scale)


def test_a_packaged_model_carries_its_scorer_and_reranks(tiny_models, tmp_path) -> None:
    from imagen_ops.cascade import Cascade
    from imagen_ops.registry.pyfunc import ModelSpec, package_cascade

    params = tiny_params()
    torch.manual_seed(0)
    scorer = Scorer(params.scorer, 16, 384)
    scorer.save(tmp_path / "scorer")
    plain = package_cascade(tiny_models, ModelSpec.from_params(params), tmp_path / "plain")
    assert Cascade.from_dir(plain).scorer is None
    root = package_cascade(
        tiny_models, ModelSpec.from_params(params), tmp_path / "pkg", tmp_path / "scorer"
    )
    cascade = Cascade.from_dir(root)
    assert cascade.scorer is not None
    loaded = cascade.scorer.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in scorer.state_dict().items())
    images = cascade.sample(["a red circle"], params.sample.updated(rerank=2), [0])
    assert images.shape == (1, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="no scorer"):
        package_cascade(tiny_models, ModelSpec.from_params(params), tmp_path / "x", tmp_path)
