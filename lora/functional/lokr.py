"""LoKr: ΔW = scale · w1 ⊗ w2 (Kronecker product), with ``out = a_out·b_out`` and ``in = a_in·b_in``.

Shapes (``K = prod(kernel)``):
    w1:  ``[a_out, a_in]``                 - always the smaller factor, kept full
    w2:  ``[b_out, b_in, *kernel]``         - full, or low-rank as
    w2_a ``[b_out, r]`` @ w2_b ``[r, b_in·K]``
For a conv the kernel lives entirely in w2; w1 is broadcast over it (ΔW[o, i, *k] = w1[o1, i1]·w2[o2, i2, *k]
with o = o1·b_out + o2, i = i1·b_in + i2), which is how ComfyUI and LyCORIS rebuild a LoKr conv weight.

Scale (as ComfyUI's loader computes it): ``alpha / r`` where r is the inner dim of the low-rank w2
(else of a low-rank w1, which files written elsewhere may have); with both factors full, alpha is
ignored and the scale is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..spec import kernel_size
from .ops import uniform, zeros

__all__ = [
    "factorization",
    "LoKrLayout",
    "lokr_layout",
    "lokr_init",
    "lokr_full_w1",
    "lokr_full_w2",
    "lokr_delta_weight",
    "lokr_linear_forward",
]


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(a, b)`` with ``a·b == dim`` and ``a <= b``.

    ``factor < 0``: ``a`` is the largest divisor of ``dim`` not above √dim (as square as possible), so a
    prime ``dim`` gives ``(1, dim)``. ``factor > 0`` asks for a side of that size, as LyCORIS' ``factor``
    option does: if it divides ``dim`` the split is ``{factor, dim/factor}``, otherwise ``a`` is the largest
    divisor not above ``factor`` (nor √dim). Examples: 64 → (8, 8), 320 → (16, 20), 7 → (1, 7),
    ``(64, factor=4)`` → (4, 16), ``(64, factor=32)`` → (2, 32), ``(250, factor=4)`` → (2, 125).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor == 0:
        raise ValueError(f"factor must be a positive int or -1, got {factor!r}")
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = math.isqrt(dim) if factor < 0 else min(factor, math.isqrt(dim))
    # Walk down from the limit; the first divisor met is the closest to √dim allowed. O(√dim), fine for
    # layer sizes, and always terminates at 1.
    for a in range(limit, 0, -1):
        if dim % a == 0:
            return a, dim // a
    return 1, dim  # unreachable (a = 1 always divides); kept for type checkers


@dataclass(frozen=True)
class LoKrLayout:
    """Factor sizes for one layer: ``out = out_a·out_b``, ``in = in_a·in_b``; ``rank`` is w2's inner dim
    when ``low_rank``, else the (full) rank bound ``min(out_b, in_b·K)`` of w2."""

    out_a: int
    out_b: int
    in_a: int
    in_b: int
    kernel: tuple[int, ...]
    low_rank: bool
    rank: int

    @property
    def w1_shape(self) -> tuple[int, int]:
        return (self.out_a, self.in_a)

    @property
    def w2_shape(self) -> tuple[int, ...]:
        return (self.out_b, self.in_b, *self.kernel)

    @property
    def w2_flat_in(self) -> int:
        return self.in_b * math.prod(self.kernel)


def lokr_layout(weight_shape: tuple[int, ...], rank: int, factor: int = -1) -> LoKrLayout:
    """Choose factor sizes and whether w2 is low-rank for a layer and a requested ``rank``.

    w2 is low-rank when ``rank < max(out_b, in_b) / 2`` (LyCORIS' rule: below that the two thin
    factors are cheaper than the full matrix); the rank is then clamped to ``min(out_b, in_b·K)``.
    Otherwise w2 is full and the reported rank is that same bound.
    """
    out_a, out_b = factorization(weight_shape[0], factor)
    in_a, in_b = factorization(weight_shape[1], factor)
    kernel = kernel_size(weight_shape)
    rank_bound = min(out_b, in_b * math.prod(kernel))
    low_rank = rank < max(out_b, in_b) / 2
    return LoKrLayout(
        out_a, out_b, in_a, in_b, kernel, low_rank, min(rank, rank_bound) if low_rank else rank_bound
    )


def lokr_init(
    layout: LoKrLayout, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Initial ``(w1, w2, w2_a, w2_b)`` in float32; exactly one of ``w2`` / ``(w2_a, w2_b)`` is not None.

    w1 and w2_a get the default-layer bound U(±1/sqrt(fan_in)); the w2 side that multiplies in last
    (w2, or w2_b) is 0 so ΔW starts at exactly 0 while its gradient (∝ w1 ⊗ ...) is not.
    """
    w1 = uniform(layout.w1_shape, 1.0 / math.sqrt(layout.in_a), generator)
    if layout.low_rank:
        w2_a = uniform((layout.out_b, layout.rank), 1.0 / math.sqrt(layout.rank), generator)
        w2_b = zeros((layout.rank, layout.w2_flat_in), generator)
        return w1, None, w2_a, w2_b
    return w1, zeros(layout.w2_shape, generator), None, None


def lokr_full_w1(
    w1: torch.Tensor | None, w1_a: torch.Tensor | None, w1_b: torch.Tensor | None
) -> torch.Tensor:
    """w1 ``[a_out, a_in]``, rebuilt as ``w1_a @ w1_b`` when stored low-rank."""
    if w1 is not None:
        return w1
    if w1_a is None or w1_b is None:
        raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
    return w1_a @ w1_b


def lokr_full_w2(
    w2: torch.Tensor | None, w2_a: torch.Tensor | None, w2_b: torch.Tensor | None, w2_shape: tuple[int, ...]
) -> torch.Tensor:
    """w2 ``[b_out, b_in, *kernel]``, rebuilt as ``(w2_a @ w2_b)`` reshaped when stored low-rank."""
    if w2 is not None:
        return w2.reshape(w2_shape)
    if w2_a is None or w2_b is None:
        raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
    return (w2_a @ w2_b).reshape(w2_shape)


def lokr_delta_weight(
    w1: torch.Tensor, w2: torch.Tensor, scale: float, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """ΔW ``[*weight_shape]`` = ``scale · kron(w1, w2)`` for full factors ``w1 [a_out, a_in]``,
    ``w2 [b_out, b_in, *kernel]``."""
    # kron pairs dims positionally; trailing singleton dims on w1 make the kernel come from w2 alone.
    w1 = w1.reshape(*w1.shape, *(1,) * (w2.dim() - 2))
    return (torch.kron(w1, w2) * scale).reshape(weight_shape)


def lokr_linear_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """Bypass ``x @ ΔWᵀ`` for a Linear layer without building the ``[out, in]`` ΔW.

    With ``x`` viewed as ``X [..., a_in, b_in]``, ``kron(w1, w2) x`` is ``w1 @ X @ w2ᵀ`` flattened:
    ``O(a_in·b_in·b_out + a_out·a_in·b_out)`` per row instead of ``O(out·in)``.
    x: ``[..., in]`` → ``[..., out]``.
    """
    a_out, a_in = w1.shape
    b_out, b_in = w2.shape
    grid = x.reshape(*x.shape[:-1], a_in, b_in)
    out = torch.matmul(w1, torch.matmul(grid, w2.T))  # [..., a_out, b_out]
    return out.reshape(*x.shape[:-1], a_out * b_out) * scale
