"""DoRA (weight-decomposed LoRA): W' = m · (W + ΔW) / ‖W + ΔW‖, the norm taken per input column
(over the output rows and the kernel), ΔW a LoRA's.

Shapes: magnitude ``m [1, in, 1, ...]`` (``[1, in]`` for Linear), the ``dora_scale`` tensor of a file
in the input-axis layout. With that layout ComfyUI's loader computes exactly this W' (its output-axis
branch divides by the base weight's norm instead of the merged one), and so does LyCORIS with
``wd_on_out=False``. Because the scale is per input column, W' x = (W + ΔW)(c ⊙ x) with
c = m / ‖W + ΔW‖: the bypass scales the layer's input and never writes a weight.

ComfyUI adds float32's eps to the norm; m starts at ‖W‖ + eps, so the layer starts as it was.
"""

from __future__ import annotations

import torch

__all__ = ["DORA_EPS", "dora_column_norm", "dora_input_scale", "dora_merge", "scale_input_channels"]

#: What ComfyUI adds to the norm (float32's eps: its patches are computed in float32).
DORA_EPS = torch.finfo(torch.float32).eps


def dora_column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per input column, float32 ``[1, in, 1, ...]``."""
    w = weight.float()
    return w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, w.shape[1], *(1,) * (w.dim() - 2))


def dora_input_scale(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """c ``[1, in, 1, ...]`` = m / (‖W + ΔW‖ + eps), in float32.

    The norm is a constant for backward (the DoRA paper's section 4.3, as peft does): gradients reach
    m directly and ΔW through the scaled input, and no full-size weight is kept for backward."""
    with torch.no_grad():  # the weight may sit in CPU memory (offloaded): the norm is taken where ΔW is
        norm = dora_column_norm(weight.to(delta.device, torch.float32) + delta.float()) + DORA_EPS
    return magnitude.float() / norm


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = (W + ΔW) · m / (‖W + ΔW‖ + eps) in ``weight``'s dtype (what ComfyUI's loader writes)."""
    merged = weight.float() + delta.float()
    return (merged * (magnitude.float() / (dora_column_norm(merged) + DORA_EPS))).to(weight.dtype)


def scale_input_channels(x: torch.Tensor, scale: torch.Tensor, conv: bool) -> torch.Tensor:
    """``x`` with its input channels multiplied by ``scale [1, in, 1, ...]``, in ``x.dtype``: the last dim
    of a Linear's input, the channel dim of a conv's (``[N, in, *spatial]`` or ``[in, *spatial]``)."""
    flat = scale.flatten().to(x.dtype)
    if conv:
        flat = flat.reshape(-1, *(1,) * (scale.dim() - 2))
    return x * flat
