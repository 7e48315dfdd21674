"""LoHa: ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), the Hadamard product of two low-rank matrices.

Shapes (``K = prod(kernel)``):
    w1_a, w2_a: ``[out, r]``
    w1_b, w2_b: ``[r, in·K]``    - flattened over the kernel, the layout ``hada_w*_b`` has in a file
The product of two rank-r matrices can reach rank r², which is why LoHa is more expressive per parameter.
"""

from __future__ import annotations

from typing import Any

import torch

from ..spec import flat_in_features
from .ops import normal, zeros

__all__ = ["loha_max_rank", "loha_init", "loha_delta_weight"]


def loha_max_rank(weight_shape: tuple[int, ...]) -> int:
    """Largest useful per-pair rank: ``min(out, in·K)`` (each pair is an ordinary low-rank matrix)."""
    return min(weight_shape[0], flat_in_features(weight_shape))


def loha_init(
    weight_shape: tuple[int, ...], rank: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial ``(w1_a, w1_b, w2_a, w2_b)`` in float32, with ``w2_a = 0`` so ΔW starts at exactly 0.

    ``w1_a ~ N(0, 0.1²)``, ``w1_b, w2_b ~ N(0, 1)``: the first pair starts as a small random matrix, so
    the gradient reaching the zero factor ``w2_a`` (∝ (w1_a @ w1_b) and w2_b) is non-zero from step one.
    """
    out_features = weight_shape[0]
    in_flat = flat_in_features(weight_shape)
    w1_a = normal((out_features, rank), 0.1, generator)
    w1_b = normal((rank, in_flat), 1.0, generator)
    w2_a = zeros((out_features, rank), generator)
    w2_b = normal((rank, in_flat), 1.0, generator)
    return w1_a, w1_b, w2_a, w2_b


class _HadamardOfProducts(torch.autograd.Function):
    """``(w1_a @ w1_b) ⊙ (w2_a @ w2_b) · scale`` that saves only the four factors for backward.

    Plain autograd would keep both ``[out, in·K]`` products alive until backward, per layer; recomputing
    them from the small factors costs two matmuls and saves that memory across the whole network.
    """

    @staticmethod
    def forward(
        ctx: Any, w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        ctx.scale = scale
        return (w1_a @ w1_b) * (w2_a @ w2_b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad = grad * ctx.scale
        # d/dP1 of (P1 ⊙ P2) is grad ⊙ P2, and P = A @ B gives dA = dP @ Bᵀ, dB = Aᵀ @ dP.
        grad_p1 = grad * (w2_a @ w2_b)
        grad_w1_a = grad_p1 @ w1_b.T if ctx.needs_input_grad[0] else None
        grad_w1_b = w1_a.T @ grad_p1 if ctx.needs_input_grad[1] else None
        del grad_p1
        grad_p2 = grad * (w1_a @ w1_b)
        grad_w2_a = grad_p2 @ w2_b.T if ctx.needs_input_grad[2] else None
        grad_w2_b = w2_a.T @ grad_p2 if ctx.needs_input_grad[3] else None
        return grad_w1_a, grad_w1_b, grad_w2_a, grad_w2_b, None


def loha_delta_weight(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    scale: float,
    weight_shape: tuple[int, ...],
) -> torch.Tensor:
    """ΔW ``[*weight_shape]`` = ``scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``.

    The pairs may have different ranks (``w1_b.shape[0] != w2_b.shape[0]``); files written elsewhere can.
    """
    return _HadamardOfProducts.apply(w1_a, w1_b, w2_a, w2_b, float(scale)).reshape(weight_shape)
