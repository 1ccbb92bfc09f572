"""Evaluation: FID / KID on Inception features, the CLIP score adapter, the evaluate stage."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_ops.cascade import Cascade, cascade_digest
from imagen_ops.config import SampleConfig, SynthConfig, flatten
from imagen_ops.eval import evaluate as evaluate_module
from imagen_ops.eval.alignment import CATEGORIES
from imagen_ops.eval.fid import (
    FEATURES,
    InceptionFeatures,
    cached_features,
    fid_kid,
    frechet_distance,
)
from imagen_ops.images import FAIL, PASS
from imagen_ops.scorer import Scorer

from .conftest import tiny_params

N = 10


def synth_images(n: int, seed: int) -> np.ndarray:
    """n rendered shapes scenes, uint8 (n, 32, 32, 3)."""
    from imagen_ops.data.sources import synth_source

    cfg = SynthConfig(n=n, seed=seed, resolution=32)
    return np.stack([np.asarray(Image.open(io.BytesIO(r.data))) for r in synth_source(cfg)])


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures(batch_size=2 * N)


@pytest.fixture(scope="module")
def features(extractor) -> dict[str, torch.Tensor]:
    """Inception features of N real scenes and N uniform-noise images, computed once."""
    real = synth_images(N, seed=1)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    feats = extractor(np.concatenate([real, noise]))
    assert feats.shape == (2 * N, FEATURES) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all()
    return {"real": feats[:N], "noise": feats[N:]}


# ------------------------------------------------------------------------ FID / KID


@pytest.mark.parametrize(("n_real", "n_fake"), [(10, 10), (9, 6), (40, 50), (12, 60)])
def test_frechet_distance_matches_the_covariance_formula(n_real, n_fake) -> None:
    """Both branches (nuclear norm for N <= width, symmetric square root above) agree with
    torchmetrics' eigvals formula on covariances built from the same features."""
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(n_real)
    real = torch.randn(n_real, 16, generator=g, dtype=torch.float64)
    fake = 1.5 * torch.randn(n_fake, 16, generator=g, dtype=torch.float64) + 0.3
    expected = _compute_fid(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    assert frechet_distance(real, fake) == pytest.approx(float(expected), rel=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_noise_is_far(features) -> None:
    real, noise = features["real"], features["noise"]
    same = fid_kid(real, real)
    assert abs(same["fid"]) < 1e-3
    far = fid_kid(real, noise)
    assert far["fid"] > 100
    assert (far["num_real"], far["num_fake"]) == (N, N)


def test_kid_on_small_sets(features) -> None:
    real, noise = features["real"], features["noise"]
    same, far = fid_kid(real, real, with_fid=False), fid_kid(real, noise, with_fid=False)
    assert same["kid_subset_size"] == far["kid_subset_size"] == N // 2
    assert same["fid"] is None
    # identical sets: zero within the spread over subsets; noise: clearly above it
    assert abs(same["kid_mean"]) < 3 * same["kid_std"]
    assert far["kid_mean"] > 5 * abs(same["kid_mean"])
    assert far["kid_mean"] > 3 * far["kid_std"]
    # the subset size adapts to the smaller set instead of raising
    small = fid_kid(real[:3], noise, with_fid=False)
    assert small["kid_subset_size"] == 2 and small["kid_mean"] > 0
    # the same features give the same KID (subsets are seeded)
    assert fid_kid(real, noise, with_fid=False) == far
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_kid(real[:1], noise)


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 32, 32, 3), dtype=np.float32),  # float, not uint8
        np.zeros((2, 3, 32, 32), dtype=np.uint8),  # channels first
        np.zeros((32, 32, 3), dtype=np.uint8),  # a single image without batch axis
        np.zeros((2, 32, 32, 4), dtype=np.uint8),  # RGBA
    ],
)
def test_inception_rejects_bad_input(extractor, images) -> None:
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, H, W, 3\)"):
        extractor(images)


def test_inception_gets_channels_last_input_in_its_expected_range(extractor, monkeypatch) -> None:
    """The network sees (N, 3, 299, 299) in [-1, 1], laid out channels_last: the layout
    oneDNN's convolutions run 1.2x faster in (benchmarks/bench_fid.py), which NHWC images
    keep through the permute; a `.contiguous()` on the way would lose it."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return torch.zeros(len(x), FEATURES)

    monkeypatch.setattr(extractor, "net", Recorder())
    images = np.stack([np.full((32, 32, 3), v, dtype=np.uint8) for v in (0, 128, 255)])
    assert extractor(images).shape == (3, FEATURES)
    (x,) = seen
    assert x.shape == (3, 3, 299, 299)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous(), "NCHW-contiguous: the slower layout"
    assert x[0].max() == -1 and x[1].abs().max() == 0 and x[2].min() == pytest.approx(127 / 128)


def test_cached_features_are_computed_once_per_pixels_and_network(tmp_path) -> None:
    """Keyed by the images' bytes: the same data version resized another way (a change in
    prepare) is another entry, as is another network or device."""
    calls = []

    class FakeExtractor:
        identity = "default_1.pt:100:cpu"

        def __call__(self, images: np.ndarray, progress: bool = False) -> torch.Tensor:
            calls.append(len(images))
            return torch.arange(len(images) * 4, dtype=torch.float64).reshape(len(images), 4)

    extractor = FakeExtractor()
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    first = cached_features(tmp_path, images, extractor)
    again = cached_features(tmp_path, images.copy(), extractor)
    assert calls == [3], "the second call reads the cache"
    assert torch.equal(first, again) and again.dtype == torch.float64
    resized = images.copy()
    resized[0, 0, 0, 0] = 1  # one pixel
    cached_features(tmp_path, resized, extractor)
    extractor.identity = "default_1.pt:100:cuda"
    cached_features(tmp_path, images, extractor)
    assert calls == [3, 3, 3]
    assert len(list(tmp_path.glob("inception_*.pt"))) == 3


# ----------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialised CLIPModel + CLIPProcessor (BPE tokenizer from files)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    root = tmp_path_factory.mktemp("clip")
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    tokens += ["re", "red</w>", "ci", "cir"]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\nc i\nci r\n")
    tokenizer = CLIPTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"))
    assert tokenizer.tokenize("a red circle")[:3] == ["a</w>", "red</w>", "cir"]
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = {
        "vocab_size": len(tokens),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    out = root / "model"
    model.save_pretrained(out)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return out


CAPTIONS = ["a red circle", "two blue squares", "a green star above a red circle"]


def test_clip_identical_pairs_score_100(tiny_clip) -> None:
    from torchmetrics.multimodal.clip_score import CLIPScore

    from imagen_ops.eval.clip_score import load_clip

    model, processor = load_clip(str(tiny_clip))
    for name in ("get_image_features", "get_text_features"):
        assert callable(getattr(model, name))
    images = torch.from_numpy(synth_images(3, seed=2)).permute(0, 3, 1, 2)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    assert float(metric(images, images).detach()) == pytest.approx(100.0, abs=1e-3)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    assert float(metric(CAPTIONS, CAPTIONS).detach()) == pytest.approx(100.0, abs=1e-3)
    # different texts are not identical for this model (the tokenizer is not degenerate)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    assert float(metric(CAPTIONS, CAPTIONS[::-1]).detach()) < 100.0 - 1e-3


def test_clip_score_is_the_clamped_mean_cosine(tiny_clip) -> None:
    from imagen_ops.eval.clip_score import clip_score, load_clip

    images = synth_images(3, seed=3)
    score = clip_score(images, CAPTIONS, str(tiny_clip), batch_size=2)
    assert isinstance(score, float) and 0.0 <= score <= 100.0
    # the same number from the wrapped model directly: max(100 * mean cos(image, text), 0)
    model, processor = load_clip(str(tiny_clip))
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = processor(text=CAPTIONS, return_tensors="pt", padding=True)
        a = model.get_image_features(pixels)
        b = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert score == pytest.approx(max(100 * float(cosine.mean()), 0.0), abs=1e-3)


# ----------------------------------------------------------------------- the report


def test_report_without_alignment_or_kid(tmp_path) -> None:
    from imagen_ops.eval.report import write_report

    sweep = [
        {
            "guidance": w,
            "alignment.balanced": None,
            "kid_mean": None,
            "kid_std": None,
            "clip_score": None,
        }
        for w in (1.0, 3.0)
    ]
    metrics = {"version": 1, "fid": None, "alignment": None, "sampling": {"steps": [4, 2]}}
    write_report(tmp_path, metrics, sweep, Image.new("RGB", (64, 64)))
    page = (tmp_path / "report.html").read_text()
    assert "sampling.steps" in page and "data:image/png;base64," in page
    assert Image.open(tmp_path / "sweep.png").size == (500, 320)  # the 5 x 3.2 in chart


# ----------------------------------------------------------------- the evaluate stage


def run_evaluate(params, tiny_data, tiny_models, paths) -> dict:
    """The evaluate stage on the tiny models, as the CLI wires it."""
    prompts = evaluate_module.held_out(
        tiny_data["prepared"],
        tiny_data["cache"],
        params.text,
        params.eval,
        params.text.scorer_layer,
    )
    cascade = Cascade.from_dir(tiny_models, params.stage_names(), params.text)
    digest = cascade_digest(tiny_models, params.stage_names())
    torch.manual_seed(0)
    scorer = Scorer(params.scorer, 16, prompts.text.tokens.shape[-1]).eval()
    cascade.scorer = scorer
    return evaluate_module.evaluate(
        params.eval,
        params.sample,
        evaluate_module.cascade_sampler(cascade, progress=False),
        prompts,
        paths,
        stage_count=len(params.stages),
        model_sha256=digest,
        device="cpu",
        scorer=scorer,
    )


@pytest.mark.integration
def test_reranked_numbers_sit_beside_the_plain_ones(tiny_data, tiny_models, tmp_path) -> None:
    """sample.rerank in the evaluate stage adds a `reranked` section; the headline numbers
    stay those of plain sampling."""
    plain = run_evaluate(tiny_params(), tiny_data, tiny_models, eval_paths(tmp_path / "a"))
    params = tiny_params("sample.rerank=2")
    both = run_evaluate(params, tiny_data, tiny_models, eval_paths(tmp_path / "b"))
    reranked = both.pop("reranked")
    assert "reranked" not in plain
    assert both["alignment"] == plain["alignment"] and both["kid_mean"] == plain["kid_mean"]
    assert reranked["rerank"] == 2 and set(reranked["alignment"]) == set(plain["alignment"])
    assert isinstance(reranked["in_domain_clip_score"], float)  # scored, not left out


class RecordingScorer(torch.nn.Module):
    """A stand-in scorer reading `text_layer`: it keeps the text it was given."""

    def __init__(self, text_layer: int):
        super().__init__()
        self.text_layer, self.sha256, self.seen = text_layer, "-", []

    def similarity(self, images: torch.Tensor, text) -> torch.Tensor:
        self.seen.append(text)
        return torch.zeros(len(images))


def test_evaluation_scores_the_prompts_at_the_scorers_layer(tiny_data, tmp_path) -> None:
    """The in-domain CLIP score reads the held-out prompts at the scorer's layer (from the
    cache's extra layer), not at the U-Net's; prompts without them are refused."""
    from imagen_ops.data.prepare import PreparedData
    from imagen_ops.text.cache import build_cache
    from imagen_ops.text.encoders import load_text_encoder

    params = tiny_params("eval.fid=false", "eval.guidance_sweep=[]")
    captions = PreparedData.open(tiny_data["prepared"]).table["caption"].tolist()
    encoder = load_text_encoder(params.text)
    build_cache(captions, encoder, tmp_path / "cache", extra_layers=[2], progress=False)
    prompts = evaluate_module.held_out(
        tiny_data["prepared"], tmp_path / "cache", params.text, params.eval, scorer_layer=2
    )
    want = encoder.encode(prompts.captions, layer=2).as_stored()
    assert torch.equal(prompts.scorer_text.tokens, want.tokens)
    assert not torch.equal(prompts.scorer_text.tokens, prompts.text.tokens)

    def sample_fn(text, settings, seeds, scorer_text=None):
        return np.zeros((len(text), 32, 32, 3), np.uint8), {}

    scorer = RecordingScorer(text_layer=2)
    run = dict(stage_count=2, model_sha256="-", device="cpu", scorer=scorer)
    paths = eval_paths(tmp_path / "run")
    evaluate_module.evaluate(params.eval, params.sample, sample_fn, prompts, paths, **run)
    (seen,) = scorer.seen
    assert torch.equal(seen.tokens, prompts.scorer_text.tokens)
    plain = dataclasses.replace(prompts, scorer_text=None)
    with pytest.raises(ValueError, match=r"scorer_layer=scorer\.text_layer"):
        evaluate_module.evaluate(params.eval, params.sample, sample_fn, plain, paths, **run)


def shade_images(settings: SampleConfig, seeds: list[int]) -> np.ndarray:
    """Stand-in samples: one flat 32 px image per seed, its shade set by the seed and the
    base stage's guidance (the same prompt row and setting, the same image)."""
    guidance = settings.per_stage("guidance", 2)[0]
    shade = np.array(seeds, np.uint8)[:, None, None, None] * 40 + int(guidance)
    return np.broadcast_to(shade, (len(seeds), 32, 32, 3)).copy()


def test_the_sweep_point_at_the_headline_setting_reuses_its_images(tiny_data, tmp_path) -> None:
    """A sweep weight equal to sample.guidance is the headline's own setting on its first
    prompts and seeds: those images are scored again, not sampled a second time."""
    params = tiny_params(
        "eval.fid=false", "eval.guidance_sweep=[[2.0, 1.0], 3.0]", "eval.sweep_samples=2"
    )
    prompts = evaluate_module.held_out(
        tiny_data["prepared"], tiny_data["cache"], params.text, params.eval
    )
    calls = []

    def sample_fn(text, settings, seeds, scorer_text=None):
        calls.append((settings.per_stage("guidance", 2), list(seeds)))
        return shade_images(settings, seeds), {}

    run = dict(stage_count=2, model_sha256="-", device="cpu", scorer=None)
    paths = eval_paths(tmp_path / "run")
    evaluate_module.evaluate(params.eval, params.sample, sample_fn, prompts, paths, **run)
    n, n_sweep = len(prompts.records), min(params.eval.sweep_samples, len(prompts.records))
    assert n_sweep < n
    first = params.sample.seed
    assert calls == [
        ([2.0, 1.0], list(range(first, first + n))),  # the headline
        ([3.0, 3.0], list(range(first, first + n_sweep))),  # the other sweep point
    ]
    with paths.sweep.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["guidance_stages"] for r in rows] == ["2 1", "3 3"]
    assert [int(r["n"]) for r in rows] == [n_sweep, n_sweep]  # what a row's numbers are over
    assert all(r["alignment.balanced"] != "" for r in rows)


def test_the_inception_network_sees_each_image_set_once(tiny_data, tmp_path, monkeypatch) -> None:
    """The network runs on the real images, the headline's and each other sweep point's,
    once each: the sweep point at the headline's setting scores the headline's first
    features (fid.py's promise: the expensive network never runs twice on the same images)."""
    params = tiny_params("eval.guidance_sweep=[[2.0, 1.0], 3.0]", "eval.sweep_samples=2")
    prompts = evaluate_module.held_out(
        tiny_data["prepared"], tiny_data["cache"], params.text, params.eval
    )
    seen: list[np.ndarray] = []

    class Features:  # pixels as features: what the network saw is what was scored
        identity = "pixels"

        def __init__(self, device: str = "cpu", batch_size: int = 32) -> None:
            pass

        def __call__(self, images: np.ndarray, progress: bool = False) -> torch.Tensor:
            seen.append(images.copy())
            flat = images.reshape(len(images), -1)[:, :2048].astype(np.float64)
            return torch.from_numpy(flat + np.arange(2048) % 7)  # not constant per image

    def sample_fn(text, settings, seeds, scorer_text=None):
        return shade_images(settings, seeds), {}

    monkeypatch.setattr(evaluate_module, "InceptionFeatures", Features)
    run = dict(stage_count=2, model_sha256="-", device="cpu", scorer=None)
    paths = eval_paths(tmp_path / "run")
    evaluate_module.evaluate(params.eval, params.sample, sample_fn, prompts, paths, **run)
    n, n_sweep = len(prompts.records), min(params.eval.sweep_samples, len(prompts.records))
    real, headline, other = seen  # three sets, each through the network once
    assert [len(real), len(headline), len(other)] == [n, n, n_sweep]
    assert np.array_equal(real, prompts.real_images(32))
    seeds = list(range(params.sample.seed, params.sample.seed + n))
    assert np.array_equal(headline, shade_images(params.sample, seeds))
    with paths.sweep.open() as f:
        reused = next(csv.DictReader(f))
    assert reused["guidance_stages"] == "2 1"
    expected = fid_kid(Features()(real)[:n_sweep], Features()(headline[:n_sweep]), with_fid=False)
    assert float(reused["kid_mean"]) == pytest.approx(expected["kid_mean"], rel=1e-12)


def eval_paths(out: Path) -> evaluate_module.EvalPaths:
    return evaluate_module.EvalPaths(
        out=out / "eval",
        metrics=out / "reports" / "metrics.json",
        scores=out / "reports" / "scores.json",
        sweep=out / "reports" / "guidance_sweep.csv",
        feature_cache=out / "fid_cache",
        timings=out / "reports" / "timings.json",
    )


@pytest.mark.integration
def test_evaluate_stage_end_to_end(tiny_data, tiny_models, tmp_path, monkeypatch) -> None:
    params = tiny_params()
    loads = []
    original = evaluate_module.cached_features

    def counting(cache_dir, images, extractor):
        class Counted:
            identity = extractor.identity

            def __call__(self, images, progress=False):
                loads.append(len(images))  # real-image features computed
                return extractor(images, progress)

        return original(cache_dir, images, Counted())

    monkeypatch.setattr(evaluate_module, "cached_features", counting)
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    paths = eval_paths(first_dir)
    result = run_evaluate(params, tiny_data, tiny_models, paths)

    # metrics.json: what was returned, with the documented schema
    metrics = json.loads(paths.metrics.read_text())
    assert metrics == json.loads(json.dumps(result))
    n = len(CATEGORIES) * params.eval.per_category  # scene data: balanced per category
    assert metrics["version"] == evaluate_module.METRICS_VERSION
    assert metrics["resolution"] == 32 and metrics["num_images"] == n
    assert metrics["num_real"] == metrics["num_fake"] == n
    assert metrics["fid"] > 0 and metrics["kid_subset_size"] == n // 2
    assert np.isfinite(metrics["kid_mean"]) and metrics["kid_std"] >= 0
    assert metrics["clip_score"] is None and "eval.clip_model" in metrics["clip_score_reason"]
    alignment = metrics["alignment"]
    assert 0.0 <= alignment["overall"] <= 1.0
    # eval.per_category prompts of each category, whatever the data's mix
    assert [alignment[f"n_{c}"] for c in CATEGORIES] == [params.eval.per_category] * 4
    assert alignment["balanced"] == pytest.approx(np.mean([alignment[c] for c in CATEGORIES]))
    assert set(alignment["failures"]) == set(CATEGORIES)
    sampling = metrics["sampling"]  # every setting the images depend on, per stage
    assert sampling["steps"] == [4, 4] and sampling["guidance"] == [2.0, 1.0]
    assert sampling["aug_level"] == [params.sample.aug_level] * 2
    assert sampling["guidance_interval"] == [0.0, 1.0]
    assert sampling["seed"] == params.sample.seed and sampling["rerank"] == 1  # the plain run
    assert set(sampling) == set(SampleConfig.model_fields)
    timings = json.loads(paths.timings.read_text())  # untracked: not in metrics.json
    assert set(timings["seconds_per_image"]) == {"base", "sr32"}
    assert all(v > 0 for v in timings["seconds_per_image"].values())

    # the sweep: one row per weight, in order
    with paths.sweep.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["guidance"]) for r in rows] == list(params.eval.guidance_sweep)
    assert [r["guidance_stages"] for r in rows] == ["1 1", "3 3"]  # a number: every stage
    assert all(r["alignment.balanced"] != "" and r["kid_mean"] != "" for r in rows)
    assert all(r["clip_score"] == "" for r in rows)

    # images and the report
    samples = sorted((paths.out / "samples").glob("*.png"))
    assert len(samples) == n
    assert all(Image.open(p).size == (32, 32) for p in samples)
    # the grid: eval.grid_size (4) samples in 2 x 2 cells of 128 px + a caption strip
    grid = np.asarray(Image.open(paths.out / "grid.png").convert("RGB"))
    assert grid.shape == (2 * (128 + 28 + 12), 2 * 128, 3)  # + a line for the verdict
    first = Image.open(samples[0]).convert("RGB").resize((128, 128), Image.Resampling.NEAREST)
    assert np.array_equal(grid[3:125, 3:125], np.asarray(first)[3:125, 3:125])
    # pass/fail frames: one prompt per category, interleaved in CATEGORIES order
    for k, category in enumerate(CATEGORIES):
        x, y = (k % 2) * 128, (k // 2) * (128 + 40)
        frame = tuple(grid[y, x + 64])
        assert frame == (PASS if alignment[category] == 1.0 else FAIL), (category, frame)
    assert Image.open(paths.out / "sweep.png").size == (500, 320)
    page = (paths.out / "report.html").read_text()
    assert "alignment.overall" in page and "data:image/png;base64," in page
    assert metrics["model_sha256"] in page and metrics["eval_set_sha256"] in page
    # the in-domain CLIP score: 100 x mean max(cos, 0) of the scorer, and its validation
    assert 0.0 <= metrics["in_domain_clip_score"] <= 100.0
    assert set(metrics["scorer_validation"]) == {"auc", "spearman"}
    assert all(r["in_domain_clip_score"] != "" for r in rows)
    assert "Alignment failures" in page and "colors_swapped" in page
    assert "<td>n/a</td>" in page and ">null<" not in page and ">None<" not in page

    # real features: cached by the first run and read back, not recomputed, by the second
    assert len(loads) == 1
    cache_files = list(paths.feature_cache.glob("inception_*.pt"))
    assert len(cache_files) == 1
    stamp = cache_files[0].stat().st_mtime_ns
    second = evaluate_module.EvalPaths(
        **{
            **paths.__dict__,
            "out": second_dir / "eval",
            "metrics": second_dir / "metrics.json",
            "scores": second_dir / "scores.json",
            "sweep": second_dir / "sweep.csv",
            "timings": second_dir / "timings.json",
        }
    )
    again = run_evaluate(params, tiny_data, tiny_models, second)
    assert len(loads) == 1 and cache_files[0].stat().st_mtime_ns == stamp

    # deterministic: every tracked output is byte-identical on a rerun (dvc.lock stays put)
    assert again == result
    assert second.metrics.read_bytes() == paths.metrics.read_bytes()
    assert second.scores.read_bytes() == paths.scores.read_bytes()
    scores = json.loads(paths.scores.read_text())
    # the names of metrics.json and MLflow: alignment.balanced, nested as in metrics.json
    assert scores["alignment"]["balanced"] == round(alignment["balanced"], 4)
    assert len(flatten(scores)) == 10
    assert second.sweep.read_text() == paths.sweep.read_text()
    for file in sorted(p for p in paths.out.rglob("*") if p.is_file()):
        twin = second.out / file.relative_to(paths.out)
        assert file.read_bytes() == twin.read_bytes(), file.name
