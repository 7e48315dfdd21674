"""OFT module: parameter ``blocks``; math in ``lora.functional.oft``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn as nn

from ..functional.oft import oft_block_size, oft_init, oft_merge, oft_rotate_channels, oft_rotation
from .base import AdapterModule

__all__ = ["OFTModule"]

_BLOCKS = "oft_blocks"


class OFTModule(AdapterModule):
    """Rotates the layer's output channels in blocks: y' = b + R^T (y - b), the output of weight
    R^T W with the bias untouched, as ComfyUI's loader patches the weight.

    Parameter: ``blocks [out / n, n, n]`` (the file layout), zero at the start (R = I). ``rank`` is the
    block size n (see ``oft_block_size``: the requested rank where it fits). ``alpha`` is
    the constraint on ‖Q‖ (0: none), not a scale, so ``scale`` is 1.
    """

    algorithm: ClassVar[str] = "OFT"
    state_keys: ClassVar[tuple[str, ...]] = (_BLOCKS,)
    alpha_is_scale: ClassVar[bool] = False

    blocks: nn.Parameter

    def _init_parameters(self, rank: int, generator: torch.Generator | None) -> tuple[int, bool]:
        size = oft_block_size(self.weight_shape[0], rank)
        self.blocks = nn.Parameter(oft_init(self.weight_shape[0], size, generator))
        return size, True

    def _load_parameters(
        self, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
    ) -> tuple[int, bool]:
        blocks = self._require(sd, _BLOCKS)
        out_features = self.weight_shape[0]
        self._check_ndim(_BLOCKS, blocks, 3, "(blocks, size, size) with blocks · size = out")
        size = blocks.shape[1]
        if size < 1 or out_features % size:
            raise ValueError(
                f"{self.algorithm}: key {_BLOCKS!r} has shape {tuple(blocks.shape)}: its block size {size} does not "
                f"divide the output size {out_features} of weight_shape {self.weight_shape}"
            )
        self._check_shape(_BLOCKS, blocks, (out_features // size, size, size))
        self.blocks = self._new_param(blocks, dtype, device)
        return size, True

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        return {_BLOCKS: self.blocks}

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def constraint(self) -> float:
        """The cap on ‖Q‖ (the file's alpha); 0 or less means none, as in ComfyUI's loader."""
        return self.alpha

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, block_size={self.rank}, constraint={self.alpha:g}"

    def rotation(self) -> torch.Tensor:
        """R ``[out / n, n, n]`` in float32."""
        return oft_rotation(self.blocks, self.constraint)

    def delta_weight(self) -> torch.Tensor:
        raise TypeError("OFT has no weight-free ΔW: it rotates the base weight; use merge(weight)")

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """R^T W per block of rows (as W + (R - I)^T W), in ``weight``'s dtype."""
        return oft_merge(weight, self.rotation())

    def adapt_output(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + (R - I)^T (y - b): only the weight's part of the output turns, never the bias."""
        spatial = len(self.weight_shape) - 2  # channels are dim -1 (Linear) or -(spatial + 1) (conv)
        bias = getattr(layer, "bias", None)
        base = y if bias is None else y - bias.to(y.device, y.dtype).reshape(-1, *(1,) * spatial)
        return y + oft_rotate_channels(base, self.rotation(), -1 - spatial)
