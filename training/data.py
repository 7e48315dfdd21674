"""Training samples and the seeded batch order (buckets of equal shapes, so mixed sizes train)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One training example. latent [C, H, W] (model space); cond: model kwargs, each [1, ...]."""

    latent: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    def bucket_key(self) -> tuple:
        return (tuple(self.latent.shape), tuple(sorted((k, tuple(v.shape)) for k, v in self.cond.items())))


def batch_order(samples: Sequence[Sample], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless epochs of index batches. Each batch holds samples of one shape; a bucket smaller than
    batch_size gives smaller batches. Order is a pure function of the generator's state."""
    buckets: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        buckets.setdefault(s.bucket_key(), []).append(i)
    groups = list(buckets.values())
    while True:
        epoch: list[list[int]] = []
        for group in groups:
            perm = torch.randperm(len(group), generator=generator).tolist()
            shuffled = [group[j] for j in perm]
            epoch.extend(shuffled[k : k + batch_size] for k in range(0, len(shuffled), batch_size))
        for j in torch.randperm(len(epoch), generator=generator).tolist():
            yield epoch[j]


def collate(samples: Sequence[Sample], indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, dict]:
    """Stack latents to [B, C, H, W] and concatenate each conditioning kwarg along the batch."""
    latents = torch.stack([samples[i].latent for i in indices]).to(device)
    keys = samples[indices[0]].cond.keys()
    cond = {k: torch.cat([samples[i].cond[k] for i in indices]).to(device) for k in keys}
    return latents, cond
