"""LoKr module: parameters ``w1`` (or ``w1_a``/``w1_b``) and ``w2`` (or ``w2_a``/``w2_b``); math in
``lora.functional.lokr``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn as nn

from ..functional.lokr import (
    lokr_delta_weight,
    lokr_full_w1,
    lokr_full_w2,
    lokr_init,
    lokr_layout,
    lokr_linear_forward,
)
from ..functional.ops import apply_weight
from ..spec import ConvSpec, kernel_size
from .base import AdapterModule

__all__ = ["LoKrModule"]

_W1, _W1_A, _W1_B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
_W2, _W2_A, _W2_B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"


class LoKrModule(AdapterModule):
    """ΔW = scale · w1 ⊗ w2 (Kronecker product).

    ``out`` and ``in`` are split by ``factorization`` (steered by ``factor``): w1 ``[a_out, a_in]``
    is the small full factor, w2 ``[b_out, b_in, *kernel]`` the large one, kept low-rank as
    ``w2_a [b_out, r] @ w2_b [r, b_in·K]`` when ``rank < max(b_out, b_in) / 2``, else full.
    Low-rank: rank clamped to ``min(b_out, b_in·K)``, ``scale = alpha / rank``. Full: alpha is ignored
    and ``scale = 1`` (as in ComfyUI/LyCORIS); ``rank`` then reports w2's rank bound ``min(b_out, b_in·K)``
    and ``alpha`` equals it. Files written elsewhere may also carry a low-rank ``w1_a``/``w1_b``; those load.
    The Linear bypass applies w1 and w2 to the input separately; convs build ΔW first.
    """

    algorithm: ClassVar[str] = "LoKr"
    state_keys: ClassVar[tuple[str, ...]] = (_W1, _W1_A, _W1_B, _W2, _W2_A, _W2_B)

    w1: nn.Parameter | None
    w1_a: nn.Parameter | None
    w1_b: nn.Parameter | None
    w2: nn.Parameter | None
    w2_a: nn.Parameter | None
    w2_b: nn.Parameter | None

    def __init__(
        self,
        weight_shape: Sequence[int],
        rank: int,
        alpha: float | None = None,
        *,
        conv: ConvSpec | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        factor: int = -1,
    ) -> None:
        """``factor``: preferred size of one side of each split, as LyCORIS' ``factor`` (``-1``: as square as possible)."""
        self._factor = factor
        super().__init__(
            weight_shape, rank, alpha, conv=conv, generator=generator, dtype=dtype, device=device
        )

    def _register_factors(self, **factors: nn.Parameter | None) -> None:
        # Every name is registered (absent ones as None) so attribute access is uniform across layouts.
        for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"):
            self.register_parameter(name, factors.get(name))

    def _init_parameters(self, rank: int, generator: torch.Generator | None) -> tuple[int, bool]:
        layout = lokr_layout(self.weight_shape, rank, self._factor)
        w1, w2, w2_a, w2_b = (None if t is None else nn.Parameter(t) for t in lokr_init(layout, generator))
        self._w2_shape = layout.w2_shape
        self._register_factors(w1=w1, w2=w2, w2_a=w2_a, w2_b=w2_b)
        return layout.rank, layout.low_rank

    def _load_parameters(
        self, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
    ) -> tuple[int, bool]:
        out_features, in_features = self.weight_shape[:2]
        kernel = kernel_size(self.weight_shape)
        factors: dict[str, nn.Parameter | None] = {}

        # --- w1: [a_out, a_in], full or w1_a [a_out, r1] @ w1_b [r1, a_in]; fixes the split.
        rank1 = None
        if _W1 in sd:
            if _W1_A in sd or _W1_B in sd:
                raise ValueError(
                    f"LoKr: both {_W1!r} and {_W1_A!r}/{_W1_B!r} given; a file has one or the other"
                )
            w1 = self._require(sd, _W1)
            self._check_ndim(_W1, w1, 2, "(a_out, a_in)")
            (a_out, a_in), w1_shape_key = w1.shape, _W1
            factors["w1"] = self._new_param(w1, dtype, device)
        elif _W1_A in sd or _W1_B in sd:
            w1_a, w1_b = self._require(sd, _W1_A), self._require(sd, _W1_B)
            self._check_ndim(_W1_A, w1_a, 2, "(a_out, rank)")
            a_out, rank1 = w1_a.shape
            self._check_ndim(_W1_B, w1_b, 2, f"({rank1}, a_in)")
            a_in = w1_b.shape[1]
            self._check_shape(_W1_B, w1_b, (rank1, a_in))
            w1_shape_key = _W1_A + "/" + _W1_B
            factors["w1_a"] = self._new_param(w1_a, dtype, device)
            factors["w1_b"] = self._new_param(w1_b, dtype, device)
        else:
            raise ValueError(f"LoKr: missing key {_W1!r} (or {_W1_A!r} and {_W1_B!r})")
        if out_features % a_out or in_features % a_in:
            raise ValueError(
                f"LoKr: key {w1_shape_key!r} gives factor shape {(a_out, a_in)}, which does not divide "
                f"(out, in) = {(out_features, in_features)} of weight_shape {self.weight_shape}"
            )
        b_out, b_in = out_features // a_out, in_features // a_in
        w2_shape = (b_out, b_in, *kernel)
        w2_flat = (b_out, b_in * math.prod(kernel))

        # --- w2: [b_out, b_in, *kernel] (or its 2-D flattening), full or w2_a [b_out, r] @ w2_b [r, b_in·K].
        rank2 = None
        if _W2 in sd:
            if _W2_A in sd or _W2_B in sd:
                raise ValueError(
                    f"LoKr: both {_W2!r} and {_W2_A!r}/{_W2_B!r} given; a file has one or the other"
                )
            w2 = self._require(sd, _W2)
            self._check_shape(_W2, w2, w2_shape, w2_flat)
            factors["w2"] = self._new_param(w2.reshape(w2_shape), dtype, device)
        elif _W2_A in sd or _W2_B in sd:
            w2_a, w2_b = self._require(sd, _W2_A), self._require(sd, _W2_B)
            self._check_ndim(_W2_A, w2_a, 2, f"({b_out}, rank)")
            rank2 = w2_a.shape[1]
            self._check_shape(_W2_A, w2_a, (b_out, rank2))
            self._check_shape(_W2_B, w2_b, (rank2, w2_flat[1]), (rank2, b_in, *kernel))
            factors["w2_a"] = self._new_param(w2_a, dtype, device)
            factors["w2_b"] = self._new_param(w2_b.reshape(rank2, w2_flat[1]), dtype, device)
        else:
            raise ValueError(f"LoKr: missing key {_W2!r} (or {_W2_A!r} and {_W2_B!r})")

        self._factor = -1
        self._w2_shape = w2_shape
        self._register_factors(**factors)
        # ComfyUI divides alpha by w2's inner dim if w2 is low-rank, else by w1's; all-full ignores alpha.
        if rank2 is not None:
            return rank2, True
        if rank1 is not None:
            return rank1, True
        return min(w2_flat), False

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.w1 is not None:
            out[_W1] = self.w1
        else:
            out[_W1_A], out[_W1_B] = self.w1_a, self.w1_b
        if self.w2 is not None:
            # ComfyUI only lines w1 up with the kernel of a 4-D w2 (Conv2d); for Conv1d/3d it would kron
            # a 2-D w1 against a 3-D/5-D w2 and scramble ΔW. The 2-D flattening [b_out, b_in·K] rebuilds
            # the same ΔW everywhere, so those layers are written flat.
            flat = self.w2.dim() not in (2, 4)
            out[_W2] = self.w2.flatten(1) if flat else self.w2
        else:
            out[_W2_A], out[_W2_B] = self.w2_a, self.w2_b
        return out

    def _full_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1 [a_out, a_in], w2 [b_out, b_in, *kernel])`` rebuilt from whatever is stored."""
        return lokr_full_w1(self.w1, self.w1_a, self.w1_b), lokr_full_w2(
            self.w2, self.w2_a, self.w2_b, self._w2_shape
        )

    def delta_weight(self) -> torch.Tensor:
        """ΔW ``[*weight_shape]`` = ``scale · kron(w1, w2)`` in the parameters' dtype."""
        w1, w2 = self._full_factors()
        return lokr_delta_weight(w1, w2, self.scale, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔY in ``x.dtype``: Linear via ``w1 @ X @ w2ᵀ`` on the reshaped input, conv via ΔW."""
        if self.conv is None:
            w1, w2 = self._full_factors()
            return lokr_linear_forward(x, w1.to(x.dtype), w2.to(x.dtype), self.scale)
        return apply_weight(x, self.delta_weight().to(x.dtype), self.conv)
