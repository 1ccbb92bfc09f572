"""Sampling through every entry point: one meaning per setting, and the generation features
(negative prompts, batches, image-to-image, inpainting, super-resolution of any image)."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imagen_ops import cascade as cascade_module
from imagen_ops.cascade import Cascade, augment_lowres, denoising_steps
from imagen_ops.cli import main
from imagen_ops.config import EvalConfig, ServeConfig
from imagen_ops.images import from_uint8, read_image, to_uint8
from imagen_ops.registry.pyfunc import DeadlineExceeded, Row, generate, validate_request

from .conftest import tiny_params, write_params


@pytest.fixture(scope="module")
def cascade(tiny_models) -> Cascade:
    params = tiny_params()
    return Cascade.from_dir(tiny_models, params.stage_names(), params.text)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sample_u8(cascade: Cascade, prompts, settings, seeds=None, **kw) -> np.ndarray:
    return to_uint8(cascade.sample(prompts, settings, seeds, **kw))


# ------------------------------------------------------------ one meaning per setting


@pytest.mark.integration
def test_same_image_through_python_cli_served_model_and_evaluation(
    tiny_data, tiny_models, cascade, tmp_path, monkeypatch
) -> None:
    """A held-out caption with seed s: Cascade.sample, `imagen-ops sample`, the logged
    pyfunc model and the evaluate stage give the same pixels."""
    import mlflow

    from imagen_ops.eval.evaluate import EvalPaths, cascade_sampler, evaluate, held_out
    from imagen_ops.registry.pyfunc import ModelSpec
    from imagen_ops.registry.register import log_cascade_model
    from imagen_ops.registry.tracking import configure

    params = tiny_params("sample.seed=5")
    settings = params.sample
    cfg = EvalConfig(
        num_samples=3, per_category=None, fid=False, guidance_sweep=(1.0,), sweep_samples=2
    )
    prompts = held_out(tiny_data["prepared"], tiny_data["cache"], params.text, cfg)
    k = 2  # the third held-out prompt: evaluation samples it with seed 5 + 2, in a batch

    # evaluation (cached embeddings, batched with the other held-out prompts)
    paths = EvalPaths(
        *(tmp_path / name for name in ("eval", "m.json", "scores.json", "s.csv", "f", "t"))
    )
    evaluate(
        cfg,
        settings,
        cascade_sampler(cascade, progress=False),
        prompts,
        paths,
        stage_count=2,
        model_sha256="-",
    )
    evaluated = np.asarray(Image.open(paths.out / "samples" / f"{k:04d}.png"))
    caption, seed = prompts.captions[k], settings.seed + k

    # Python
    python = sample_u8(cascade, [caption], settings, [seed])[0]
    # the CLI, with the seed from params.yaml (-S sample.seed) and from --seed
    params_file = write_params(tmp_path / "params.yaml", "sample.seed=7")

    def cli(*extra: str) -> np.ndarray:
        out = tmp_path / "cli.png"
        argv = ["sample", caption, "--model", str(tiny_models), "--params", str(params_file)]
        assert main([*argv, *extra, "--out", str(out), "-q"]) == 0
        return np.asarray(Image.open(out))

    cli_params_seed, cli_seed3 = cli(), cli("--seed", "3")
    # the served model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    configure(params.registry)
    with mlflow.start_run():
        info = log_cascade_model(tiny_models, ModelSpec.from_params(params))
    served_model = mlflow.pyfunc.load_model(info.model_uri)
    reply = served_model.predict(pd.DataFrame({"prompt": [caption, caption], "seed": [seed, 3]}))
    served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in reply["image"]]

    assert np.array_equal(python, evaluated)
    assert np.array_equal(python, served[0])
    expected_7 = sample_u8(cascade, [caption], settings, [7])[0]
    assert np.array_equal(cli_params_seed, expected_7), "sample.seed from params.yaml"
    assert np.array_equal(cli_seed3, served[1]), "--seed 3 == the request's seed 3"
    assert not np.array_equal(cli_seed3, cli_params_seed)


def test_guidance_means_the_same_in_the_cli_and_the_served_model(
    tiny_models, cascade, tmp_path
) -> None:
    """`--guidance 3` and a request's `guidance: 3` are both sample.guidance = 3: every
    stage, and the same image; a per-stage list guides the base stage only."""
    params_file = write_params(tmp_path / "params.yaml")
    out = tmp_path / "g.png"
    argv = ["sample", "a star", "--model", str(tiny_models), "--params", str(params_file)]
    assert main([*argv, "--guidance", "3", "--out", str(out), "-q"]) == 0
    settings = tiny_params().sample

    def served(guidance) -> tuple[np.ndarray, list[float]]:
        frame = pd.DataFrame({"prompt": ["a star"], "guidance": [guidance]})
        rows = validate_request(frame, settings, ServeConfig())
        return generate(cascade, rows)[0], [p.guidance for p in rows[0].settings.resolve(2)]

    every_stage, weights = served(3.0)
    assert weights == [3.0, 3.0]
    assert np.array_equal(np.asarray(Image.open(out)), every_stage)
    base_only, weights = served([3.0, 1.0])
    assert weights == [3.0, 1.0] and not np.array_equal(base_only, every_stage)


def test_guidance_interval_means_the_same_in_the_cli_and_the_served_model(
    tiny_models, cascade, tmp_path
) -> None:
    """`--guidance-interval` and a request's `guidance_interval` are sample.guidance_interval:
    the same image as Python; an interval that no denoising step reaches is no guidance
    (ancestral sampling never evaluates t = 0), the whole range is plain guidance."""
    settings = tiny_params().sample.updated(guidance=4.0)
    prompts = ["a red circle and a blue square"]
    half = sample_u8(cascade, prompts, settings.updated(guidance_interval=[0.5, 1.0]))[0]
    everywhere = sample_u8(cascade, prompts, settings)[0]
    nowhere = sample_u8(cascade, prompts, settings.updated(guidance_interval=[0.0, 0.0]))[0]
    assert np.array_equal(nowhere, sample_u8(cascade, prompts, settings.updated(guidance=1.0))[0])
    assert np.array_equal(
        everywhere, sample_u8(cascade, prompts, settings.updated(guidance_interval=[0.0, 1.0]))[0]
    )
    assert not np.array_equal(half, everywhere) and not np.array_equal(half, nowhere)

    params_file = write_params(tmp_path / "params.yaml")
    out = tmp_path / "gi.png"
    argv = ["sample", prompts[0], "--model", str(tiny_models), "--params", str(params_file)]
    options = ["--guidance", "4", "--guidance-interval", "0.5", "1", "--out", str(out), "-q"]
    assert main([*argv, *options]) == 0
    frame = pd.DataFrame({"prompt": prompts, "guidance": [4.0], "guidance_interval": [[0.5, 1.0]]})
    served = generate(cascade, validate_request(frame, tiny_params().sample, ServeConfig()))[0]
    assert np.array_equal(np.asarray(Image.open(out)), half)
    assert np.array_equal(served, half)
    bad = frame.assign(guidance_interval=[[0.9, 0.2]])
    with pytest.raises(Exception, match=r"guidance_interval.*lo <= hi"):
        validate_request(bad, tiny_params().sample, ServeConfig())


def test_batches_do_not_change_images(cascade) -> None:
    """A prompt's image is the same, bit for bit, alone (the CLI) and among others of any
    length in any batch size (evaluation, serving)."""
    settings = tiny_params().sample
    prompts = [
        "a red circle",
        "two blue squares to the left of a green triangle and a yellow star",
        "a green star",
        "three small purple circles above a big orange heart",
        "a yellow circle",
    ]
    assert len(set(cascade.widths(prompts))) == 2
    together = cascade.sample(prompts, settings.updated(batch_size=8))
    for size in (1, 2):
        assert torch.equal(cascade.sample(prompts, settings.updated(batch_size=size)), together)
    for k, prompt in enumerate(prompts):
        alone = cascade.sample([prompt], settings, seeds=[settings.seed + k])
        assert torch.equal(alone[0], together[k]), prompt
    assert not torch.equal(together[0], together[1])


def test_python_takes_one_prompt_as_a_string_and_refuses_what_is_no_seed(cascade) -> None:
    """A string is one prompt (as diffusers takes it), not one image per character; an
    empty list, and seeds that are not `Seed`s (a float, a bool, a negative or 64-bit
    one) are refused naming the problem, not truncated to another image's seed."""
    settings = tiny_params().sample.updated(steps=2)
    one = cascade.sample("a red circle", settings, seeds=[3])
    assert one.shape[0] == 1
    assert torch.equal(one, cascade.sample(["a red circle"], settings, seeds=[np.int64(3)]))
    with pytest.raises(ValueError, match="no prompts"):
        cascade.sample([], settings)
    for seed, problem in [(1.9, "float"), (True, "bool"), (-1, "greater than or equal to 0"),
                          (2**64, "less than")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"seed 2 is .*{problem}"):
            cascade.sample(["a", "b"], settings, seeds=[1, seed])


def test_a_prompt_longer_than_the_encoder_reads_is_named_in_a_warning(cascade, caplog) -> None:
    """The encoder reads text.max_length tokens: a longer prompt's tail changes nothing,
    so the user is told, as diffusers tells of CLIP's 77."""
    limit = cascade._text_encoder().max_length
    long = " ".join(["a red circle"] * limit)
    with caplog.at_level("WARNING", logger="imagen_ops.text.encoders"):
        cascade.encode(["a blue square", long])
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("prompt 2 is ") and f"reads the first {limit}" in message


def test_fp32_images_do_not_depend_on_the_thread_count(cascade) -> None:
    """fp32 sampling gives the same pixels with 1 or 2 threads (bf16 autocast on a CPU
    may not: its reductions split by thread; README, "Reproducing")."""
    settings = tiny_params("sample.precision=fp32").sample
    prompts = ["a red circle", "two blue squares"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_u8(cascade, prompts, settings)
        torch.set_num_threads(2)
        two = sample_u8(cascade, prompts, settings)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, two)


def test_progress_bar_counts_every_denoising_step(cascade, capsys) -> None:
    settings = tiny_params().sample.updated(steps=[3, 2], batch_size=2)
    cascade.sample(["a", "b", "c"], settings, progress=True)
    err = capsys.readouterr().err
    assert "15/15" in err, err  # 3 images x (3 + 2) steps


# ------------------------------------------------------------------ negative prompts


def test_negative_prompt_takes_the_unconditional_branch(cascade) -> None:
    settings = tiny_params().sample.updated(guidance=4.0)
    plain = sample_u8(cascade, ["a red circle"], settings)
    negative = sample_u8(cascade, ["a red circle"], settings.updated(negative_prompt="a blue"))
    blank = sample_u8(cascade, ["a red circle"], settings.updated(negative_prompt="   "))
    assert not np.array_equal(plain, negative)
    assert np.array_equal(plain, blank), "an empty negative prompt is no negative prompt"
    # without guidance (w = 1) the unconditional branch is never evaluated
    no_cfg = settings.updated(guidance=1.0)
    assert np.array_equal(
        sample_u8(cascade, ["a red circle"], no_cfg),
        sample_u8(cascade, ["a red circle"], no_cfg.updated(negative_prompt="a blue")),
    )


def test_negative_prompt_is_what_guidance_steers_from() -> None:
    """With a denoiser that returns its text embedding, x0 = neg + w (cond - neg)."""
    from imagen_ops.diffusion.guidance import Conditioning, classifier_free_guidance

    cond = Conditioning(torch.full((1, 2, 1), 2.0), torch.ones(1, 2, dtype=torch.bool))
    neg = cond.with_text(torch.full((1, 3, 1), -1.0), torch.ones(1, 3, dtype=torch.bool))

    def denoise(x, t, c):  # mean of the real tokens, broadcast over the image
        mean = (c.text[..., 0] * c.mask).sum(1) / c.mask.sum(1).clamp(min=1)
        return mean.view(-1, 1, 1, 1).expand_as(x)

    x = torch.zeros(1, 3, 2, 2)
    guided = classifier_free_guidance(denoise, cond, 3.0, neg)(x, torch.tensor(0.5))
    assert torch.allclose(guided, torch.full_like(x, -1.0 + 3.0 * (2.0 + 1.0)))
    plain = classifier_free_guidance(denoise, cond, 3.0)(x, torch.tensor(0.5))
    assert torch.allclose(plain, torch.full_like(x, 6.0)), "no text: 0 + 3 * (2 - 0)"


# ------------------------------------------------ image-to-image, inpainting, upscaling


def _user_image(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((size, size, 3), np.uint8)
    image[: size // 2] = (200, 30, 30)
    image[size // 2 :] = (20, 20, 220)
    return np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)


def test_image_to_image_strength(cascade) -> None:
    settings = tiny_params().sample.updated(steps=[20, 20])
    source = _user_image(48)  # any size: resized to each stage
    image = read_image(png(source))
    target = from_uint8(np.asarray(Image.fromarray(source).resize((32, 32)))[None])

    def distance(strength: float) -> float:
        out = cascade.sample(["a red square"], settings.updated(strength=strength), image=image)
        return float((out - target).abs().mean())

    near, mid, far = distance(0.1), distance(0.5), distance(1.0)
    assert near < mid < far, (near, mid, far)
    assert near < 0.15
    again = cascade.sample(["a red square"], settings.updated(strength=0.5), image=image)
    first = cascade.sample(["a red square"], settings.updated(strength=0.5), image=image)
    assert torch.equal(again, first)


def test_image_to_image_runs_the_strength_share_of_the_steps_halves_up() -> None:
    assert [denoising_steps(10, s) for s in (0.01, 0.25, 0.45, 0.5, 1.0)] == [1, 3, 5, 5, 10]
    # halves up on the decimal given, not on its float product (25 x 0.58 = 14.4999... in floats)
    assert [denoising_steps(n, s) for n, s in ((25, 0.58), (45, 0.7), (50, 0.29))] == [15, 32, 15]


def test_super_resolution_takes_the_previous_stage_clamped(cascade, monkeypatch) -> None:
    """Without thresholding a stage's output may leave [-1, 1]; the next stage was trained
    on images inside it."""
    seen = []

    def recording(x, *args, **kwargs):
        seen.append((float(x.min()), float(x.max())))
        return augment_lowres(x, *args, **kwargs)

    monkeypatch.setattr(cascade_module, "augment_lowres", recording)
    settings = tiny_params().sample.updated(thresholding="none", guidance=[30.0, 1.0])
    cascade.sample(["a red square", "a blue star"], settings, seeds=[0, 1])
    assert seen and all(lo >= -1.0 and hi <= 1.0 for lo, hi in seen), seen


def test_inpainting_keeps_the_known_pixels_exactly(cascade) -> None:
    settings = tiny_params().sample
    source = _user_image(32)
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[8:24, 8:24] = 255  # white: generate
    out = sample_u8(
        cascade,
        ["a green star", "a green star"],
        settings,
        [0, 1],
        image=read_image(png(source)),
        mask=read_image(png(mask), mask=True),
    )
    keep = mask[..., 0] == 0
    for image in out:
        assert np.array_equal(image[keep], source[keep])
        assert not np.array_equal(image[~keep], source[~keep])
    assert not np.array_equal(out[0], out[1]), "the seed still matters inside the mask"


def test_super_resolution_of_any_user_image(cascade) -> None:
    settings = tiny_params().sample
    exact = read_image(png(_user_image(16)))
    out = cascade.sample(["a red square"], settings, lowres=exact)
    assert out.shape == (1, 3, 32, 32)
    other = read_image(png(_user_image(40)))  # resized to the sr32 stage's 16 px input
    assert cascade.sample(["a red square"], settings, lowres=other).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="a mask needs the image"):
        cascade.sample(["a"], settings, mask=torch.ones(1, 1, 32, 32))


# ------------------------------------------------------------- serving bounds


def test_request_over_the_work_budget_is_refused_before_sampling(cascade) -> None:
    from mlflow.exceptions import MlflowException

    settings = tiny_params().sample
    per_prompt = 4 * 16**2 * 2 + 4 * 32**2  # guidance [2, 1]: base runs twice
    assert cascade.work(settings, 3) == 3 * per_prompt
    # a lone image's unguided steps run as a batch of two (Stage.denoiser)
    assert cascade.work(settings, 1) == per_prompt + 4 * 32**2
    assert cascade.work(settings.updated(batch_size=2), 3) == 3 * per_prompt + 4 * 32**2
    assert cascade.work(settings, 2, lowres_size=16) == 2 * 4 * 32**2  # super-resolution only
    half = settings.updated(strength=0.5)
    assert cascade.work(half, 2, from_image=True) == 2 * (2 * 16**2 * 2 + 2 * 32**2)
    limits = ServeConfig(max_work=3 * per_prompt)
    frame = pd.DataFrame({"prompt": ["a star"] * 4})
    with pytest.raises(MlflowException, match=r"serve\.max_work.*fewer prompts or steps"):
        validate_request(frame, settings, limits, cascade)
    assert len(validate_request(frame[:3], settings, limits, cascade)) == 3
    # settings this cascade cannot run are a bad request naming the setting, not a crash
    three = pd.DataFrame({"prompt": ["a star", "a moon"], "steps": [None, [4, 4, 4]]})
    with pytest.raises(MlflowException, match=r"row 1: sample\.steps has 3 values") as err:
        validate_request(three, settings, limits, cascade)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_work_is_the_pixels_the_networks_denoise(cascade) -> None:
    """Cascade.work counts what sampling runs: one network pass a step, two where guidance
    runs, so under sample.guidance_interval only the steps inside it count twice, from
    noise and on image-to-image's shortened grid alike."""
    pixels = []

    def count(net, args) -> None:
        pixels.append(args[0].shape[0] * args[0].shape[-1] ** 2)

    settings = tiny_params().sample.updated(guidance_interval=[0.5, 1.0])
    image = read_image(png(_user_image(32)))
    # one short prompt, then two short ones with a long one: batched by padded width, the
    # long one alone runs its unguided steps as two
    mixed = ["a red circle", "two blue squares to the left of a green triangle", "a star"]
    hooks = [stage.net.register_forward_pre_hook(count) for stage in cascade.stages]
    try:
        for prompts in [mixed[:1], mixed]:
            for strength, from_image in [(1.0, None), (0.6, image)]:
                run = settings.updated(strength=strength)
                pixels.clear()
                cascade.sample(prompts, run, image=from_image)
                n, widths = len(prompts), cascade.widths(prompts)
                expected = cascade.work(run, n, widths=widths, from_image=from_image is not None)
                assert sum(pixels) == expected
        assert cascade.work(settings, 3, widths=cascade.widths(mixed)) > cascade.work(settings, 3)
    finally:
        for hook in hooks:
            hook.remove()
    everywhere = settings.updated(guidance_interval=[0.0, 1.0])
    assert cascade.work(settings, 2) < cascade.work(everywhere, 2)


def test_deadline_stops_sampling_between_steps(cascade) -> None:
    import time

    settings = tiny_params().sample
    rows = [Row("a star", settings.updated(seed=0))]
    with pytest.raises(DeadlineExceeded):
        generate(cascade, rows, deadline=time.monotonic() - 1)
    assert generate(cascade, rows, deadline=time.monotonic() + 600)[0].shape == (32, 32, 3)


def test_generate_batches_equal_settings_and_keeps_row_order(cascade) -> None:
    settings = tiny_params().sample
    rows = [
        Row("a star", settings.updated(seed=1)),
        Row("a circle", settings.updated(seed=2, steps=2)),
        Row("a star", settings.updated(seed=3)),
    ]
    calls = []
    original = cascade.sample

    def spy(prompts, *args, **kwargs):
        calls.append(list(prompts))
        return original(prompts, *args, **kwargs)

    cascade.sample = spy
    try:
        images = generate(cascade, rows)
    finally:
        del cascade.sample
    assert calls == [["a star", "a star"], ["a circle"]]
    alone = sample_u8(cascade, ["a circle"], settings.updated(steps=2), [2])[0]
    assert np.array_equal(images[1], alone)


# ------------------------------------------------------------------------- the CLI


def test_cli_prompts_file_negative_prompt_and_batch_size(tiny_models, tmp_path, cascade) -> None:
    params_file = write_params(tmp_path / "params.yaml")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\ntwo blue squares\n")
    out = tmp_path / "s.png"
    args = [
        "sample",
        "--prompts-file",
        str(prompts),
        "--model",
        str(tiny_models),
        "--params",
        str(params_file),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--negative-prompt",
        "a green star",
        "--guidance",
        "3",
        "-q",
    ]
    assert main(args) == 0
    files = sorted(tmp_path.glob("s_*.png"))
    assert [f.name for f in files] == ["s_000.png", "s_001.png"]
    settings = tiny_params().sample.updated(guidance=3.0, negative_prompt="a green star")
    expected = sample_u8(cascade, ["a red circle", "two blue squares"], settings)
    assert np.array_equal(np.asarray(Image.open(files[1])), expected[1])


def test_cli_image_modes(tiny_models, tmp_path) -> None:
    params_file = write_params(tmp_path / "params.yaml")
    Image.fromarray(_user_image(24)).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(_user_image(32)).save(tmp_path / "in32.png")
    base = [
        "sample",
        "a red square",
        "--model",
        str(tiny_models),
        "--params",
        str(params_file),
        "-q",
    ]
    for extra in (
        ["--image", str(tmp_path / "in.png")],
        ["--image", str(tmp_path / "in.png"), "--strength", "0.3"],
        ["--image", str(tmp_path / "in32.png"), "--mask", str(tmp_path / "mask.png")],
    ):
        out = tmp_path / f"out{len(extra)}.png"
        assert main([*base, *extra, "--out", str(out)]) == 0
        assert Image.open(out).size == (32, 32)
    inpainted = np.asarray(Image.open(tmp_path / "out4.png"))
    assert np.array_equal(inpainted[16:], _user_image(32)[16:])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a\x07bell"], "prompt 1: contains control character U+0007"),
        (["a star", "--steps", "0"], "sample settings: steps: Input should be greater"),
        (["a star", "--seed", str(2**63)], "seed: Input should be less than"),
        (["a star", "--mask", "missing-mask.png"], "missing-mask.png"),
        (["a star", "--image", "missing.png"], "missing.png"),
        (["a star", "--strength", "0.5"], "strength 0.5 is for image-to-image: give the image"),
        ([], "no prompts"),
    ],
)
def test_cli_sample_errors_are_one_line(tiny_models, tmp_path, caplog, args, message) -> None:
    params_file = write_params(tmp_path / "params.yaml")
    with caplog.at_level(logging.ERROR):
        code = main(["sample", *args, "--model", str(tiny_models), "--params", str(params_file)])
    assert code == 2
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert message in record.getMessage() and "\n" not in record.getMessage()


@pytest.mark.parametrize("in_project", [True, False])
def test_cli_sample_checks_its_flags_before_loading_the_model(tmp_path, caplog, in_project):
    """A bad flag fails before the model is looked for (a `models:/` download), in a
    project and outside one (where the model's packaged settings are the defaults)."""
    project = ["--params", str(write_params(tmp_path / "params.yaml"))] if in_project else []
    missing = str(tmp_path / "no-such-model")
    with caplog.at_level(logging.ERROR):
        code = main(["sample", "a star", "--steps", "0", "--model", missing, *project])
    assert code == 2
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "steps: Input should be greater" in record.getMessage()


# ------------------------------------------------------------------- best of N (rerank)


class Brightness(torch.nn.Module):
    """A stand-in scorer that prefers bright images: which candidate wins is known. It
    records the text it was given."""

    def __init__(self, text_layer: int = -1):
        super().__init__()
        self.text_layer, self.seen = text_layer, []

    def similarity(self, images: torch.Tensor, text) -> torch.Tensor:
        self.seen.append(text)
        return images.mean(dim=(1, 2, 3))


def test_candidate_seeds_are_reproducible_and_start_with_the_prompts_own() -> None:
    from imagen_ops.cascade import candidate_seed

    assert candidate_seed(7, 0) == 7
    seeds = [candidate_seed(7, j) for j in range(8)]
    assert seeds == [candidate_seed(7, j) for j in range(8)] and len(set(seeds)) == 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_rerank_returns_the_scorers_best_candidate_through_the_whole_cascade(tiny_models):
    from imagen_ops.cascade import candidate_seed

    params = tiny_params()
    cascade = Cascade.from_dir(tiny_models, params.stage_names(), params.text)
    prompts, seeds, n = ["a red circle", "two blue stars"], [3, 11], 4
    with pytest.raises(ValueError, match="train_scorer"):
        cascade.sample(prompts, params.sample.updated(rerank=n), seeds)
    cascade.scorer = Brightness()
    reranked = sample_u8(cascade, prompts, params.sample.updated(rerank=n), seeds)
    # by hand: each candidate's first-stage image, the brightest one's seed, full cascade
    base_only = Cascade(cascade.stages[:1], params.text)
    winners = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        candidates = [candidate_seed(seed, j) for j in range(n)]
        first = base_only.sample([prompt] * n, params.sample.for_stages([0], 2), candidates)
        winners.append(candidates[int(first.mean(dim=(1, 2, 3)).argmax())])
    assert np.array_equal(reranked, sample_u8(cascade, prompts, params.sample, winners))
    assert winners != seeds  # the test would not tell anything if the first one always won
    # N = 1 is plain sampling
    plain = sample_u8(cascade, prompts, params.sample, seeds)
    assert np.array_equal(
        sample_u8(cascade, prompts, params.sample.updated(rerank=1), seeds), plain
    )


def test_best_of_n_reads_the_prompts_at_the_scorers_layer(tiny_models) -> None:
    """A scorer with its own text layer scores the prompts embedded at that layer, whether
    the prompts come as text or as embeddings with `scorer_text`; embeddings alone are
    refused rather than scored at the U-Net's layer."""
    params = tiny_params()
    cascade = Cascade.from_dir(tiny_models, params.stage_names(), params.text)
    cascade.scorer = Brightness(text_layer=2)
    prompts, seeds, settings = ["a red circle", "two blue stars"], [3, 11], params.sample
    settings = settings.updated(rerank=2)
    from_text = sample_u8(cascade, prompts, settings, seeds)
    want = cascade.encode(prompts, layer=2)
    for k, seen in enumerate(cascade.scorer.seen[-2:]):  # one call per prompt, its width
        assert torch.equal(seen.tokens, want[torch.tensor([k, k])].fitted(want.widths()[k]).tokens)
    assert not torch.equal(want.tokens, cascade.encode(prompts).tokens)
    with pytest.raises(ValueError, match=r"scorer's layer 2 \(text\.scorer_layer\)"):
        cascade.sample(cascade.encode(prompts), settings, seeds)
    given = cascade.sample(cascade.encode(prompts), settings, seeds, scorer_text=want)
    assert np.array_equal(to_uint8(given), from_text)


def test_rerank_counts_against_the_work_budget(cascade) -> None:
    params = tiny_params()
    settings = params.sample
    base_only = Cascade(cascade.stages[:1], params.text)
    base = base_only.work(settings.for_stages([0], 2), 1)  # the first stage alone
    assert cascade.work(settings.updated(rerank=4), 1) == cascade.work(settings, 1) + 4 * base
    assert cascade.scorer is None
    frame = pd.DataFrame({"prompt": ["a red circle"], "rerank": [4]})
    with pytest.raises(Exception, match="rerank needs a scorer"):
        validate_request(frame, settings, ServeConfig(), cascade)
