"""The contrastive scorer: hard negatives differ by one fact, training learns, I/O is exact."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from imagen_ops.config import ScorerConfig, SynthConfig
from imagen_ops.data.shapes import (
    NUMBERS,
    OPPOSITE,
    RELATION_WORDS,
    RELATIONS,
    caption_for,
    hard_negatives,
    sample_scene,
)
from imagen_ops.images import from_uint8
from imagen_ops.scorer import Scorer, load_scorer
from imagen_ops.text.cache import CacheMismatchError, EmbeddingCache, build_cache, stored_rows
from imagen_ops.text.encoders import TextEmbeddings
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


def test_hard_negatives_keep_the_scene_phrasing() -> None:
    """A caption in another phrasing ("left of") gets negatives in that phrasing ("right
    of"): what differs from the true caption is the one fact, never the wording."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = replace(sample_scene(rng, SynthConfig(categories={"position": 1.0})), phrasing=1)
        true, flipped = caption_for(scene), hard_negatives(scene, rng)["relation_flip"]
        words = RELATION_WORDS[scene.relation][1], RELATION_WORDS[OPPOSITE[scene.relation]][1]
        assert words[0] in true and flipped == true.replace(words[0], words[1])


def test_the_caption_bank_encodes_only_what_the_cache_lacks(tiny_data, tmp_path) -> None:
    """Captions the cache holds (the records' own, and negatives that happen to be other
    records' captions) are copied, not encoded again; every row equals its encoding."""
    from imagen_ops.data.prepare import PreparedData
    from imagen_ops.text.encoders import load_text_encoder
    from imagen_ops.train.scorer import _CaptionBank, negatives_for

    layer = 2  # the scorer's own layer, not text.layer (the last)
    params = tiny_params(f"text.scorer_layer={layer}")
    encoder, encoded = load_text_encoder(params.text), []
    original = encoder.iter_passes

    def counting(texts, lengths, layers):
        encoded.extend(texts)
        return original(texts, lengths, layers)

    table = PreparedData.open(tiny_data["prepared"]).table
    captions = table["caption"].tolist()
    build_cache(captions, encoder, tmp_path / "cache", extra_layers=[layer], progress=False)
    encoder.iter_passes = counting
    cache = EmbeddingCache.open(tmp_path / "cache", params.text, captions)
    records = np.arange(len(table))
    negatives = negatives_for(table, records, 0)
    bank = _CaptionBank(captions, negatives, cache, encoder, params.text, layer, False)
    held = cache.row_of_caption()
    assert encoded and not set(encoded) & set(held)  # only new captions were encoded
    assert len(encoded) == len(set(encoded))  # each once
    for r in records[:8]:
        mine, theirs = bank.embeddings(bank.captions[[r]]), cache.lookup(np.array([r]), layer)
        torch.testing.assert_close(mine.tokens, theirs.tokens, rtol=0, atol=0)
    some = [c for d in negatives for c in d.values() if c not in held][:4]
    live = encoder.encode(some, layer).as_stored()
    stored = bank.embeddings(np.array([bank.row[c] for c in some]))
    torch.testing.assert_close(stored.tokens, live.tokens, rtol=0, atol=1e-3)
    # a cache without the scorer's layer is refused before training starts
    paths = ScorerPaths(tiny_data["prepared"], tiny_data["cache"], tmp_path / "s", tmp_path / "m")
    with pytest.raises(CacheMismatchError, match=r"text\.scorer_layer"):
        train_scorer(scorer_config(), params.text, 16, paths, encoder=encoder)
    # with it, the saved scorer records the layer it was trained on
    paths = ScorerPaths(tiny_data["prepared"], tmp_path / "cache", tmp_path / "s", tmp_path / "m")
    train_scorer(scorer_config(steps=2), params.text, 16, paths, encoder=encoder, progress=False)
    assert load_scorer(paths.out).text_layer == layer


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


@pytest.mark.parametrize("map_size", [4, 8])
def test_the_image_tower_ends_in_the_configured_map(map_size: int) -> None:
    """`scorer.map_size` is the side of the map the head reads whole (relations need it)."""
    tower = Scorer(scorer_config(map_size=map_size), 32, 8).image
    assert tower.body(torch.zeros(2, 3, 32, 32)).shape[-2:] == (map_size, map_size)
    assert tower.head.in_features % (map_size * map_size) == 0


def test_the_text_head_reads_word_order() -> None:
    """The same tokens in another order embed differently: "a red circle above a blue
    square" and "a blue square above a red circle" must not be one caption to the scorer
    (without position encodings the head is permutation-invariant)."""
    torch.manual_seed(0)
    scorer = Scorer(scorer_config(), 16, 8)
    tokens = torch.randn(1, 5, 8)
    mask = torch.ones(1, 5, dtype=torch.bool)
    order = torch.tensor([3, 4, 2, 0, 1])
    first = scorer.embed_text(TextEmbeddings(tokens, mask))
    swapped = scorer.embed_text(TextEmbeddings(tokens[:, order], mask))
    assert (first - swapped).abs().max() > 1e-3


def test_the_text_head_computes_torchs_layer_and_attention_pooling() -> None:
    """The head keeps nn.TransformerEncoderLayer's and nn.MultiheadAttention's parameters
    and their function, so a scorer trained through torch's modules loads and scores the
    same; it only sums in an order that does not follow the batch."""
    from imagen_ops.models.unet import position_encoding

    torch.manual_seed(0)
    head = Scorer(scorer_config(), 16, 8).text
    torch_layer = torch.nn.TransformerEncoderLayer(
        head.proj.out_features,
        4,
        2 * head.proj.out_features,
        0.0,
        batch_first=True,
        norm_first=True,
    )
    torch_layer.load_state_dict(head.layer.state_dict())
    tokens = torch.randn(3, 6, 8)
    mask = torch.arange(6)[None, :] < torch.tensor([[6], [3], [1]])
    pad = ~mask
    x = head.proj(tokens)
    x = torch_layer(x + position_encoding(*x.shape[1:]), src_key_padding_mask=pad)
    query = head.query.expand(3, -1, -1)
    pooled, _ = head.pool(query, x, x, key_padding_mask=pad)
    torch.testing.assert_close(
        head(TextEmbeddings(tokens, mask)), head.out(pooled[:, 0]), rtol=1e-5, atol=1e-6
    )


def stand_in_embeddings(
    tokens: np.ndarray, lengths: np.ndarray
) -> Callable[[np.ndarray], TextEmbeddings]:
    """A caption bank's `embeddings(rows)` over stored tokens, with no cache on disk."""
    return lambda rows: stored_rows(tokens, lengths, rows)


def test_repeated_caption_rows_are_embedded_once_with_the_same_values_and_gradients() -> None:
    """A step embeds each distinct bank row once and gathers: the embeddings and the text
    head's gradients are those of embedding every row (repeats included) on its own."""
    from imagen_ops.train.scorer import _embed_rows

    torch.manual_seed(0)
    scorer = Scorer(scorer_config(), 16, 8)
    tokens = np.random.default_rng(0).normal(size=(6, 5, 8)).astype(np.float16)
    embeddings = stand_in_embeddings(tokens, np.array([5, 3, 4, 2, 5, 1], dtype=np.int32))
    rows = np.array([4, 1, 1, 3, 4, 4, 0, 1])
    weights = torch.randn(len(rows), scorer.cfg.embed_dim)

    def embed_and_grad(fn):
        scorer.zero_grad()
        out = fn()
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in scorer.text.parameters()]

    once, once_grad = embed_and_grad(lambda: _embed_rows(scorer, embeddings, rows))
    every, every_grad = embed_and_grad(lambda: scorer.embed_text(embeddings(rows)))
    assert torch.equal(once, every)
    for a, b in zip(once_grad, every_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_repeated_caption_rows_give_the_same_gradients_every_time() -> None:
    """Training is deterministic only if gathering repeated rows is: at the demo's sizes
    (256 rows, 179 distinct, 128 dimensions) indexing's backward summed repeats in a
    varying order (~1 run in 50 differed in its last bits)."""
    from imagen_ops.train.scorer import _embed_rows

    torch.manual_seed(0)
    scorer = Scorer(ScorerConfig(), 16, 8)
    tokens = np.random.default_rng(0).normal(size=(179, 3, 8)).astype(np.float16)
    embeddings = stand_in_embeddings(tokens, np.full(179, 3, np.int32))
    rows = np.concatenate([np.arange(179), np.random.default_rng(1).integers(0, 179, 77)])
    weights = torch.randn(len(rows), scorer.cfg.embed_dim)

    def gradient() -> torch.Tensor:
        scorer.zero_grad()
        (_embed_rows(scorer, embeddings, rows) * weights).sum().backward()
        return scorer.text.proj.weight.grad.clone()

    first = gradient()
    assert all(torch.equal(gradient(), first) for _ in range(100))


def test_the_hard_loss_ranks_the_caption_against_its_own_negatives() -> None:
    """With hard negatives equal to the true caption the hard term is exactly log(1 + k)
    (k tied logits); weight 0 leaves plain InfoNCE."""
    from imagen_ops.train.scorer import _loss

    torch.manual_seed(0)
    scorer = Scorer(scorer_config(), 16, 8)
    b, k = 4, 3
    images = torch.rand(b, 3, 16, 16) * 2 - 1
    pos = TextEmbeddings(torch.randn(b, 5, 8), torch.ones(b, 5, dtype=torch.bool))
    text = TextEmbeddings(
        torch.cat([pos.tokens, pos.tokens.repeat_interleave(k, 0)]),
        torch.cat([pos.mask, pos.mask.repeat_interleave(k, 0)]),
    )
    ids = np.arange(b)
    with torch.no_grad():
        pos, text = scorer.embed_text(pos), scorer.embed_text(text)
        plain = _loss(scorer, images, pos, ids, 1.0)
        zero = _loss(scorer, images, text, ids, 0.0)
        one = _loss(scorer, images, text, ids, 1.0)
        two = _loss(scorer, images, text, ids, 2.0)
    assert float(zero) > float(plain)  # the negatives also join the batch's captions
    assert float(one - zero) == pytest.approx(np.log(1 + k), rel=1e-5)
    assert float(two - zero) == pytest.approx(2 * np.log(1 + k), rel=1e-5)


def test_every_category_gets_the_same_share_of_batches() -> None:
    import pandas as pd

    from imagen_ops.train.scorer import category_weights

    rng = np.random.default_rng(0)
    cfg = SynthConfig(categories={"single": 0.4, "binding": 0.2, "counting": 0.3, "position": 0.1})
    scenes = [sample_scene(rng, cfg) for _ in range(200)]
    table = pd.DataFrame({"scene": [json.dumps(s.to_dict()) for s in scenes]})
    records = np.arange(50, 200)
    weights = category_weights(table, records)
    share = Counter()
    for r, w in zip(records, weights, strict=True):
        share[scenes[r].category] += w
    assert sum(weights) == pytest.approx(1.0)
    assert all(v == pytest.approx(0.25) for v in share.values()) and len(share) == 4
    table.loc[60, "scene"] = None  # data without scene specs (ingested): uniform
    assert category_weights(table, records) is None


def test_scorer_rejects_what_it_cannot_use(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train-scorer"):
        load_scorer(tmp_path)
    scorer = Scorer(scorer_config(), 16, 8, text_layer=3)
    scorer.save(tmp_path / "s")
    assert load_scorer(tmp_path / "s").text_layer == 3  # the layer it reads travels
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**config, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        load_scorer(tmp_path / "s")
    # format 3 recorded no layer: it read the cache's text.layer, which the caller knows
    old = {k: v for k, v in config.items() if k != "text_layer"}
    (tmp_path / "s" / "config.json").write_text(json.dumps({**old, "format": 3}))
    with pytest.raises(ValueError, match="format 3"):
        load_scorer(tmp_path / "s")
    assert load_scorer(tmp_path / "s", cache_layer=2).text_layer == 2
    assert torch.isfinite(scorer.scale)


def test_best_of_n_scores_a_prompt_alone_as_among_others_bit_for_bit(tiny_models) -> None:
    """Each prompt's candidates are scored together with its text at its own width, so a
    prompt's scores, and so its pick, do not depend on the prompts sampled beside it."""
    from imagen_ops.cascade import Cascade

    params = tiny_params()
    cascade = Cascade.from_dir(tiny_models, params.stage_names(), params.text)
    torch.manual_seed(0)
    cascade.scorer = scorer = Scorer(params.scorer, 16, 384).eval()
    recorded: list[torch.Tensor] = []
    similarity = scorer.similarity

    def recording(images, text):
        recorded.append(similarity(images, text))
        return recorded[-1]

    scorer.similarity = recording
    prompts, seeds = ["a red circle", "a green star to the left of a yellow triangle"], [3, 11]
    assert len(set(cascade.widths(prompts))) == 2
    settings = params.sample.updated(rerank=3)
    together = cascade.sample(prompts, settings, seeds)
    scores_together, recorded[:] = torch.cat(recorded), []
    alone = torch.cat([cascade.sample([prompts[k]], settings, [seeds[k]]) for k in range(2)])
    assert torch.equal(torch.cat(recorded), scores_together)
    assert torch.equal(alone, together)


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
    # a model registered with a format-3 scorer (no recorded layer) still loads, as the
    # champion the next scheduled run compares against: it read the cascade's text.layer
    config_path = root / "scorer" / "config.json"
    config = json.loads(config_path.read_text())
    del config["text_layer"]
    config_path.write_text(json.dumps({**config, "format": 3}))
    assert Cascade.from_dir(root).scorer.text_layer == params.text.layer
