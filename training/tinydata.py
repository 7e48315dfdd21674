"""Small structured latent datasets for tests, examples and benchmarks (no ComfyUI imports)."""

from __future__ import annotations

import math

import torch


def make_latent_dataset(
    n: int,
    channels: int,
    height: int,
    width: int,
    context_dim: int,
    tokens: int,
    pooled_dim: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Latents made of a few low-frequency waves per sample, so a model can learn them.

    Returns ``latents`` [n, channels, height, width] (unit std), ``context`` [n, tokens, context_dim]
    and ``pooled`` [n, pooled_dim], all fp32 and fully determined by ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    lat = torch.zeros(n, channels, height, width)
    for i in range(n):
        for _ in range(4):
            fy, fx = (torch.randint(0, 3, (2,), generator=gen) + 1).tolist()
            phase = float(torch.rand((), generator=gen)) * 2 * math.pi
            amp = torch.randn(channels, 1, 1, generator=gen)
            lat[i] += amp * torch.cos(2 * math.pi * (fy * ys + fx * xs) + phase)
    lat = (lat - lat.mean()) / lat.std()
    context = torch.randn(n, tokens, context_dim, generator=gen)
    pooled = torch.randn(n, pooled_dim, generator=gen)
    return {"latents": lat, "context": context, "pooled": pooled}
