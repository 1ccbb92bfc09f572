"""Training batches for one cascade stage: prepared images + cached text embeddings.

Batches are a pure function of (seed, step): the data order is a fixed permutation per
epoch and every random choice (crop offsets) comes from a generator seeded by the step.
A resumed run therefore needs only the step to continue exactly, and rank r of a
distributed run takes its slice of the same global batch a single process would see.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from imagen_ops.data.prepare import PreparedData
from imagen_ops.images import from_uint8
from imagen_ops.text.cache import EmbeddingCache
from imagen_ops.text.encoders import TextEmbeddings

__all__ = ["Batch", "StageData", "prefetch", "step_generator"]

T = TypeVar("T")


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A generator that depends only on (seed, step, stream), named like "example/3".

    The triple is hashed, so distinct triples never share a seed: an arithmetic mix such
    as (seed * P + step) * 7 + stream gives example p + 7 of one step the generator of
    example p of the next, and the same noise would return step after step.
    """
    key = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


@dataclass
class Batch:
    images: Tensor  # (B, 3, H, W) in [-1, 1]
    lowres: Tensor | None  # (B, 3, h, w) in [-1, 1], SR stages only (not yet upsampled)
    text: TextEmbeddings

    def to(self, device: torch.device, channels_last: bool = False) -> Batch:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        low = None if self.lowres is None else self.lowres.to(device, memory_format=fmt)
        return Batch(self.images.to(device, memory_format=fmt), low, self.text.to(device))


class StageData:
    """The records of one split at a stage's resolution (and its low-res conditioning)."""

    def __init__(
        self,
        prepared: PreparedData,
        cache: EmbeddingCache,
        resolution: int,
        lowres: int | None,
        *,
        split: str = "train",
        crop: int | None = None,
    ):
        if len(cache) != len(prepared):
            raise ValueError(
                f"embedding cache has {len(cache)} records, prepared data "
                f"{len(prepared)}; rebuild the cache (dvc repro encode_text)"
            )
        self.records = prepared.indices(split)
        if len(self.records) == 0:
            raise ValueError(f"the {split!r} split is empty")
        self.images = prepared.images(resolution)
        self.low = prepared.images(lowres) if lowres is not None else None
        self.cache, self.resolution, self.lowres, self.crop = cache, resolution, lowres, crop

    def __len__(self) -> int:
        return len(self.records)

    def step_indices(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """Record indices of the global batch of `step` (epochs reshuffle, drop the tail)."""
        n = len(self.records)
        per_epoch = max(n // batch_size, 1)
        epoch, j = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=step_generator(seed, epoch, "epoch"))
        if n >= batch_size:
            take = perm[j * batch_size : (j + 1) * batch_size]
        else:  # fewer records than one batch: repeat them
            take = perm[torch.arange(batch_size) % n]
        return self.records[take.numpy()]

    def load(self, indices: np.ndarray, gens: list[torch.Generator] | None = None) -> Batch:
        """Gather a batch; SR stages with `crop` take aligned random crops of both images,
        drawn from each sample's own generator `gens[k]`."""
        order = np.argsort(indices, kind="stable")  # memory-mapped reads in file order
        images = from_uint8(self.images[indices[order]][np.argsort(order)])
        low = None
        if self.low is not None:
            low = from_uint8(self.low[indices[order]][np.argsort(order)])
        if self.crop is not None and self.crop < self.resolution:
            if gens is None:
                raise ValueError("random crops need one generator per sample")
            images, low = self._crop(images, low, gens)
        return Batch(images, low, self.cache.lookup(indices))

    def _crop(
        self, images: Tensor, low: Tensor | None, gens: list[torch.Generator]
    ) -> tuple[Tensor, Tensor | None]:
        """Random crops at the same place in the image and in its low-res version."""
        factor = self.resolution // self.lowres if self.lowres else 1
        span, c = (self.resolution - self.crop) // factor + 1, self.crop // factor
        crops, low_crops = [], []
        for k, g in enumerate(gens):
            y, x = (torch.randint(0, span, (2,), generator=g) * factor).tolist()
            crops.append(images[k, :, y : y + self.crop, x : x + self.crop])
            if low is not None:
                low_crops.append(
                    low[k, :, y // factor : y // factor + c, x // factor : x // factor + c]
                )
        return torch.stack(crops), torch.stack(low_crops) if low is not None else None


def prefetch(
    make: Callable[[int], T], steps: Iterable[int], workers: int = 1, depth: int | None = None
) -> Iterator[tuple[int, T]]:
    """Build batches (`make(step)`) on `workers` background threads, yielded in step order.

    Gathering from memory-mapped arrays and drawing noise release the GIL, so `workers`
    threads build that many steps at once while the training step runs. A step's batch
    is a pure function of its step, so which thread builds it changes nothing. Up to
    `depth` steps (default 2 x workers) are built ahead of the one being consumed. A
    worker's exception is raised here, at its step; when the consumer stops, the steps
    not yet started are cancelled. `workers=0` builds each step in the consumer's thread
    when it is asked for, as DataLoader's `num_workers=0` does; nothing is built ahead, so
    a `depth` with it is refused rather than ignored.
    """
    if workers == 0 and depth is not None:
        raise ValueError(f"prefetch depth={depth} needs workers >= 1 (workers=0 builds inline)")
    if workers == 0:
        yield from ((step, make(step)) for step in steps)
        return
    depth = 2 * workers if depth is None else depth
    if workers < 0 or depth < 1:
        raise ValueError(f"prefetch needs workers >= 0 and depth >= 1, got {workers}, {depth}")
    pending: deque[tuple[int, Future[T]]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch")
    try:
        for step in steps:
            pending.append((step, pool.submit(make, step)))
            if len(pending) > depth:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
