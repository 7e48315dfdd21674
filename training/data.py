"""Training samples and the seeded batch order (buckets of equal shapes, so mixed sizes train)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Sample:
    """One training example. latent [C, H, W] or [C, T, H, W] (model space); cond: the model's keyword
    arguments as a sampler passes them for batch 1: tensors [1, ...], lists of such tensors (reference
    latents), or plain values (a frame rate, a token count, None)."""

    latent: torch.Tensor
    cond: dict[str, Any] = field(default_factory=dict)

    def bucket_key(self) -> tuple:
        """Samples batch together when latent shapes, conditioning shapes and plain values all match."""
        return (tuple(self.latent.shape), tuple(sorted((k, signature(v)) for k, v in self.cond.items())))


def signature(value: Any) -> tuple:
    """What must agree for two conditioning values to be concatenated along the batch: the shape of a
    tensor, the signatures of a list's or dict's items, the value itself otherwise."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape[1:]), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, signature(v)) for k, v in value.items())))
    return ("value", repr(value))


def concat(values: Sequence[Any], device: torch.device) -> Any:
    """Batch conditioning values of one signature: tensors along dim 0, lists and dicts item by item,
    plain values (equal within a batch) as they are."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(values)).to(device)
    if isinstance(first, (list, tuple)):
        return type(first)(concat([v[j] for v in values], device) for j in range(len(first)))
    if isinstance(first, dict):
        return {k: concat([v[k] for v in values], device) for k in first}
    return first


class BatchOrder:
    """Seeded epochs of index batches, addressed by the global micro-batch number, so a resumed run
    picks up exactly where a stopped one was. Each batch holds samples of one shape (a bucket smaller
    than batch_size gives smaller batches); every epoch visits every sample once."""

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int):
        buckets: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            buckets.setdefault(s.bucket_key(), []).append(i)
        self.groups = list(buckets.values())
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self._epoch = -1
        self._plan: list[list[int]] = []

    def __call__(self, micro: int) -> list[int]:
        epoch, pos = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            self._plan, self._epoch = self._make_epoch(epoch), epoch
        return self._plan[pos]

    def _make_epoch(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        batches: list[list[int]] = []
        for group in self.groups:
            perm = torch.randperm(len(group), generator=gen).tolist()
            shuffled = [group[j] for j in perm]
            batches.extend(
                shuffled[k : k + self.batch_size] for k in range(0, len(shuffled), self.batch_size)
            )
        return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def mix_seed(seed: int, n: int) -> int:
    return (seed * 6364136223846793005 + n * 1442695040888963407 + 1) % (1 << 63)


def collate(
    samples: Sequence[Sample], indices: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, dict]:
    """Stack latents to [B, C, ...] and batch each conditioning kwarg (see concat)."""
    latents = torch.stack([samples[i].latent for i in indices]).to(device)
    keys = samples[indices[0]].cond.keys()
    cond = {k: concat([samples[i].cond[k] for i in indices], device) for k in keys}
    return latents, cond
