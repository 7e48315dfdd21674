"""LoRA (LoCon for convolutions): ΔW = scale · up @ down.

Shapes (``K = prod(kernel)``, ``kernel = ()`` for Linear):
    down: ``[r, in, *kernel]``    - a conv with the base layer's kernel, stride, padding and dilation
    up:   ``[out, r, 1, ...]``    - a 1x1 conv (``[out, r]`` for Linear)
These are also the layouts of ``lora_down.weight`` / ``lora_up.weight`` in a LoRA file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..spec import ConvSpec, flat_in_features, kernel_size
from .ops import conv_nd, pad_input, uniform, zeros

__all__ = ["lora_max_rank", "lora_init", "lora_delta_weight", "lora_forward"]


def lora_max_rank(weight_shape: tuple[int, ...]) -> int:
    """Largest useful rank: ``min(out, in·K)``; beyond it ``up @ down`` gains nothing."""
    return min(weight_shape[0], flat_in_features(weight_shape))


def lora_init(
    weight_shape: tuple[int, ...], rank: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(down, up)`` in float32: ``down ~ U(±1/sqrt(in·K))``, ``up = 0`` so ΔW starts at exactly 0.

    The bound is what ``kaiming_uniform_(a=sqrt(5))`` gives for a ``fan_in = in·K`` layer, i.e. the
    default init of an ``nn.Linear``/``nn.ConvNd`` of the same fan-in.
    """
    out_features, in_features = weight_shape[:2]
    kernel = kernel_size(weight_shape)
    down = uniform((rank, in_features, *kernel), 1.0 / math.sqrt(flat_in_features(weight_shape)), generator)
    up = zeros((out_features, rank, *(1,) * len(kernel)), generator)
    return down, up


def lora_delta_weight(
    down: torch.Tensor, up: torch.Tensor, scale: float, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """ΔW ``[*weight_shape]`` = ``scale · up[out, r] @ down[r, in·K]``, reshaped to the weight."""
    return (torch.mm(up.flatten(1), down.flatten(1)) * scale).reshape(weight_shape)


def lora_forward(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, conv: ConvSpec | None
) -> torch.Tensor:
    """Bypass output ``ΔW x`` without materialising ΔW: ``up(scale · down(x))``.

    x: ``[..., in]`` (Linear) or ``[N, in, *spatial]`` (conv); returns what the base layer would return
    for weight ΔW and no bias. Costs ``O(r·(in·K + out))`` per output position instead of
    ``O(out·in·K)``. The scale is applied on the r-wide hidden, the narrowest tensor in the chain.
    """
    if conv is None:
        hidden = F.linear(x, down) * scale
        return F.linear(hidden, up)
    x, padding = pad_input(x, conv, tuple(down.shape[2:]))
    hidden = conv_nd(x, down, conv, padding) * scale
    # The 1x1 up conv is a per-position channel mix: no stride, padding or dilation.
    return conv_nd(hidden, up, ConvSpec(), 0)
