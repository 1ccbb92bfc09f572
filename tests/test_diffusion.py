"""Schedules, objectives, guidance, thresholding and samplers against analytic answers.

The samplers are driven by the exact denoiser of a two-component Gaussian mixture, whose
posterior mean E[x0 | x_t] has a closed form, so sampler error is measured against the
true ODE solution and the true data distribution instead of golden numbers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from imagen_ops.config import DiffusionConfig
from imagen_ops.diffusion.guidance import (
    Conditioning,
    classifier_free_guidance,
    dynamic_threshold,
    guides,
    thresholded,
)
from imagen_ops.diffusion.objectives import loss_weight, target, to_eps, to_x0
from imagen_ops.diffusion.samplers import (
    SAMPLERS,
    NoiseSource,
    sample,
    sample_ancestral,
    sample_ddim,
    sample_dpmpp_2m,
)
from imagen_ops.diffusion.schedules import (
    alpha_sigma,
    cosine_schedule,
    linear_schedule,
    make_schedule,
    time_grid,
)

T = torch.linspace(0, 1, 101, dtype=torch.float64)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["cosine", "shifted_cosine", "linear"])
def test_schedule_identities(schedule):
    logsnr = make_schedule(DiffusionConfig(schedule=schedule), resolution=32)(T)
    alpha, sigma = alpha_sigma(logsnr)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(T))
    assert torch.all(logsnr[1:] <= logsnr[:-1]), "log-SNR must decrease in t"
    assert torch.all(logsnr[1:-1][:-1] > logsnr[1:-1][1:]), "strictly inside the clip range"


def test_cosine_endpoints_and_shift():
    ends = cosine_schedule(-15, 15)(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([15.0, -15.0], dtype=torch.float64))
    # the unclipped middle is the classic cosine: alpha = cos(pi t / 2) => logsnr(1/2) = 0
    assert abs(float(cosine_schedule(-15, 15)(torch.tensor(0.5, dtype=torch.float64)))) < 1e-12
    shifted = make_schedule(DiffusionConfig(schedule="shifted_cosine"), resolution=32)
    torch.testing.assert_close(
        shifted(T) - cosine_schedule()(T), torch.full_like(T, 2 * math.log(2))
    )


def test_linear_schedule_matches_discrete_ddpm():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    log_abar = torch.cumsum(torch.log1p(-betas), 0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    alpha, _ = alpha_sigma(linear_schedule()(t))
    # the integral of -log(1 - beta) differs from the sum by half a step of beta (< 1e-4 x n)
    torch.testing.assert_close((alpha**2).log(), log_abar, atol=0.02, rtol=0.005)
    assert float(linear_schedule()(torch.tensor(0.0, dtype=torch.float64))) == 15.0


def test_linear_schedule_is_exact_in_float32_at_small_t():
    """The network sees float32 times: their log-SNR must be the float64 one, not the
    cancellation of two nearly equal integrals (NaN at t = 1e-6 before)."""
    t = torch.tensor([1e-6, 2e-6, 1e-5, 1e-4, 1e-3, 0.5, 1.0])
    got = linear_schedule()(t)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, linear_schedule()(t.double()).float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_time_grid(spacing):
    schedule = cosine_schedule()
    ts = time_grid(10, schedule, spacing)
    assert len(ts) == 11 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(ts))
    if spacing == "logsnr":
        gaps = torch.diff(schedule(torch.tensor(ts, dtype=torch.float64)))
        torch.testing.assert_close(gaps, torch.full_like(gaps, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        time_grid(10, schedule, "karras")


# -------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_objective_round_trip(objective):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    logsnr = torch.linspace(-10, 10, 64)[:, None]
    alpha, sigma = alpha_sigma(logsnr)
    x_t = alpha * x0 + sigma * eps
    out = target(x0, eps, alpha, sigma, objective)
    torch.testing.assert_close(to_x0(out, x_t, alpha, sigma, objective), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(to_eps(x0, x_t, alpha, sigma), eps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("weighting", "floor"), [("min_snr", 0.0), ("truncated_min_snr", 1.0)])
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_snr_weightings_are_what_they_say_in_x0_space(objective, weighting, floor):
    """Whatever the objective, weight * |out - target|^2 == clamp(snr, floor, gamma) times
    |x0_hat - x0|^2: min-SNR's x0 weight vanishes at high noise, the truncated one keeps 1."""
    g = torch.Generator().manual_seed(1)
    x0, eps, noise = (torch.randn(16, 8, generator=g) for _ in range(3))
    logsnr = torch.linspace(-6, 6, 16)[:, None]
    alpha, sigma = alpha_sigma(logsnr)
    x_t = alpha * x0 + sigma * eps
    out = target(x0, eps, alpha, sigma, objective) + 0.1 * noise  # an imperfect prediction
    x0_hat = to_x0(out, x_t, alpha, sigma, objective)
    lhs = (
        loss_weight(logsnr, objective, weighting, 5.0)
        * (out - target(x0, eps, alpha, sigma, objective)) ** 2
    )
    rhs = logsnr.exp().clamp(min=floor, max=5.0) * (x0_hat - x0) ** 2
    torch.testing.assert_close(lhs.sum(1), rhs.sum(1), rtol=1e-4, atol=1e-5)
    assert torch.all(loss_weight(logsnr, objective, "none") == 1)


# --------------------------------------------------------------------- guidance, clipping


def test_dynamic_threshold_hand_computed():
    x0 = torch.tensor([[0.0, 0.5, -1.0, 3.0], [0.2, -0.4, 0.6, 0.8]]).view(2, 1, 2, 2)
    out = dynamic_threshold(x0, quantile=0.5)
    # row 1: |x0| = [0, .5, 1, 3] -> median 0.75 -> s = max(0.75, 1) = 1: plain clipping
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.0, 0.5, -1.0, 1.0]))
    # row 2: every |x0| < 1 -> s = 1 -> unchanged
    torch.testing.assert_close(out[1], x0[1])
    # a row whose median magnitude is 2: clip to [-2, 2], divide by 2
    big = torch.tensor([1.0, -2.0, 2.0, 4.0]).view(1, 1, 2, 2)
    s = torch.quantile(big.abs().flatten(), 0.5)  # 2.0
    torch.testing.assert_close(
        dynamic_threshold(big, 0.5).flatten(), torch.tensor([1.0, -2.0, 2.0, 2.0]) / s
    )
    static = thresholded(lambda x, t: x * 3, "static")(torch.ones(1, 1, 1, 1), torch.tensor(0.0))
    assert float(static) == 1.0


def _toy_cond_denoiser():
    """A conditional denoiser whose output depends on the text through the mask."""
    weight = torch.randn(4, generator=torch.Generator().manual_seed(2))

    def denoise(x, t, cond: Conditioning):
        text = (cond.text * cond.mask[..., None]).sum(1) @ weight  # (B,)
        return x * 0.5 + text.view(-1, 1, 1, 1) * (1 + t)

    return denoise


def test_classifier_free_guidance():
    denoise = _toy_cond_denoiser()
    g = torch.Generator().manual_seed(3)
    cond = Conditioning(
        torch.randn(2, 5, 4, generator=g), torch.tensor([[1, 1, 1, 0, 0]] * 2).bool()
    )
    x, t = torch.randn(2, 3, 4, 4, generator=g), torch.tensor(0.3)
    torch.testing.assert_close(
        classifier_free_guidance(denoise, cond, 1.0)(x, t), denoise(x, t, cond)
    )
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return denoise(x, t, c)

    guided = classifier_free_guidance(counting, cond, 4.0)(x, t)
    assert calls == [4], "conditional and unconditional must share one batched forward pass"
    c, u = denoise(x, t, cond), denoise(x, t, cond.without_text())
    torch.testing.assert_close(guided, u + 4.0 * (c - u))


def test_guidance_interval_guides_only_inside_it():
    """Inside [lo, hi] (ends included) the guided prediction in one doubled pass; outside
    it exactly the conditional one, in one pass over the batch alone."""
    denoise = _toy_cond_denoiser()
    g = torch.Generator().manual_seed(4)
    cond = Conditioning(torch.randn(2, 5, 4, generator=g), torch.ones(2, 5, dtype=torch.bool))
    x = torch.randn(2, 3, 4, 4, generator=g)
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return denoise(x, t, c)

    guided = classifier_free_guidance(counting, cond, 4.0, interval=(0.25, 0.5))
    for t, inside in [(0.1, False), (0.25, True), (0.375, True), (0.5, True), (0.9, False)]:
        t = torch.tensor(t)
        calls.clear()
        c, u = denoise(x, t, cond), denoise(x, t, cond.without_text())
        out = guided(x, t)
        if inside:
            assert calls == [4]
            torch.testing.assert_close(out, u + 4.0 * (c - u))
        else:
            assert calls == [2]
            assert torch.equal(out, c)
            assert not torch.allclose(c, u + 4.0 * (c - u))


def test_guidance_interval_includes_its_ends_at_the_denoisers_float32_times():
    """The samplers hand the denoiser t as float32, where 0.6 is 0.6000000238: the end of
    [0, 0.6] is still inside, and a time a grid step beyond it is not."""
    t = float(torch.tensor(0.6, dtype=torch.float32))
    assert t > 0.6 and guides(3.0, (0.0, 0.6), t)
    assert not guides(3.0, (0.0, 0.6), 0.61) and not guides(1.0, (0.0, 1.0), 0.5)


# ------------------------------------------------------------------------------ samplers

MUS = torch.tensor([[-0.6, 0.3], [0.5, -0.4]], dtype=torch.float64)
STDS = torch.tensor([0.15, 0.3], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
SCHEDULE = cosine_schedule()


def gmm_denoiser(x, t):
    """E[x0 | x_t] for x0 ~ sum_k w_k N(mu_k, s_k^2 I): Bayes over components, then the
    Gaussian posterior mean of each."""
    alpha, sigma = alpha_sigma(SCHEDULE(t.double()))
    x = x.double()
    var = alpha**2 * STDS**2 + sigma**2  # (K,) marginal variance of x_t per component
    diff = x[:, None, :] - alpha * MUS[None]  # (B, K, D)
    logp = WEIGHTS.log() - 0.5 * (diff**2).sum(-1) / var - 0.5 * x.shape[1] * var.log()
    resp = logp.softmax(dim=1)
    means = MUS[None] + (alpha * STDS**2 / var)[None, :, None] * diff
    return (resp[..., None] * means).sum(1)


def gmm_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MUS[k] + STDS[k, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)


def moments(x):
    return x.mean(0), torch.cov(x.T)


@pytest.fixture(scope="module")
def start_noise():
    return torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def ode_reference(start_noise):
    return sample_dpmpp_2m(gmm_denoiser, start_noise, time_grid(1000, SCHEDULE), SCHEDULE)


def ode_error(sampler, x, steps, ref):
    return float(
        (sampler(gmm_denoiser, x, time_grid(steps, SCHEDULE), SCHEDULE) - ref).norm(dim=1).mean()
    )


def test_deterministic_samplers_converge_at_their_order(start_noise, ode_reference):
    ddim = [ode_error(sample_ddim, start_noise, n, ode_reference) for n in (10, 20, 40)]
    dpm = [ode_error(sample_dpmpp_2m, start_noise, n, ode_reference) for n in (10, 20, 40)]
    assert ddim[0] / ddim[2] > 3.0, f"DDIM should be ~first order: {ddim}"
    assert dpm[0] / dpm[2] > 8.0, f"DPM-Solver++(2M) should be ~second order: {dpm}"
    assert dpm[1] <= ddim[1], "DPM-Solver++ at 20 steps must beat DDIM at 20 steps"
    assert dpm[1] < 0.03


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_reach_the_data_distribution(name, start_noise):
    steps = 500 if name == "ancestral" else 50
    noise = NoiseSource(range(len(start_noise)))
    out = sample(name, gmm_denoiser, start_noise, time_grid(steps, SCHEDULE), SCHEDULE, noise=noise)
    mean, cov = moments(out)
    true_mean, true_cov = moments(gmm_samples(200_000, seed=9))
    # Monte Carlo error of 4,000 samples: ~0.01 on the mean, ~0.01 on the covariance
    torch.testing.assert_close(mean, true_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(cov, true_cov, atol=0.03, rtol=0)


def test_dpmpp_20_matches_ancestral_500(start_noise):
    noise = NoiseSource(range(len(start_noise)))
    fast = sample_dpmpp_2m(gmm_denoiser, start_noise, time_grid(20, SCHEDULE), SCHEDULE)
    slow = sample_ancestral(
        gmm_denoiser, start_noise, time_grid(500, SCHEDULE), SCHEDULE, noise=noise
    )
    for a, b in zip(moments(fast), moments(slow), strict=True):
        torch.testing.assert_close(a, b, atol=0.03, rtol=0)
    # the share of samples in the small component (x < 0) agrees too
    assert abs(float((fast[:, 0] < 0).double().mean() - (slow[:, 0] < 0).double().mean())) < 0.03


def test_dpmpp_2m_sde_25_matches_ancestral_500(start_noise):
    fast = sample(
        "dpmpp_2m_sde",
        gmm_denoiser,
        start_noise,
        time_grid(25, SCHEDULE),
        SCHEDULE,
        noise=NoiseSource(range(len(start_noise))),
    )
    slow = sample_ancestral(
        gmm_denoiser,
        start_noise,
        time_grid(500, SCHEDULE),
        SCHEDULE,
        noise=NoiseSource(range(1, len(start_noise) + 1)),
    )
    for a, b in zip(moments(fast), moments(slow), strict=True):
        torch.testing.assert_close(a, b, atol=0.03, rtol=0)
    assert abs(float((fast[:, 0] < 0).double().mean() - (slow[:, 0] < 0).double().mean())) < 0.03


def test_first_dpmpp_2m_sde_step_is_the_ancestral_step(start_noise):
    """Before it has a previous x0 to extrapolate from, the SDE solver is first order, and
    its first-order step is the ancestral posterior step: same noise, same state."""
    grid = time_grid(10, SCHEDULE)
    states = {}
    for name in ("ancestral", "dpmpp_2m_sde"):
        seen = []
        sample(
            name,
            gmm_denoiser,
            start_noise[:256],
            grid,
            SCHEDULE,
            noise=NoiseSource(range(256)),
            callback=lambda i, t, x, x0, seen=seen: seen.append(x.clone()),
        )
        states[name] = seen
    torch.testing.assert_close(states["dpmpp_2m_sde"][1], states["ancestral"][1])
    assert not torch.allclose(states["dpmpp_2m_sde"][2], states["ancestral"][2])


def test_ancestral_step_is_the_posterior():
    """With a fixed x0, one ancestral step draws from q(x_s | x_t, x0) (Kingma et al. eq. 33)."""
    x0, x_t = (
        torch.full((20000, 1), 0.7, dtype=torch.float64),
        torch.full((20000, 1), -0.2, dtype=torch.float64),
    )
    t, s = 0.6, 0.4
    out = sample_ancestral(
        lambda x, _: x0, x_t, [t, s, 0.0], SCHEDULE, noise=NoiseSource(range(20000)), callback=None
    )
    # sample_ancestral returns x0 at the final step; take the intermediate state instead
    states = []
    sample_ancestral(
        lambda x, _: x0,
        x_t,
        [t, s, 0.0],
        SCHEDULE,
        noise=NoiseSource(range(20000)),
        callback=lambda i, tt, x, x0_: states.append(x.clone()),
    )
    x_s = states[1]
    (a_t, s_t), (a_s, s_s) = (
        alpha_sigma(SCHEDULE(torch.tensor(v, dtype=torch.float64))) for v in (t, s)
    )
    a_ts, var_ts = a_t / a_s, s_t**2 - (a_t / a_s) ** 2 * s_s**2
    mean = a_ts * s_s**2 / s_t**2 * -0.2 + a_s * var_ts / s_t**2 * 0.7
    var = var_ts * s_s**2 / s_t**2
    assert abs(float(x_s.mean()) - float(mean)) < 4 * math.sqrt(float(var) / 20000)
    assert abs(float(x_s.var()) / float(var) - 1) < 0.05
    torch.testing.assert_close(out, x0)


def test_noise_is_per_image_not_per_batch():
    alone = NoiseSource([7])((3, 4, 4))
    batch = NoiseSource([5, 7, 9])((3, 4, 4))
    torch.testing.assert_close(alone[0], batch[1])
    assert not torch.equal(batch[0], batch[1])


def test_same_seed_same_samples(start_noise):
    run = [
        sample(
            "ancestral",
            gmm_denoiser,
            start_noise[:64],
            time_grid(20, SCHEDULE),
            SCHEDULE,
            noise=NoiseSource(range(64)),
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(run[0], run[1], rtol=0, atol=0)


def test_unknown_sampler_names_the_choices(start_noise):
    with pytest.raises(ValueError, match="dpmpp_2m"):
        sample("euler", gmm_denoiser, start_noise, [1.0, 0.0], SCHEDULE, noise=NoiseSource([0]))
