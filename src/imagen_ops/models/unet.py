"""The U-Net of every cascade stage: Imagen's base model and its Efficient U-Net variant.

Reads bottom-up: primitives, blocks, embeddings, the network. Conditioning (Saharia et al.
2022, section 2 and appendix B):
- the noise level (log-SNR), the attention-pooled text and, for super-resolution stages,
  the augmentation level are summed into one embedding that scales and shifts (FiLM) every
  residual block;
- text tokens (LayerNorm, then projected) are concatenated to the keys and values of the
  attention layers, with a learned null token that is always present, so an all-False text
  mask is the unconditional model used by classifier-free guidance;
- super-resolution stages take the upsampled low-resolution image on extra input channels;
- with `layout_grid` (not in the paper, issue #13), a head's text -> layout prediction is
  the prior mean the network denoises around (`UNet`, `LayoutHead`).
`efficient=True` is the Efficient U-Net: every level resamples before (down) or after (up)
its convolutions, so the blocks of the first level already run at half resolution, skip
connections are scaled by 1/sqrt(2), and one residual block at full resolution joins the
stem's features to the output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagen_ops.config import UNetConfig
from imagen_ops.diffusion.objectives import OBJECTIVES, target
from imagen_ops.diffusion.schedules import alpha_sigma
from imagen_ops.models.layers import Linear, linear

__all__ = ["LayoutHead", "LayoutPrior", "UNet", "layout_loss", "layout_target", "mode_errors"]


# ------------------------------------------------------------------------- primitives


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalizes channels-last bfloat16 CPU activations in NCHW.

    PyTorch's CPU kernel for channels-last bfloat16 input is 5-10x slower than its NCHW
    kernel, forward and backward, while oneDNN's convolutions are faster in channels-last;
    two copies around the norm keep both fast (BENCHMARKS: "Channels-last on the CPU").
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            y = super().forward(x.contiguous())
            return y.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Residual branches start as the identity (their last layer outputs zeros)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with the softmax in float32; mask broadcasts to the scores."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, tokens, heads * dim) -> (B, heads, tokens, dim), the layout of masked_attention."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, heads, tokens, dim) -> (B, tokens, heads * dim): split_heads undone."""
    return t.transpose(1, 2).flatten(2)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Multi-head attention over (B, heads, tokens, dim); key_mask (B, S) is True to attend.

    `scaled_dot_product_attention` everywhere except bf16 / fp16 on the CPU, where its
    kernel is ~3x slower than the explicit product for these short sequences (BENCHMARKS.md,
    "attention on CPU"), and a single query (the pooled text) on the CPU, where its kernel's
    sums follow the batch: an image alone and in a batch rounded apart.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if q.device.type != "cpu" or (q.dtype == torch.float32 and q.shape[-2] > 1):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return explicit_attention(q, k, v, mask)


# ----------------------------------------------------------------------------- blocks


def _coordinates(x: Tensor) -> Tensor:
    """(B, 2, H, W) y and x in [-1, 1]: without them a convolutional U-Net knows where it
    is only from the zero padding, and "to the left of" needs a left."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, -1, -1, -1)


POSITION_FREQS = 4


def _fourier_coordinates(x: Tensor) -> Tensor:
    """(H * W, 4 * POSITION_FREQS) sin / cos of y and x in [-1, 1] at frequencies pi * k / 2
    (the lowest is monotonic across the image: left and right differ)."""
    yx = _coordinates(x[:1]).flatten(2)[0].T  # (HW, 2)
    angles = (yx[:, :, None] * torch.arange(1, POSITION_FREQS + 1, device=x.device)).flatten(1)
    return torch.cat([(angles * math.pi / 2).sin(), (angles * math.pi / 2).cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with FiLM (scale-shift) from the conditioning embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels, with the text tokens appended to keys and values.

    `self_attention=False` attends to text only (cross-attention); `text=False` to pixels only.
    `position=True` adds a learned projection of 2D position encodings to the pixel tokens,
    so queries know where they are (issue #13's experiment; off by default).
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        text_width: int,
        *,
        self_attention: bool,
        text: bool,
        position: bool = False,
    ):
        super().__init__()
        self.heads, self.self_attention, self.text = channels // head_dim, self_attention, text
        self.norm = group_norm(channels)
        self.position = Linear(4 * POSITION_FREQS, channels) if position else None
        self.to_q = Linear(channels, channels)
        self.to_kv = Linear(channels, 2 * channels) if self_attention else None
        self.to_kv_text = Linear(text_width, 2 * channels) if text else None
        self.out = zero_init(Linear(channels, channels))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.position is not None:
            tokens = tokens + self.position(_fourier_coordinates(x))
        keys, masks = [], []
        if self.self_attention:
            keys.append(self.to_kv(tokens))
            masks.append(torch.ones(b, h * w, dtype=torch.bool, device=x.device))
        if self.text:
            keys.append(self.to_kv_text(text))
            masks.append(text_mask)
        k, v = torch.cat(keys, dim=1).chunk(2, dim=-1)
        mask = torch.cat(masks, dim=1) if self.text else None
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(tokens), k, v))
        out = self.out(merge_heads(masked_attention(q, k, v, mask)))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, each optionally followed
    by attention."""

    def __init__(
        self,
        chans: list[tuple[int, int]],
        cfg: UNetConfig,
        text_width: int,
        self_attention: bool,
        text: bool,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(i, o, cfg.embedding_dim, cfg.dropout) for i, o in chans
        )
        self.attns = nn.ModuleList(
            AttentionBlock(
                o,
                cfg.attention_head_dim,
                text_width,
                self_attention=self_attention,
                text=text,
                position=cfg.attention_position,
            )
            if self_attention or text
            else nn.Identity()
            for _, o in chans
        )


# ------------------------------------------------------------------------- embeddings


def sinusoidal(x: Tensor, dim: int, min_freq: float = 1 / 20, max_freq: float = 20.0) -> Tensor:
    """Sin/cos features of a log-SNR, frequencies geometric in [min_freq, max_freq]: they
    resolve log-SNR differences from ~0.05 to the whole [-15, 15] range."""
    freqs = torch.exp(
        torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2, device=x.device)
    )
    angles = x.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class NoiseEmbedding(nn.Module):
    """log-SNR -> embedding (the noise level, or the SR augmentation level)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(Linear(dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, logsnr: Tensor) -> Tensor:
        return self.mlp(sinusoidal(logsnr, self.dim))


def position_encoding(length: int, width: int, device: torch.device | None = None) -> Tensor:
    """Transformer position encodings (Vaswani et al. 2017), (length, width), float32, built
    on `device`: one built on the CPU is a host-to-device copy in every training step."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    steps = torch.arange(0, width, 2, dtype=torch.float32, device=device)
    freq = torch.exp(-math.log(10_000) * steps / width)
    out = torch.zeros(length, width, device=device)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out


class TransformerLayer(nn.TransformerEncoderLayer):
    """A pre-norm nn.TransformerEncoderLayer (its parameters, names and initialisation, no
    dropout) computed through `linear` and `masked_attention`: torch's own forward, and its
    inference fast path, sum a short batch's rows in other orders."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:  # type: ignore[override]
        """x (B, L, width); key_mask (B, L) True for the tokens to attend to."""
        x = x + multihead_attention(self.self_attn, self.norm1(x), key_mask)
        h = F.relu(linear(self.norm2(x), self.linear1.weight, self.linear1.bias))
        return x + linear(h, self.linear2.weight, self.linear2.bias)


def multihead_attention(
    attn: nn.MultiheadAttention, tokens: Tensor, key_mask: Tensor, query: Tensor | None = None
) -> Tensor:
    """nn.MultiheadAttention's function with its parameters, through `linear` and
    `masked_attention` (no row's sums depend on the batch): self-attention over `tokens`
    (B, L, width), or `query` (B, Q, width) attending to them; key_mask (B, L) True to attend."""
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if query is None:
        q, k, v = linear(tokens, weight, bias).chunk(3, dim=-1)
    else:
        d = attn.embed_dim
        q = linear(query, weight[:d], bias[:d])
        k, v = linear(tokens, weight[d:], bias[d:]).chunk(2, dim=-1)
    q, k, v = (split_heads(t, attn.num_heads) for t in (q, k, v))
    a = merge_heads(masked_attention(q, k, v, key_mask))
    return linear(a, attn.out_proj.weight, attn.out_proj.bias)


class TextConditioning(nn.Module):
    """LayerNorm + projection of the frozen encoder's tokens, a learned null token, and an
    attention-pooled summary that joins the noise embedding (Imagen's pooled text).

    `layers` > 0 adds position encodings and runs that many trainable Transformer layers
    over the null token and the projected tokens, as the scorer's text head does: the
    relation word hardly changes a frozen encoder's noun tokens (cosine 0.998 between "left
    of" and "right of" in MiniLM's layer 3), and cross-attention reads each token on its own.
    Issue #13's experiment; off by default (BENCHMARKS.md: it did not make the layout follow
    the relation word).
    """

    def __init__(
        self,
        text_dim: int,
        width: int,
        emb_dim: int,
        head_dim: int,
        layers: int = 0,
        pooled: bool = True,
    ):
        super().__init__()
        self.heads = max(1, width // head_dim)
        self.proj = nn.Sequential(nn.LayerNorm(text_dim), Linear(text_dim, width))
        self.null = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pooled = pooled
        if pooled:  # Imagen's pooled text; without it text reaches pixels by attention alone
            self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.to_kv = Linear(width, 2 * width)
            self.to_emb = nn.Sequential(nn.LayerNorm(width), Linear(width, emb_dim))
        self.layers = nn.ModuleList(TransformerLayer(width, self.heads) for _ in range(layers))

    def forward(self, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return (tokens with the null token first, their mask, pooled embedding or None)."""
        b = text.shape[0]
        tokens = torch.cat([self.null.expand(b, -1, -1), self.proj(text)], dim=1)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        if len(self.layers):  # the null token is always there: no row is fully masked
            tokens = tokens + position_encoding(*tokens.shape[1:], tokens.device).to(tokens)
            for layer in self.layers:
                tokens = layer(tokens, mask)
        if not self.pooled:
            return tokens, mask, None
        q = self.query.expand(b, -1, -1)
        q, k, v = (split_heads(t, self.heads) for t in (q, *self.to_kv(tokens).chunk(2, dim=-1)))
        pooled = masked_attention(q, k, v, mask)
        return tokens, mask, self.to_emb(merge_heads(pooled)[:, 0])


class LayoutPrior(NamedTuple):
    """A Gaussian mixture over an image's grid x grid cell means, given its caption.

    One mode is a plain regression. Several let a caption whose layout the data leaves open
    ("a red circle and a blue square": either side, anywhere) keep its layouts apart instead
    of averaging them into one centred blend of both colors (BENCHMARKS: layout modes).
    """

    means: Tensor  # (B, K, 3, grid, grid): one layout per mode
    logits: Tensor  # (B, K): the modes' log-weights, unnormalised
    log_var: Tensor  # (): log-variance of each cell mean around its mode

    def mean(self) -> Tensor:
        """(B, 3, grid, grid): the mixture's mean, the caption's expected layout."""
        return self._mix(self.logits.float().softmax(dim=1))

    def _mix(self, weights: Tensor) -> Tensor:
        """(B, K) weights -> (B, 3, grid, grid): the modes' weighted sum."""
        return (weights[:, :, None, None, None] * self.means.float()).sum(1)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """(B, 3, grid, grid): E[layout | caption, x_t], the modes weighted by how well each
        explains the noisy image's cell means (alpha * mode, variance alpha^2 var + sigma^2 / n
        for n pixels a cell). At high noise that is the caption's weights; as the sampler
        lowers the noise the seed's own draw commits to one mode."""
        if self.means.shape[1] == 1:
            return self.means[:, 0]
        grid = self.means.shape[-1]
        cells = layout_target(x_t, grid)
        alpha, sigma = alpha.float().flatten(), sigma.float().flatten()
        n = x_t.shape[-2] * x_t.shape[-1] / grid**2
        var = alpha**2 * self.log_var.float().exp() + sigma**2 / n
        distance = cells[:, None] - alpha[:, None, None, None, None] * self.means.float()
        log_lik = -distance.square().flatten(2).sum(-1) / (2 * var[:, None])
        return self._posterior(log_lik).mean()

    def nearest(self, images: Tensor) -> Tensor:
        """(B, 3, grid, grid): the mode nearest each image's cell means (B, 3, H, W), the
        assignment layout_loss fits the weights to: what `layout_condition: mode` conditions
        on (training: the clean image; sampling: the seed's drawn mode)."""
        return self._pick(mode_errors(self, images).argmin(dim=1))

    def given(self, image: Tensor, known: Tensor) -> LayoutPrior:
        """The prior given the pixels of `image` (B, 3, H, W) where `known` (B, 1, H, W) is 1:
        each mode's weight times the likelihood of those pixels' cell means, a cell counted by
        the share of it that is known. Inpainting draws its mode from this, so the layout fits
        the pixels it keeps."""
        grid = self.means.shape[-1]
        known = known.float()
        cover = layout_target(known, grid)  # (B, 1, grid, grid): the share of a cell known
        cells = layout_target(image.float() * known, grid) / cover.clamp(min=1e-6)
        error = (cells[:, None] - self.means.float()).square() * cover[:, None]
        log_lik = -error.flatten(2).sum(-1) / (2 * self.log_var.float().exp())
        return self._posterior(log_lik)

    def _posterior(self, log_lik: Tensor) -> LayoutPrior:
        """The mixture with each mode's weight times its likelihood (B, K), in log space."""
        return self._replace(logits=self.logits.float().log_softmax(dim=1) + log_lik)

    def drawn(self, u: Tensor) -> Tensor:
        """(B, 3, grid, grid): the mode at quantile u (B,) in [0, 1) of the weights (the
        caption's, or `given` kept pixels), so uniform u draw each mode with its weight."""
        cdf = self.logits.float().softmax(dim=1).cumsum(dim=1)
        k = (cdf < u.float()[:, None]).sum(dim=1).clamp(max=self.means.shape[1] - 1)
        return self._pick(k)

    def _pick(self, k: Tensor) -> Tensor:
        return self.means.float()[torch.arange(len(k), device=k.device), k]


class LayoutHead(nn.Module):
    """Text -> a mixture of `modes` layouts of the image's grid x grid mean colors
    (LayoutPrior), fitted on its own loss (layout_loss).

    One learned query per cell reads the tokens by cross-attention, after a trainable
    Transformer layer over them: a readout like this one leaves the word-order plateau of
    BENCHMARKS "The relation is a plateau" in ~1,000 steps, where the U-Net's own
    cross-attention, trained by a loss that hardly weighs the noise levels that decide the
    layout, does not within the demo's budget. The U-Net uses the prediction as its prior
    mean (UNet.forward).
    """

    def __init__(
        self,
        text_dim: int,
        width: int,
        head_dim: int,
        grid: int,
        text_layers: int = 1,
        modes: int = 1,
    ):
        super().__init__()
        self.grid, self.modes = grid, modes
        self.text = TextConditioning(text_dim, width, width, head_dim, layers=text_layers)
        self.queries = nn.Parameter(torch.randn(1, grid * grid, width))
        self.norm = nn.LayerNorm(width)
        self.to_q, self.to_kv = Linear(width, width), Linear(width, 2 * width)
        self.out = nn.Sequential(Linear(2 * width, width), nn.SiLU(), Linear(width, 3 * modes))
        if modes > 1:  # one mode is a regression: no weights, no variance
            self.to_logits = Linear(width, modes)
            self.log_var = nn.Parameter(torch.tensor(math.log(0.04)))

    def forward(self, text: Tensor, mask: Tensor) -> LayoutPrior:
        """(B, L, D) tokens and (B, L) mask -> the layouts, colors in [-1, 1]."""
        tokens, mask, pooled = self.text(text, mask)
        queries = self.norm(self.queries).expand(text.shape[0], -1, -1)
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.text.heads) for t in (self.to_q(queries), k, v))
        read = merge_heads(masked_attention(q, k, v, mask))
        out = self.out(torch.cat([read, queries + pooled[:, None]], dim=-1))
        means = out.transpose(1, 2).unflatten(-1, (self.grid, self.grid)).unflatten(1, (-1, 3))
        if self.modes == 1:
            return LayoutPrior(means, means.new_zeros(means.shape[:2]), means.new_zeros(()))
        # the weights read the pooled text detached: their cross-entropy leaves the text path
        # to the modes' squared error
        return LayoutPrior(means, self.to_logits(pooled.detach()), self.log_var)


def layout_target(x: Tensor, grid: int) -> Tensor:
    """The images' grid x grid mean colors: of clean images, what LayoutHead predicts."""
    return F.adaptive_avg_pool2d(x.float(), grid)


def mode_errors(prior: LayoutPrior, x0: Tensor) -> Tensor:
    """(B, K): each mode's mean squared error against the clean images' cell means."""
    cells = layout_target(x0, prior.means.shape[-1])
    return (prior.means.float() - cells[:, None]).square().flatten(2).mean(-1)


LAYOUT_RELAX = 0.05
"""layout_loss: the share of its squared error that a mode not nearest an image still takes."""


def layout_loss(prior: LayoutPrior, x0: Tensor) -> Tensor:
    """LayoutHead's loss against the clean images' cell means.

    One mode: the squared error. Several: multiple-choice learning (Guzman-Rivera et al.
    2012), a hard EM. The mode nearest each image takes its squared error; the others a
    LAYOUT_RELAX share, so that none is left without data; the weights learn which mode was
    nearest (cross-entropy) and the variance the nearest's error (Gaussian likelihood). Those
    two terms are scaled by the variance (detached), the size of the squared error, so the
    trainer's gradient clipping sees the same loss scale with and without modes."""
    modes = prior.means.shape[1]
    if modes == 1:  # equal to mode_errors(...).mean(), but summed in the order it always was
        return (prior.means[:, 0].float() - layout_target(x0, prior.means.shape[-1])).pow(2).mean()
    sq = mode_errors(prior, x0)
    nearest = sq.detach().argmin(dim=1)
    won = F.one_hot(nearest, modes).float()
    share = (1 - LAYOUT_RELAX) * won + LAYOUT_RELAX / (modes - 1) * (1 - won)
    log_var = prior.log_var.float()
    fit = sq.gather(1, nearest[:, None]).detach().mean() / log_var.exp() + log_var
    assign = F.cross_entropy(prior.logits.float(), nearest)
    return (share * sq).sum(1).mean() + log_var.exp().detach() * (assign + fit)


# ---------------------------------------------------------------------------- network


class UNet(nn.Module):
    """Predicts the stage's objective (eps, x0 or v) from a noisy image and its conditioning.

    With `cfg.layout_grid`, the layout head's prediction mu (detached, upsampled) is the
    prior mean: the network denoises x0 - mu, which is linear in x0, so its input is
    x_t - alpha mu (with mu on 3 more channels) and its output is shifted back by the
    objective's target(mu, 0). At high noise, where the loss barely trains it, a v- or
    x0-predicting network's x0 is then the caption's layout, not the data's mean (an
    eps-prediction's x0 there is x_t / alpha whatever the mean). With `cfg.layout_modes`
    > 1, mu is the head's modes weighted by their posterior given x_t (LayoutPrior), or with
    `cfg.layout_condition: mode` one of them: a discrete layout z, trained on the mode
    nearest x0 and sampled from the caption's weights, which the head learns as the
    nearest mode's probability (layout_loss), so p(z | text) p(x | z, text) is sampled as
    trained. It commits each seed to one layout before the first step, where the posterior
    is still the centred blend of all of them (BENCHMARKS: one layout per seed).

    Args:
        cfg: the architecture.
        text_dim: width D of the text encoder's token embeddings.
        super_resolution: take the upsampled low-res image (3 more input channels) and the
            augmentation level.
        objective: what the stage predicts (eps, x0 or v); needed with `cfg.layout_grid`.
    """

    def __init__(
        self,
        cfg: UNetConfig,
        *,
        text_dim: int,
        super_resolution: bool,
        objective: str | None = None,
    ):
        super().__init__()
        if cfg.layout_grid:
            if objective is None:
                raise ValueError("a U-Net with layout_grid > 0 needs its stage's objective")
            OBJECTIVES.check(objective)  # an unknown name fails here, not at a forward
        self.cfg, self.text_dim, self.super_resolution = cfg, text_dim, super_resolution
        self.objective = objective
        emb, width = cfg.embedding_dim, cfg.embedding_dim
        chans = [cfg.channels * m for m in cfg.channel_mults]
        self.skip_scale = 2**-0.5 if cfg.efficient else 1.0

        self.noise_emb = NoiseEmbedding(emb)
        self.aug_emb = NoiseEmbedding(emb) if super_resolution else None
        self.text = TextConditioning(
            text_dim,
            width,
            emb,
            cfg.attention_head_dim,
            layers=cfg.text_layers,
            pooled=cfg.pooled_text,
        )
        self.layout = (
            LayoutHead(
                text_dim,
                cfg.layout_width or width,
                cfg.attention_head_dim,
                cfg.layout_grid,
                modes=cfg.layout_modes,
            )
            if cfg.layout_grid
            else None
        )
        in_ch = (
            (6 if super_resolution else 3)
            + (2 if cfg.coordinates else 0)
            + (3 if cfg.layout_grid else 0)
        )
        self.conv_in = nn.Conv2d(in_ch, cfg.channels, 3, padding=1)

        self.downs, self.down_levels = nn.ModuleList(), nn.ModuleList()
        skip_chans, ch = [], cfg.channels
        for i, out_ch in enumerate(chans):
            resample = i > 0 or cfg.efficient
            self.downs.append(Downsample(ch) if resample else nn.Identity())
            pairs = [(ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks[i])]
            self.down_levels.append(
                Level(pairs, cfg, width, cfg.self_attention[i], cfg.cross_attention[i])
            )
            skip_chans += [out_ch] * len(pairs)
            ch = out_ch

        self.mid = Level([(ch, ch), (ch, ch)], cfg, width, True, cfg.cross_attention[-1])

        self.up_levels, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            pairs = []
            for _ in range(cfg.num_res_blocks[i]):
                pairs.append((ch + skip_chans.pop(), chans[i]))
                ch = chans[i]
            self.up_levels.append(
                Level(pairs, cfg, width, cfg.self_attention[i], cfg.cross_attention[i])
            )
            self.ups.append(Upsample(ch) if i > 0 or cfg.efficient else nn.Identity())

        # Efficient U-Net: no block runs at full resolution, so the stem's full-resolution
        # features rejoin the output through one residual block (per-pixel detail, e.g. the
        # noise a v- or eps-prediction must reproduce at low noise levels).
        self.out_block = (
            ResBlock(ch + cfg.channels, ch, emb, cfg.dropout) if cfg.efficient else None
        )
        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, 3, 3, padding=1))

    def forward(
        self,
        x: Tensor,
        logsnr: Tensor,
        text: Tensor,
        text_mask: Tensor,
        lowres: Tensor | None = None,
        aug_logsnr: Tensor | None = None,
        *,
        layout_key: Tensor | None = None,
        return_layout: bool = False,
    ) -> Tensor | tuple[Tensor, LayoutPrior]:
        """x (B, 3, H, W); logsnr (B,); text (B, L, D); text_mask (B, L) bool; for SR stages
        lowres (B, 3, H, W) already upsampled to x's size and aug_logsnr (B,).

        `layout_key` (`layout_condition: mode` only, and required there), (B, 3, h, w)
        images: the prior mean is each one's nearest mode (LayoutPrior.nearest). Training
        passes the clean images; sampling the seed's drawn mode of the caption (Cascade),
        whose nearest mode in the unconditional branch of guidance is the caption-free
        layout the data would pair with it, as training's dropped captions see.

        `return_layout` (training, `layout_grid` > 0) also returns the layout head's
        prediction, for its loss; inside a DDP wrapper, so its gradients are reduced too."""
        if self.super_resolution != (lowres is not None and aug_logsnr is not None):
            raise ValueError(
                "super-resolution stages need lowres and aug_logsnr; base stages neither"
            )
        tokens, mask, pooled = self.text(text, text_mask)
        emb = self.noise_emb(logsnr)
        if pooled is not None:
            emb = emb + pooled
        if self.super_resolution:
            emb = emb + self.aug_emb(aug_logsnr)
        emb = F.silu(emb)
        inputs, layout, shift = [x], None, None
        if self.layout is not None:
            layout = self.layout(text, text_mask)
            alpha, sigma = alpha_sigma(logsnr, like=x)
            prior = LayoutPrior(*(t.detach() for t in layout))
            if self.cfg.layout_condition == "mode":
                if layout_key is None:
                    raise ValueError("a U-Net with layout_condition 'mode' needs a layout_key")
                prior = prior.nearest(layout_key)
            else:
                prior = prior.posterior_mean(x, alpha, sigma)
            mean = F.interpolate(prior, size=x.shape[-2:], mode="bilinear").to(x.dtype)
            inputs = [x - alpha * mean, mean]
            shift = target(mean, torch.zeros_like(mean), alpha, sigma, self.objective)
        elif return_layout:
            raise ValueError("return_layout needs a U-Net with layout_grid > 0")
        if layout_key is not None and self.cfg.layout_condition != "mode":
            raise ValueError("layout_key is for a U-Net with layout_condition 'mode'")
        if self.super_resolution:
            inputs.append(lowres)
        if self.cfg.coordinates:
            inputs.append(_coordinates(x))
        x = torch.cat(inputs, dim=1)

        h = stem = self.conv_in(x)
        skips = []
        for down, level in zip(self.downs, self.down_levels, strict=True):
            h = down(h)
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = self._attend(attn, block(h, emb), tokens, mask)
                skips.append(h)
        for block, attn in zip(self.mid.blocks, self.mid.attns, strict=True):
            h = self._attend(attn, block(h, emb), tokens, mask)
        for level, up in zip(self.up_levels, self.ups, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = torch.cat([h, skips.pop() * self.skip_scale], dim=1)
                h = self._attend(attn, block(h, emb), tokens, mask)
            h = up(h)
        if self.out_block is not None:
            h = self.out_block(torch.cat([h, stem * self.skip_scale], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if shift is not None:
            out = out + shift
        return (out, layout) if return_layout else out

    @staticmethod
    def _attend(attn: nn.Module, h: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        return h if isinstance(attn, nn.Identity) else attn(h, tokens, mask)
