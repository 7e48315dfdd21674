"""LoHa module: parameters ``w1_a``, ``w1_b``, ``w2_a``, ``w2_b``; math in ``lora.functional.loha``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn as nn

from ..functional.loha import loha_delta_weight, loha_init, loha_max_rank
from ..functional.ops import apply_weight
from ..spec import flat_in_features, kernel_size
from .base import AdapterModule

__all__ = ["LoHaModule"]

_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaModule(AdapterModule):
    """ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b); the bypass builds ΔW then runs the base op with it
    (the Hadamard product has no cheaper factored form).

    Parameters: ``w1_a, w2_a [out, r]``, ``w1_b, w2_b [r, in·prod(kernel)]`` (the file layout).
    Rank is clamped to ``min(out, in·prod(kernel))``; ``rank`` is the first pair's (what ComfyUI divides
    alpha by).
    """

    algorithm: ClassVar[str] = "LoHa"
    state_keys: ClassVar[tuple[str, ...]] = _KEYS

    w1_a: nn.Parameter
    w1_b: nn.Parameter
    w2_a: nn.Parameter
    w2_b: nn.Parameter

    def _init_parameters(self, rank: int, generator: torch.Generator | None) -> tuple[int, bool]:
        rank = min(rank, loha_max_rank(self.weight_shape))
        self.w1_a, self.w1_b, self.w2_a, self.w2_b = (
            nn.Parameter(t) for t in loha_init(self.weight_shape, rank, generator)
        )
        return rank, True

    def _load_parameters(
        self, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
    ) -> tuple[int, bool]:
        w1_a, w1_b, w2_a, w2_b = (self._require(sd, key) for key in _KEYS)
        out_features, in_features = self.weight_shape[:2]
        kernel = kernel_size(self.weight_shape)
        in_flat = flat_in_features(self.weight_shape)
        ranks = []
        for key_a, key_b, a, b in ((_KEYS[0], _KEYS[1], w1_a, w1_b), (_KEYS[2], _KEYS[3], w2_a, w2_b)):
            self._check_ndim(key_a, a, 2, f"(out={out_features}, rank)")
            rank = a.shape[1]
            self._check_shape(key_a, a, (out_features, rank))
            # (rank, in, *kernel) is LyCORIS' newer conv layout; it holds the same numbers.
            self._check_shape(key_b, b, (rank, in_flat), (rank, in_features, *kernel))
            ranks.append(rank)
        self.w1_a = self._new_param(w1_a, dtype, device)
        self.w1_b = self._new_param(w1_b.reshape(ranks[0], in_flat), dtype, device)
        self.w2_a = self._new_param(w2_a, dtype, device)
        self.w2_b = self._new_param(w2_b.reshape(ranks[1], in_flat), dtype, device)
        return ranks[0], True

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(_KEYS, (self.w1_a, self.w1_b, self.w2_a, self.w2_b), strict=True))

    def delta_weight(self) -> torch.Tensor:
        """ΔW ``[*weight_shape]`` = ``scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` in the parameters' dtype."""
        return loha_delta_weight(self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.scale, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔY: the base op with ΔW (built in the parameters' dtype for accuracy, then cast to ``x.dtype``)."""
        return apply_weight(x, self.delta_weight().to(x.dtype), self.conv)
