"""DoRA module: a LoRA (``down``, ``up``) plus a magnitude per input column; math in
``lora.functional.dora``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn as nn

from ..functional.dora import DORA_EPS, dora_column_norm, dora_input_scale, dora_merge, scale_input_channels
from .lora import LoRAModule

__all__ = ["DoRAModule"]

_SCALE = "dora_scale"


class DoRAModule(LoRAModule):
    """W' = m · (W + scale · up @ down) / ‖W + ΔW‖ per input column. The bypass runs the layer and the
    LoRA on c ⊙ x, c = m / ‖W + ΔW‖, which is W' x + b.

    Parameters: LoRA's ``down``, ``up`` and ``magnitude [1, in, 1, ...]`` (the file's ``dora_scale``).
    A fresh module takes its magnitude from the base weight (``init_from_base``) before it is used.
    """

    algorithm: ClassVar[str] = "DoRA"
    state_keys: ClassVar[tuple[str, ...]] = (*LoRAModule.state_keys, _SCALE)
    changes_input: ClassVar[bool] = True

    magnitude: nn.Parameter

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.weight_shape[1], *(1,) * (len(self.weight_shape) - 2))

    def _init_parameters(self, rank: int, generator: torch.Generator | None) -> tuple[int, bool]:
        result = super()._init_parameters(rank, generator)
        # NaN until init_from_base: a module used without its base weight fails loudly.
        self.magnitude = nn.Parameter(torch.full(self._magnitude_shape(), float("nan")))
        self._unbound = True
        return result

    def _load_parameters(
        self, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
    ) -> tuple[int, bool]:
        result = super()._load_parameters(sd, dtype, device)
        scale = self._require(sd, _SCALE)
        in_features = self.weight_shape[1]
        if scale.shape[0] != 1 and scale.numel() == self.weight_shape[0] and scale.numel() != in_features:
            raise ValueError(
                f"{self.algorithm}: key {_SCALE!r} has shape {tuple(scale.shape)}: a magnitude per output row "
                f"(peft / LyCORIS wd_on_out), which ComfyUI's loader applies differently from the tools that "
                f"wrote it; only the per-input-column layout {self._magnitude_shape()} can be continued"
            )
        if scale.numel() != in_features:
            self._check_shape(_SCALE, scale, self._magnitude_shape())
        self.magnitude = self._new_param(scale.reshape(self._magnitude_shape()), dtype, device)
        self._unbound = False
        return result

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._file_tensors(), _SCALE: self.magnitude}

    @property
    def needs_base(self) -> bool:
        return getattr(self, "_unbound", False)

    def init_from_base(self, weight: torch.Tensor) -> None:
        """m = ‖W‖ + eps per input column: the layer starts exactly as it was (under ComfyUI's formula)."""
        with torch.no_grad():
            self.magnitude.copy_(dora_column_norm(weight) + DORA_EPS)
        self._unbound = False

    def _check_bound(self) -> None:
        if self.needs_base:
            raise RuntimeError(
                "DoRA: the magnitude was never set from the base layer; call init_from_base(weight)"
            )

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_bound()
        return dora_merge(weight, self.delta_weight(), self.magnitude)

    def adapt_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """c ⊙ x; the layer then computes W (c ⊙ x) + b and ``adapt_output`` adds ΔW (c ⊙ x)."""
        self._check_bound()
        with torch.no_grad():  # the norm is a constant for backward (see dora_input_scale)
            delta = self.delta_weight()
        scale = dora_input_scale(layer.weight, delta, self.magnitude)
        return scale_input_channels(x, scale, self.conv is not None)
