"""LoRA / LoCon module: parameters ``down``, ``up``; math in ``lora.functional.lora``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn as nn

from ..functional.lora import lora_delta_weight, lora_forward, lora_init, lora_max_rank
from ..spec import flat_in_features, kernel_size
from .base import AdapterModule

__all__ = ["LoRAModule"]

_UP = "lora_up.weight"
_DOWN = "lora_down.weight"


class LoRAModule(AdapterModule):
    """ΔW = scale · up @ down; the bypass runs ``down`` then ``up`` on the input, never building ΔW.

    Parameters: ``down [r, in, *kernel]``, ``up [out, r, 1, ...]`` (``[out, r]`` for Linear).
    Rank is clamped to ``min(out, in·prod(kernel))``.
    """

    algorithm: ClassVar[str] = "LoRA"
    state_keys: ClassVar[tuple[str, ...]] = (_UP, _DOWN)

    down: nn.Parameter
    up: nn.Parameter

    def _init_parameters(self, rank: int, generator: torch.Generator | None) -> tuple[int, bool]:
        rank = min(rank, lora_max_rank(self.weight_shape))
        down, up = lora_init(self.weight_shape, rank, generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        return rank, True

    def _load_parameters(
        self, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
    ) -> tuple[int, bool]:
        up = self._require(sd, _UP)
        down = self._require(sd, _DOWN)
        out_features, in_features = self.weight_shape[:2]
        kernel = kernel_size(self.weight_shape)
        if up.dim() < 2:
            self._check_ndim(_UP, up, 2 + len(kernel), f"(out={out_features}, rank{', 1' * len(kernel)})")
        rank = up.shape[1]
        ones = (1,) * len(kernel)
        # ComfyUI flattens both factors before multiplying, so the 2-D forms of conv factors load too.
        self._check_shape(_UP, up, (out_features, rank, *ones), (out_features, rank))
        self._check_shape(
            _DOWN, down, (rank, in_features, *kernel), (rank, flat_in_features(self.weight_shape))
        )
        self.up = self._new_param(up.reshape(out_features, rank, *ones), dtype, device)
        self.down = self._new_param(down.reshape(rank, in_features, *kernel), dtype, device)
        return rank, True

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        return {_UP: self.up, _DOWN: self.down}

    def delta_weight(self) -> torch.Tensor:
        """ΔW ``[*weight_shape]`` = ``scale · up @ down`` in the parameters' dtype."""
        return lora_delta_weight(self.down, self.up, self.scale, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔY ``up(scale · down(x))`` in ``x.dtype``; ``x`` is the base layer's input."""
        return lora_forward(x, self.down.to(x.dtype), self.up.to(x.dtype), self.scale, self.conv)
