"""Building blocks shared by the algorithms: seeded initialisers and "apply a weight like the base layer"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import ConvSpec

__all__ = ["uniform", "normal", "zeros", "apply_weight", "pad_input"]

_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)


def _init_device(generator: torch.Generator | None) -> torch.device:
    # Draw on the generator's own device (CPU unless the caller passes a CUDA generator), in float32,
    # so a given seed yields the same numbers whatever dtype/device the module finally lives on.
    return generator.device if generator is not None else torch.device("cpu")


def uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """float32 tensor of ``shape`` drawn from U(-bound, bound)."""
    out = torch.empty(shape, dtype=torch.float32, device=_init_device(generator))
    return out.uniform_(-bound, bound, generator=generator)


def normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> torch.Tensor:
    """float32 tensor of ``shape`` drawn from N(0, std²)."""
    out = torch.empty(shape, dtype=torch.float32, device=_init_device(generator))
    return out.normal_(0.0, std, generator=generator)


def zeros(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """float32 zeros on the same device as the random draws."""
    return torch.zeros(shape, dtype=torch.float32, device=_init_device(generator))


def _explicit_padding(conv: ConvSpec, kernel: tuple[int, ...]) -> list[int]:
    """``F.pad`` amounts (last spatial dim first) equivalent to ``conv.padding``."""
    ndim = len(kernel)
    if conv.padding == "valid":
        per_dim = [(0, 0)] * ndim
    elif conv.padding == "same":
        # Same rule nn.ConvNd uses: total = dilation*(k-1), the odd pixel goes to the end.
        dilation = conv.per_dim("dilation", ndim)
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        per_dim = [(t // 2, t - t // 2) for t in totals]
    else:
        per_dim = [(p, p) for p in conv.per_dim("padding", ndim)]
    return [amount for pair in reversed(per_dim) for amount in pair]


def pad_input(
    x: torch.Tensor, conv: ConvSpec, kernel: tuple[int, ...]
) -> tuple[torch.Tensor, int | tuple[int, ...] | str]:
    """Pre-pad ``x`` for non-zero padding modes; returns ``(x, padding to give F.convNd)``.

    Zero padding is left to the conv op itself (cheaper, and handles 'same'); reflect/replicate/circular
    must be applied to the input first, exactly as ``nn.ConvNd`` does, after which the conv runs unpadded.
    """
    if conv.padding_mode == "zeros":
        return x, conv.padding
    return F.pad(x, _explicit_padding(conv, kernel), mode=conv.padding_mode), 0


def conv_nd(
    x: torch.Tensor, weight: torch.Tensor, conv: ConvSpec, padding: int | tuple[int, ...] | str
) -> torch.Tensor:
    """``F.conv{1,2,3}d`` picked from ``weight.dim()``; no bias, groups ignored (always 1 here)."""
    fn = _CONV_FNS[weight.dim() - 3]
    return fn(x, weight, None, conv.stride, padding, conv.dilation)


def apply_weight(x: torch.Tensor, weight: torch.Tensor, conv: ConvSpec | None) -> torch.Tensor:
    """Run ``x`` through the base layer's op with ``weight`` instead of its own (no bias).

    x: ``[..., in]`` for Linear, ``[N, in, *spatial]`` (or unbatched ``[in, *spatial]``) for conv.
    weight: ``[out, in]`` or ``[out, in, *kernel]``.
    """
    if conv is None:
        return F.linear(x, weight)
    x, padding = pad_input(x, conv, tuple(weight.shape[2:]))
    return conv_nd(x, weight, conv, padding)
