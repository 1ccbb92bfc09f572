"""The U-Net and the cascade: conditioning, masks, guidance batching, end-to-end sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imagen_ops.cascade import Cascade, Stage, augment_lowres
from imagen_ops.config import TextConfig, UNetConfig
from imagen_ops.diffusion.guidance import Conditioning, classifier_free_guidance
from imagen_ops.diffusion.objectives import to_x0
from imagen_ops.diffusion.schedules import alpha_sigma
from imagen_ops.models.layers import Linear
from imagen_ops.models.unet import (
    AttentionBlock,
    GroupNorm,
    LayoutHead,
    LayoutPrior,
    TransformerLayer,
    UNet,
    explicit_attention,
    layout_loss,
    layout_target,
    masked_attention,
    mode_errors,
)
from imagen_ops.text.encoders import TextEmbeddings

from .conftest import tiny_params

TEXT_DIM = 12
UNET = UNetConfig(
    channels=16,
    channel_mults=(1, 2),
    num_res_blocks=(1, 2),
    self_attention=(False, True),
    cross_attention=(True, True),
    attention_head_dim=8,
    embedding_dim=32,
)


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Zero-initialised layers make a fresh U-Net output 0; give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def inputs(b: int = 3, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    text = torch.randn(b, 5, TEXT_DIM, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)[:b]
    return x, torch.linspace(-5, 5, b), text, mask


@pytest.mark.parametrize("efficient", [False, True])
def test_shapes_and_zero_initialised_output(efficient):
    cfg = UNET.model_copy(update={"efficient": efficient})
    net = UNet(cfg, text_dim=TEXT_DIM, super_resolution=False)
    x, logsnr, text, mask = inputs()
    out = net(x, logsnr, text, mask)
    assert out.shape == x.shape
    assert torch.all(out == 0), "residual branches and the output conv start at zero"


def test_efficient_unet_runs_no_block_at_full_resolution():
    sizes = []
    net = UNet(
        UNET.model_copy(update={"efficient": True}), text_dim=TEXT_DIM, super_resolution=False
    )
    for level in (*net.down_levels, *net.up_levels):
        for block in level.blocks:
            block.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    x, logsnr, text, mask = inputs(size=16)
    net(x, logsnr, text, mask)
    assert max(sizes) == 8 and net.skip_scale == pytest.approx(2**-0.5)


@pytest.mark.parametrize("text_layers", [0, 1])
def test_padded_text_tokens_do_not_change_the_output(text_layers):
    cfg = UNET.model_copy(update={"text_layers": text_layers})
    net = randomize(UNet(cfg, text_dim=TEXT_DIM, super_resolution=False))
    x, logsnr, text, mask = inputs()
    garbage = text.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), TEXT_DIM) * 100
    with torch.no_grad():
        torch.testing.assert_close(net(x, logsnr, text, mask), net(x, logsnr, garbage, mask))
        # ...while the real tokens do matter, and an all-False mask is a valid input
        other = text.clone()
        other[mask] += 1.0
        assert not torch.allclose(net(x, logsnr, text, mask), net(x, logsnr, other, mask))
        empty = net(x, logsnr, text, torch.zeros_like(mask))
        assert torch.isfinite(empty).all()
        torch.testing.assert_close(empty, net(x, logsnr, garbage, torch.zeros_like(mask)))


def test_coordinate_channels_tell_the_network_where_it_is():
    """`coordinates`: the first conv sees y and x ramps beside the image (a plain U-Net
    knows where it is only from the zero padding)."""
    cfg = UNET.model_copy(update={"coordinates": True})
    net = randomize(UNet(cfg, text_dim=TEXT_DIM, super_resolution=False))
    seen = []
    net.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x, logsnr, text, mask = inputs()
    with torch.no_grad():
        net(x, logsnr, text, mask)
    (stem,) = seen
    assert stem.shape == (3, 5, 16, 16) and torch.equal(stem[:, :3], x)
    ys, xs, ones = stem[:, 3], stem[:, 4], torch.ones(3, 16)
    assert torch.equal(ys[:, 0], -ones) and torch.equal(ys[:, -1], ones), "y: top -1, bottom 1"
    assert torch.equal(xs[..., 0], -ones) and torch.equal(xs[..., -1], ones), "x: left -1"
    assert torch.equal(xs[:, 5], xs[:, 9]), "x is the same in every row"
    assert UNet(UNET, text_dim=TEXT_DIM, super_resolution=False).conv_in.in_channels == 3
    assert UNet(cfg, text_dim=TEXT_DIM, super_resolution=True).conv_in.in_channels == 8


def test_text_layers_let_each_token_read_the_others_and_their_order():
    """`text_layers`: cross-attention reads tokens one by one, so a noun's token must carry
    the relation word itself ("left" vs "right" barely moves MiniLM's noun tokens)."""
    torch.manual_seed(0)  # the networks' initialisation and the new last word
    _, _, text, mask = inputs(b=1)
    mask = torch.ones_like(mask)
    later = text.clone()
    later[:, -1] = torch.randn(TEXT_DIM)  # another last word
    swapped = text[:, [1, 0, 2, 3, 4]]  # the first two words in the other order
    for layers in (0, 1):
        cfg = UNET.model_copy(update={"text_layers": layers})
        cond = UNet(cfg, text_dim=TEXT_DIM, super_resolution=False).text.eval()
        with torch.no_grad():
            (tokens, _, pooled), (tokens_later, *_), (_, _, pooled_swapped) = (
                cond(t, mask) for t in (text, later, swapped)
            )
        # float32 sums in another order differ by ~1e-7; a word's effect is ~0.1
        first_word_moves = not torch.allclose(tokens[:, 1], tokens_later[:, 1], atol=1e-6)
        order_matters = not torch.allclose(pooled, pooled_swapped, atol=1e-6)
        assert first_word_moves == order_matters == (layers > 0), layers


def test_without_pooled_text_the_film_embedding_sees_no_text():
    """`pooled_text: false`: the text reaches the pixels through attention alone, so what
    every residual block's FiLM reads is the noise level only."""
    x, logsnr, text, mask = inputs()
    other = torch.randn_like(text)
    for pooled in (True, False):
        cfg = UNET.model_copy(update={"pooled_text": pooled})
        net = randomize(UNet(cfg, text_dim=TEXT_DIM, super_resolution=False))
        seen: list[torch.Tensor] = []
        film = net.down_levels[0].blocks[0].film
        film.register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[0]))
        with torch.no_grad():
            a, b = net(x, logsnr, text, mask), net(x, logsnr, other, mask)
        assert not torch.allclose(a, b), "the text still matters"
        assert torch.equal(seen[0], seen[1]) != pooled
        assert hasattr(net.text, "query") == pooled, "no pooling weights to train for nothing"


def test_attention_position_tells_the_attention_where_each_pixel_is():
    """`attention_position`: on an image that is the same everywhere, attention without
    position encodings answers the same at every pixel; with them left and right differ,
    so a left pixel can look for the object the caption puts on the left."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 1, 1).expand(1, 64, 4, 4)
    text, mask = torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool)
    for position in (False, True):
        attn = AttentionBlock(64, 32, 32, self_attention=True, text=True, position=position)
        nn.init.normal_(attn.out.weight)  # zero-initialised: the identity would hide it
        with torch.no_grad():
            out = attn(x, text, mask)
        varies = not torch.allclose(out[..., 0], out[..., -1])
        assert varies == position
        assert hasattr(attn.position, "weight") == position
    net = UNet(
        UNET.model_copy(update={"attention_position": True}),
        text_dim=TEXT_DIM,
        super_resolution=False,
    )
    blocks = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(b.position is not None for b in blocks), "the switch reaches every level"


def test_super_resolution_needs_its_conditioning():
    net = randomize(UNet(UNET, text_dim=TEXT_DIM, super_resolution=True))
    x, logsnr, text, mask = inputs()
    with pytest.raises(ValueError, match="lowres"):
        net(x, logsnr, text, mask)
    with torch.no_grad():
        a = net(x, logsnr, text, mask, torch.zeros_like(x), torch.zeros(3))
        b = net(x, logsnr, text, mask, torch.ones_like(x), torch.zeros(3))
        c = net(x, logsnr, text, mask, torch.zeros_like(x), torch.full((3,), 5.0))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_matches_sdpa(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask[:, None, None, :]
    )
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(
        explicit_attention(q, k, v, mask[:, None, None, :]).float(), ref, atol=tol, rtol=tol
    )
    torch.testing.assert_close(masked_attention(q, k, v, mask).float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_keeps_channels_last_and_computes_the_nchw_norm(dtype):
    """models.unet.GroupNorm: channels-last in, channels-last out, with the values and
    gradients of nn.GroupNorm on the same activations laid out NCHW (the bf16 CPU path
    normalizes a contiguous copy)."""
    torch.manual_seed(0)
    norm = GroupNorm(8, 32)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    plain = nn.GroupNorm(8, 32)
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(4, 32, 8, 8).to(dtype)
    nhwc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    nchw = x.clone().requires_grad_()
    out, ref = norm(nhwc), plain(nchw)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    # bf16: exactly, it is the same kernel on the same values; fp32 runs torch's NHWC kernel
    tol = 0.0 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(nhwc.grad, nchw.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(norm.weight.grad, plain.weight.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(norm.bias.grad, plain.bias.grad, atol=tol, rtol=tol)


def test_linear_rows_do_not_depend_on_how_many_come_with_them():
    """models.unet.Linear: a row's output is the same alone, among a few or among many
    (nn.Linear's is not on an AVX-512 AMD host below 12 rows), with gradients through the
    padding equal to nn.Linear's."""
    torch.manual_seed(0)
    layer = Linear(48, 96)
    x = torch.randn(64, 48)
    with torch.no_grad():
        full = layer(x)
        for rows in [*range(1, 20), 33]:
            for start in (0, 7):
                assert torch.equal(layer(x[start : start + rows]), full[start : start + rows])
        assert torch.equal(layer(x[:30].view(5, 6, 48)), full[:30].view(5, 6, 96))
    few = x[:3].clone().requires_grad_()
    layer(few).square().sum().backward()
    plain = torch.nn.Linear(48, 96)
    plain.load_state_dict(layer.state_dict())
    again = x[:3].clone().requires_grad_()
    plain(again).square().sum().backward()
    torch.testing.assert_close(few.grad, again.grad)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)


def test_transformer_layer_is_torchs_and_does_not_depend_on_the_batch():
    """TransformerLayer computes nn.TransformerEncoderLayer's function (its weights load
    into one) in training and inference, and a caption's tokens are the same alone."""
    torch.manual_seed(0)
    layer = TransformerLayer(32, 4)
    torch_layer = torch.nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, batch_first=True, norm_first=True
    )
    torch_layer.load_state_dict(layer.state_dict())
    x = torch.randn(24, 6, 32)
    mask = torch.arange(6) < torch.randint(1, 7, (24, 1))
    for train in (True, False):
        layer.train(train), torch_layer.train(train)
        with torch.set_grad_enabled(train):
            ours, theirs = layer(x, mask), torch_layer(x, src_key_padding_mask=~mask)
        torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for k in (0, 5, 23):
            assert torch.equal(layer(x[k : k + 1], mask[k : k + 1]), ours[k : k + 1])


def test_batched_guidance_equals_two_passes_through_the_network():
    stage = Stage(
        "base",
        tiny_params().stages["base"],
        randomize(
            UNet(tiny_params().stages["base"].unet, text_dim=TEXT_DIM, super_resolution=False)
        ),
        None,
    )
    denoise = stage.denoiser()
    x, _, text, mask = inputs()
    cond, t = Conditioning(text, mask), torch.tensor(0.4)
    with torch.no_grad():
        guided = classifier_free_guidance(denoise, cond, 3.0)(x, t)
        c, u = denoise(x, t, cond), denoise(x, t, cond.without_text())
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classifier_free_guidance(denoise, cond, 1.0)(x, t), c)


def test_augment_lowres_diffuses_to_the_requested_level():
    stage = Stage.build("sr32", tiny_params().stages["sr32"], TEXT_DIM, 16)
    low = torch.rand(4, 3, 16, 16) * 2 - 1
    noise = torch.randn(4, 3, 32, 32)
    up = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    for t in (0.0, 0.3, 1.0):
        out, logsnr = augment_lowres(low, 32, torch.full((4,), t), stage.schedule, noise)
        alpha, sigma = alpha_sigma(stage.schedule(torch.tensor(t)))
        torch.testing.assert_close(logsnr, stage.schedule(torch.full((4,), t)))
        torch.testing.assert_close(out, alpha * up + sigma * noise)
    assert float(logsnr[0]) == pytest.approx(-15.0)  # t = 1 is (almost) pure noise


@pytest.fixture(scope="module")
def tiny_cascade():
    params = tiny_params()
    stages = []
    for i, (name, cfg) in enumerate(params.stages.items()):
        stage = Stage.build(name, cfg, TEXT_DIM, params.lowres_of(name))
        randomize(stage.net, seed=i)
        stage.net.requires_grad_(False)
        stages.append(stage)
    return Cascade(stages, TextConfig()), params.sample


def embeddings(n: int) -> TextEmbeddings:
    g = torch.Generator().manual_seed(5)
    return TextEmbeddings(
        torch.randn(n, 4, TEXT_DIM, generator=g), torch.ones(n, 4, dtype=torch.bool)
    )


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp_2m"])
def test_cascade_samples_end_to_end_deterministically(tiny_cascade, sampler):
    cascade, settings = tiny_cascade
    settings = settings.model_copy(update={"sampler": sampler, "eta": 0.5})
    text = embeddings(3)
    a = cascade.sample(text, settings, seeds=[10, 11, 12])
    assert a.shape == (3, 3, 32, 32) and a.abs().max() <= 1
    b = cascade.sample(text, settings, seeds=[10, 11, 12])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # image k depends on its seed only, not on the batch it is sampled in
    alone = cascade.sample(text[1:2], settings, seeds=[11])
    assert torch.equal(alone[0], a[1])
    assert not torch.allclose(a[0], cascade.sample(text[:1], settings, seeds=[99])[0])


def test_super_resolution_stage_alone_on_a_user_image(tiny_cascade):
    cascade, settings = tiny_cascade
    calls = []
    low = torch.rand(2, 3, 16, 16) * 2 - 1
    out = cascade.sample(
        embeddings(2), settings, lowres=low, callback=lambda stage, *a: calls.append(stage)
    )
    assert out.shape == (2, 3, 32, 32) and set(calls) == {"sr32"}
    calls.clear()  # another size: resized to the input of the first super-resolution stage
    out = cascade.sample(
        embeddings(2),
        settings,
        lowres=torch.zeros(2, 3, 8, 8),
        callback=lambda stage, *a: calls.append(stage),
    )
    assert out.shape == (2, 3, 32, 32) and set(calls) == {"sr32"}


def test_a_mode_stage_keeps_one_drawn_layout_per_seed_whatever_the_batch():
    """`layout_condition: mode` through Cascade.sample (a fresh x0-predicting base, whose x0
    is its prior mean): each seed draws one of the caption's modes and keeps it every step,
    from a stream of its own, so the image does not depend on its batch and the noise is a
    posterior stage's; image-to-image takes the input image's nearest mode instead."""
    base = [
        "stages.base.unet.layout_grid=2",
        "stages.base.unet.layout_modes=3",
        "stages.base.diffusion.objective=x0",
    ]
    params = tiny_params(*base, "stages.base.unet.layout_condition=mode")
    stage = Stage.build("base", params.stages["base"], TEXT_DIM, None)
    posterior = Stage.build("base", tiny_params(*base).stages["base"], TEXT_DIM, None)
    posterior.net.load_state_dict(stage.net.state_dict())
    g = torch.Generator().manual_seed(0)
    n = 24
    text = TextEmbeddings(
        torch.randn(1, 4, TEXT_DIM, generator=g).expand(n, -1, -1), torch.ones(n, 4, dtype=bool)
    )
    settings = params.sample.updated(guidance=1.0, steps=3, batch_size=n)

    def run(stage, settings, **kw):
        steps = []
        out = Cascade([stage], TextConfig()).sample(
            text, settings, callback=lambda *a: steps.append(a[3:]), **kw
        )
        return out, steps

    out, steps = run(stage, settings)
    for size in (5, 1):
        assert torch.equal(out, run(stage, settings.updated(batch_size=size))[0]), size
    with torch.no_grad():
        means = stage.net.layout(text.tokens[:1], text.mask[:1]).means[0]
    ups = torch.nn.functional.interpolate(means, size=(16, 16), mode="bilinear")
    x0 = steps[0][1]
    drawn = [int((x0[i] - ups).abs().flatten(1).amax(1).argmin()) for i in range(n)]
    torch.testing.assert_close(x0, ups[drawn])
    assert len(set(drawn)) == 3, drawn
    assert all(torch.equal(x0, later) for _, later in steps[1:]), "the draw is kept"
    assert torch.equal(steps[0][0], run(posterior, settings)[1][0][0]), "the noise is not moved"

    # guidance: the unconditional branch takes the caption-free mode nearest each draw
    _, steps = run(stage, settings.updated(guidance=2.0))
    with torch.no_grad():
        free = stage.net.layout(text.tokens[:1], torch.zeros_like(text.mask[:1])).means[0]
    paired = [int((free - means[k]).square().flatten(1).mean(1).argmin()) for k in drawn]
    free_ups = torch.nn.functional.interpolate(free, size=(16, 16), mode="bilinear")[paired]
    guided = free_ups + 2.0 * (ups[drawn] - free_ups)
    torch.testing.assert_close(steps[0][1], guided.clamp(-1, 1))

    image = torch.nn.functional.interpolate(means[1:2], size=(24, 24), mode="bilinear")
    _, steps = run(stage, settings, image=image)
    torch.testing.assert_close(steps[0][1], ups[1:2].expand(n, -1, -1, -1))

    # inpainting: every seed draws the mode that the kept left half fits (mode 1), not the
    # one the right half it draws over shows (mode 2)
    with torch.no_grad():
        stage.net.layout.log_var.fill_(math.log(1e-4))
    other = torch.nn.functional.interpolate(means[2:3], size=(24, 24), mode="bilinear")
    image = torch.cat([image[..., :12], other[..., 12:]], dim=-1)
    mask = torch.zeros(1, 1, 24, 24)
    mask[..., 12:] = 1  # draw the right half
    _, steps = run(stage, settings, image=image, mask=mask)
    torch.testing.assert_close(steps[0][1][..., 8:], ups[1:2, ..., 8:].expand(n, -1, -1, -1))


def test_cascade_rejects_stages_that_do_not_chain():
    params = tiny_params()
    base = Stage.build("base", params.stages["base"], TEXT_DIM, None)
    sr = Stage.build("sr32", params.stages["sr32"], TEXT_DIM, 8)
    with pytest.raises(ValueError, match="conditions on 8 px"):
        Cascade([base, sr], TextConfig())


def test_stage_round_trips_through_its_directory(tmp_path):
    from imagen_ops.cascade import load_stage

    stage = Stage.build("sr32", tiny_params().stages["sr32"], TEXT_DIM, 16)
    randomize(stage.net)
    stage.save(tmp_path / "sr32", {"ema": stage.net.state_dict()})
    loaded = load_stage(tmp_path / "sr32")
    x = torch.randn(2, 3, 32, 32)
    args = (
        x,
        torch.zeros(2),
        torch.randn(2, 3, TEXT_DIM),
        torch.ones(2, 3, dtype=torch.bool),
        torch.zeros_like(x),
        torch.zeros(2),
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(*args), stage.net(*args))


def test_layout_target_is_the_mean_color_of_each_cell():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cells = layout_target(x, 2)
    assert cells.shape == (2, 3, 2, 2)
    assert (
        cells[1, 2, 0, 1] == x[1, 2, :2, 2:].mean() and cells[0, 0, 1, 0] == x[0, 0, 2:, :2].mean()
    )


def test_mode_errors_are_each_modes_squared_error_against_the_cells():
    """(B, K): image b against mode k, pooled to the grid first; one mode's loss is their mean."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    prior = LayoutPrior(torch.randn(3, 4, 3, 2, 2, generator=g), torch.zeros(3, 4), torch.zeros(()))
    cells = layout_target(x0, 2)
    expected = torch.tensor(
        [
            [(prior.means[b, k] - cells[b]).square().mean().item() for k in range(4)]
            for b in range(3)
        ]
    )
    torch.testing.assert_close(mode_errors(prior, x0), expected)
    one = LayoutPrior(prior.means[:, :1], prior.logits[:, :1], prior.log_var)
    torch.testing.assert_close(layout_loss(one, x0), mode_errors(one, x0).mean())


@pytest.mark.parametrize("objective", ["v", "eps", "x0"])
def test_layout_head_is_the_prior_mean_of_the_denoiser(objective):
    """`layout_grid`: the network denoises x0 - mu, mu the head's upsampled prediction (on 3
    more input channels). A fresh U-Net (zero output) then predicts x0 - mu as a zero output
    would: v gives x0 = alpha x_t + sigma^2 mu, mu itself at high noise where the loss barely
    trains the network; x0-prediction gives mu; eps-prediction x_t / alpha, as without one."""
    cfg = UNET.model_copy(update={"layout_grid": 2})
    net = UNet(cfg, text_dim=TEXT_DIM, super_resolution=False, objective=objective)
    seen = []
    net.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x, _, text, mask = inputs()
    logsnr = torch.tensor([-15.0, 0.0, 15.0])
    with torch.no_grad():
        out = net(x, logsnr, text, mask)
        prior = net.layout(text, mask).means[:, 0]
        mu = torch.nn.functional.interpolate(prior, size=(16, 16), mode="bilinear")
    assert mu.std() > 0, "the head's prediction is not flat"
    alpha, sigma = alpha_sigma(logsnr, like=x)
    x0 = to_x0(out, x, alpha, sigma, objective)
    expected = {"v": alpha * x + sigma**2 * mu, "eps": x / alpha, "x0": mu}[objective]
    torch.testing.assert_close(x0, expected, atol=1e-4, rtol=1e-4)
    if objective == "v":
        torch.testing.assert_close(x0[0], mu[0], atol=5e-3, rtol=0)
    torch.testing.assert_close(seen[0], torch.cat([x - alpha * mu, mu], dim=1))
    with pytest.raises(ValueError, match="objective"):
        UNet(cfg, text_dim=TEXT_DIM, super_resolution=False)


def test_layout_head_is_trained_by_its_own_loss_alone():
    """The diffusion loss does not reach the head (its input is detached); the head's
    prediction comes back for its regression loss, and only a layout U-Net returns one."""
    cfg = UNET.model_copy(update={"layout_grid": 2})
    net = randomize(UNet(cfg, text_dim=TEXT_DIM, super_resolution=False, objective="v")).train()
    x, logsnr, text, mask = inputs()
    out, layout = net(x, logsnr, text, mask, return_layout=True)
    assert layout.means.shape == (3, 1, 3, 2, 2)
    torch.testing.assert_close(layout.means, net.layout(text, mask).means)
    out.square().sum().backward()
    assert all(p.grad is None for p in net.layout.parameters()), "the prior is detached"
    assert net.conv_in.weight.grad[:, 3:].abs().sum() > 0, "the U-Net reads the prior"
    layout.means.square().sum().backward()
    assert all(p.grad is not None for p in net.layout.parameters())
    with pytest.raises(ValueError, match="layout_grid"):
        randomize(UNet(UNET, text_dim=TEXT_DIM, super_resolution=False))(
            x, logsnr, text, mask, return_layout=True
        )


def test_layout_posterior_is_bayes_rule_over_the_modes():
    """The prior mean of a mixture of layouts given x_t: each mode weighted by its caption
    weight times the likelihood of x_t's cell means, N(alpha mu_k, alpha^2 var + sigma^2 / n)
    with n pixels a cell, computed here with torch.distributions; pure noise keeps the
    caption's weights, a nearly clean image picks the mode it was drawn from."""
    g = torch.Generator().manual_seed(0)
    b, k, grid, size = 3, 4, 2, 8
    prior = LayoutPrior(
        torch.randn(b, k, 3, grid, grid, generator=g) * 0.5,
        torch.randn(b, k, generator=g),
        torch.tensor(0.03).log(),
    )
    x_t = torch.randn(b, 3, size, size, generator=g) * 0.6
    alpha, sigma = alpha_sigma(torch.tensor([-3.0, 0.0, 2.0]), like=x_t)
    cells = x_t.unflatten(2, (grid, -1)).unflatten(-1, (grid, -1)).mean((3, 5))
    a, s = alpha.flatten()[:, None, None, None, None], sigma.flatten()[:, None, None, None, None]
    std = (a**2 * 0.03 + s**2 / (size // grid) ** 2).sqrt()
    likelihood = torch.distributions.Normal(a * prior.means, std)
    log_w = prior.logits.log_softmax(1) + likelihood.log_prob(cells[:, None]).flatten(2).sum(-1)
    expected = (log_w.softmax(1)[:, :, None, None, None] * prior.means).sum(1)
    torch.testing.assert_close(prior.posterior_mean(x_t, alpha, sigma), expected)

    noise_only = prior.posterior_mean(x_t, torch.zeros(b, 1, 1, 1), torch.ones(b, 1, 1, 1))
    torch.testing.assert_close(noise_only, prior.mean())
    up = torch.nn.functional.interpolate(prior.means[:, 2], size=(size, size), mode="nearest")
    alpha, sigma = alpha_sigma(torch.full((b,), 8.0), like=x_t)
    clean = prior.posterior_mean(alpha * up + sigma * x_t, alpha, sigma)
    torch.testing.assert_close(clean, prior.means[:, 2], atol=1e-3, rtol=0)


def test_layout_modes_keep_apart_what_a_caption_leaves_open():
    """One caption, two layouts in the data (red left and blue right, or the reverse): one
    mode regresses their blend, the centred mix the sampler must then break alone; two
    modes learn both layouts and weigh them evenly."""
    left = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    a = torch.stack([left, -torch.ones(2, 2), -left])  # red on the left, blue on the right
    b_ = torch.stack([-left, -torch.ones(2, 2), left])  # the reverse
    x0 = torch.stack([a, b_] * 16).repeat_interleave(4, -1).repeat_interleave(4, -2)
    text, mask = torch.randn(1, 4, TEXT_DIM).expand(32, -1, -1), torch.ones(32, 4, dtype=bool)
    fitted = {}
    for modes in (1, 2):
        torch.manual_seed(0)
        head = LayoutHead(TEXT_DIM, 32, 8, grid=2, modes=modes)
        opt = torch.optim.AdamW(head.parameters(), 1e-2)
        for _ in range(300):
            loss = layout_loss(head(text, mask), x0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        fitted[modes] = head(text[:1], mask[:1])
    blend = fitted[1].means[0, 0]
    torch.testing.assert_close(blend, (a + b_) / 2, atol=0.1, rtol=0, msg="one mode: the blend")
    # each mode takes its layout's images and a 5 % share (LAYOUT_RELAX) of the other's
    expected = torch.stack([0.95 * a + 0.05 * b_, 0.95 * b_ + 0.05 * a])
    means = fitted[2].means[0].detach()
    if (means[0] - a).abs().max() > (means[0] - b_).abs().max():
        means = means.flip(0)
    torch.testing.assert_close(means, expected, atol=0.03, rtol=0)
    torch.testing.assert_close(
        fitted[2].logits.softmax(1), torch.full((1, 2), 0.5), atol=0.1, rtol=0
    )


def test_a_unet_with_layout_modes_denoises_around_their_posterior():
    """`layout_modes`: the U-Net's prior mean is the modes' posterior given x_t, detached;
    the head's multiple-choice loss trains its means, weights and variance."""
    cfg = UNET.model_copy(update={"layout_grid": 2, "layout_modes": 3})
    net = UNet(cfg, text_dim=TEXT_DIM, super_resolution=False, objective="x0").train()
    seen = []
    net.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x, logsnr, text, mask = inputs()
    out, prior = net(x, logsnr, text, mask, return_layout=True)
    assert prior.means.shape == (3, 3, 3, 2, 2) and prior.logits.shape == (3, 3)
    alpha, sigma = alpha_sigma(logsnr, like=x)
    mu = torch.nn.functional.interpolate(
        prior.posterior_mean(x, alpha, sigma).detach(), size=(16, 16), mode="bilinear"
    )
    torch.testing.assert_close(out, mu)  # a fresh x0-prediction is its prior mean
    torch.testing.assert_close(seen[0], torch.cat([x - alpha * mu, mu], dim=1))
    informed = prior.posterior_mean(x, alpha, sigma)[2] - prior.mean()[2]  # log-SNR 5
    assert informed.abs().max() > 1e-3, "x_t, not only the caption, weighs the modes"
    out.square().sum().backward()
    assert all(p.grad is None for p in net.layout.parameters()), "the prior is detached"
    layout_loss(prior, x).backward()
    assert all(p.grad.abs().sum() > 0 for p in net.layout.parameters())


def test_layout_mode_is_the_images_nearest_or_the_weights_quantile():
    """`layout_condition: mode`: clean images take the mode nearest their cell means (the
    assignment layout_loss trains the weights on); quantiles u take the mode where the
    weights' cumulative sum passes u, so uniform u draw each mode with its weight."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(1, 3, 3, 2, 2, generator=g)
    weights = torch.tensor([[0.2, 0.5, 0.3]])
    prior = LayoutPrior(
        means.expand(4, -1, -1, -1, -1), weights.log().expand(4, -1), torch.zeros(())
    )
    near = means[0, [2, 0, 1, 2]] + 0.05 * torch.randn(4, 3, 2, 2, generator=g)
    images = near.repeat_interleave(4, -1).repeat_interleave(4, -2)
    torch.testing.assert_close(prior.nearest(images), means[0, [2, 0, 1, 2]])
    u = torch.tensor([0.1, 0.21, 0.69, 0.71])
    torch.testing.assert_close(prior.drawn(u), means[0, [0, 1, 1, 2]])
    grid = (torch.arange(10_000) + 0.5) / 10_000
    many = LayoutPrior(
        means.expand(10_000, -1, -1, -1, -1), weights.log().expand(10_000, -1), torch.zeros(())
    )
    drawn = many.drawn(grid)
    share = torch.stack([(drawn == means[0, k]).flatten(1).all(1).float().mean() for k in range(3)])
    torch.testing.assert_close(share, weights[0], atol=1e-4, rtol=0)


def test_inpainting_weighs_each_layout_mode_by_the_pixels_it_keeps():
    """LayoutPrior.given: the weights times each mode's likelihood of the kept pixels' cell
    means, a cell counted by its kept share; a mask that keeps nothing changes nothing, and
    kept pixels that match one mode on the kept cells pick it when the variance is small."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(1, 3, 3, 2, 2, generator=g)
    weights = torch.tensor([[0.2, 0.5, 0.3]])
    prior = LayoutPrior(means, weights.log(), torch.tensor(math.log(0.5)))
    image = torch.randn(1, 3, 8, 8, generator=g)
    kept = torch.zeros(1, 1, 8, 8)
    kept[..., :, :4] = 1  # the left column of cells
    kept[..., :2, 4:] = 1  # and half of the top right cell
    cells = torch.stack(
        [image[0, :, :4, :4].mean((1, 2)), image[0, :, 4:, :4].mean((1, 2))], dim=-1
    )  # (3, 2): the left column's cells, top and bottom
    top_right = image[0, :, :2, 4:].mean((1, 2))  # the kept pixels of that cell only
    expected = weights.log() - torch.stack(
        [
            (means[0, k, :, :, 0] - cells).square().sum()
            + 0.5 * (means[0, k, :, 0, 1] - top_right).square().sum()
            for k in range(3)
        ]
    ) / (2 * 0.5)
    torch.testing.assert_close(
        prior.given(image, kept).logits.log_softmax(1), expected.log_softmax(1)
    )
    nothing = prior.given(image, torch.zeros_like(kept))
    torch.testing.assert_close(nothing.logits.softmax(1), weights)
    sharp = prior._replace(log_var=torch.tensor(math.log(1e-4)))
    half = means[0, 1].repeat_interleave(4, -1).repeat_interleave(4, -2)[None]
    left = torch.zeros_like(kept)
    left[..., :4] = 1
    torch.testing.assert_close(
        sharp.given(half, left).logits.softmax(1), torch.tensor([[0.0, 1, 0]])
    )


def test_a_mode_unet_denoises_around_the_mode_its_key_picks():
    """`layout_condition: mode`: the prior mean is the mode nearest the key's cell means
    (never moved by x_t), and the network refuses to run without a key; a posterior U-Net
    refuses one."""
    cfg = UNET.model_copy(update={"layout_grid": 2, "layout_modes": 3, "layout_condition": "mode"})
    net = UNet(cfg, text_dim=TEXT_DIM, super_resolution=False, objective="x0").eval()
    x, logsnr, text, mask = inputs()
    with torch.no_grad():
        prior = net.layout(text, mask)
    for k in range(3):
        key = torch.nn.functional.interpolate(prior.means[:, k], size=(16, 16))
        mu = torch.nn.functional.interpolate(prior.means[:, k], size=(16, 16), mode="bilinear")
        torch.testing.assert_close(net(x, logsnr, text, mask, layout_key=key), mu)
        torch.testing.assert_close(net(x + 0.5, logsnr, text, mask, layout_key=key), mu)
    with pytest.raises(ValueError, match="needs a layout_key"):
        net(x, logsnr, text, mask)
    posterior = UNet(
        cfg.model_copy(update={"layout_condition": "posterior"}),
        text_dim=TEXT_DIM,
        super_resolution=False,
        objective="x0",
    )
    with pytest.raises(ValueError, match="layout_key is for"):
        posterior(x, logsnr, text, mask, layout_key=key)
    one_mode = {**UNET.model_dump(), "layout_grid": 2, "layout_condition": "mode"}
    with pytest.raises(ValueError, match="layout_modes"):
        UNetConfig.model_validate(one_mode)


def test_layout_variance_is_fitted_to_the_nearest_modes_error():
    """The variance the posterior uses is the Gaussian likelihood's: its gradient vanishes
    where it equals the mean squared error of each image's nearest mode, and pushes it
    down from above and up from below."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 2, 3, 2, 2, generator=g)
    x0 = means[:, 0] + 0.3 * torch.randn(4, 3, 2, 2, generator=g)
    error = (x0 - means[:, 0]).square().mean()
    assert ((x0[:, None] - means).square().flatten(2).mean(-1).argmin(1) == 0).all()
    grads = []
    for scale in (1.0, 2.0, 0.5):
        log_var = (error * scale).log().requires_grad_()
        layout_loss(LayoutPrior(means, torch.zeros(4, 2), log_var), x0).backward()
        grads.append(log_var.grad.item())
    assert abs(grads[0]) < 1e-6 and grads[1] > 0 > grads[2]
