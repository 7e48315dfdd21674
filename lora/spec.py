"""Describing the base layer an adapter attaches to.

An adapter never holds the base layer itself: it only needs the base weight's shape and, for a
convolution, how the kernel slides (stride/padding/dilation), because its bypass output has to line up
element for element with the base layer's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

__all__ = ["ConvSpec", "layer_spec", "check_layer", "kernel_size", "flat_in_features", "PADDING_MODES"]

#: Padding modes of ``nn.ConvNd`` (``padding_mode=``); all of them are reproduced by the adapters.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PADDING_STRINGS = ("same", "valid")

IntOrTuple = int | tuple[int, ...]


def _as_int_or_tuple(name: str, value: object) -> IntOrTuple:
    """Normalise ``value`` (int or sequence of ints) to an int or a tuple, so specs compare and hash."""
    if isinstance(value, bool):
        raise ValueError(f"ConvSpec.{name} must be an int or a tuple of ints, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        items = tuple(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items
    raise ValueError(f"ConvSpec.{name} must be an int or a tuple of ints, got {value!r}")


@dataclass(frozen=True)
class ConvSpec:
    """How a base convolution applies its kernel (everything except the weight and bias).

    Fields take the same values as the matching ``nn.ConvNd`` arguments: an int (same for every
    spatial dim) or one int per spatial dim; ``padding`` may also be ``"same"`` or ``"valid"``.
    ``groups`` is recorded so callers can see it, but adapters reject ``groups != 1``.
    """

    stride: IntOrTuple = 1
    padding: IntOrTuple | str = 0
    dilation: IntOrTuple = 1
    groups: int = 1
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        # frozen dataclass: normalise through object.__setattr__ so lists become hashable tuples.
        object.__setattr__(self, "stride", _as_int_or_tuple("stride", self.stride))
        object.__setattr__(self, "dilation", _as_int_or_tuple("dilation", self.dilation))
        if isinstance(self.padding, str):
            if self.padding not in _PADDING_STRINGS:
                raise ValueError(
                    f"ConvSpec.padding must be an int, a tuple or one of {_PADDING_STRINGS}, got {self.padding!r}"
                )
        else:
            object.__setattr__(self, "padding", _as_int_or_tuple("padding", self.padding))
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"ConvSpec.groups must be a positive int, got {self.groups!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"ConvSpec.padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}"
            )

    def per_dim(self, name: str, ndim: int) -> tuple[int, ...]:
        """``stride``/``padding``/``dilation`` expanded to one int per spatial dim (padding must be numeric)."""
        value = getattr(self, name)
        if isinstance(value, str):
            raise ValueError(f"ConvSpec.{name}={value!r} has no per-dim form")
        return (value,) * ndim if isinstance(value, int) else value


def kernel_size(weight_shape: Sequence[int]) -> tuple[int, ...]:
    """Spatial kernel dims of a weight shape: ``()`` for Linear ``(out, in)``."""
    return tuple(weight_shape[2:])


def check_layer(
    weight_shape: Sequence[int], conv: ConvSpec | None
) -> tuple[tuple[int, ...], ConvSpec | None]:
    """Validate a base layer description; returns ``(weight_shape as a tuple, conv)``.

    A conv weight shape (3 to 5 dims) with ``conv=None`` gets ``ConvSpec()`` (stride 1, no padding):
    enough for ``delta_weight`` and file I/O, where the sliding parameters play no part.
    """
    try:
        shape = tuple(int(d) for d in weight_shape)
    except (TypeError, ValueError):
        raise ValueError(f"weight_shape must be a sequence of ints, got {weight_shape!r}") from None
    if not 2 <= len(shape) <= 5 or any(d < 1 for d in shape):
        raise ValueError(
            "weight_shape must be (out, in) for Linear or (out, in/groups, *kernel) for Conv1d/2d/3d "
            f"with positive sizes, got {shape}"
        )
    if len(shape) == 2:
        if conv is not None:
            raise ValueError(f"conv must be None for a Linear weight_shape {shape}, got {conv!r}")
        return shape, None
    if conv is None:
        conv = ConvSpec()
    if not isinstance(conv, ConvSpec):
        raise ValueError(f"conv must be a ConvSpec or None, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"conv.groups={conv.groups} is not supported (grouped convolution); skip this layer")
    ndim = len(shape) - 2
    for name in ("stride", "padding", "dilation"):
        value = getattr(conv, name)
        if isinstance(value, tuple) and len(value) != ndim:
            raise ValueError(
                f"conv.{name}={value} has {len(value)} entries but weight_shape {shape} has {ndim} spatial dims"
            )
    if conv.padding == "same" and any(s != 1 for s in conv.per_dim("stride", ndim)):
        raise ValueError(f"conv.padding='same' needs conv.stride=1, got {conv.stride}")
    return shape, conv


def layer_spec(module: nn.Module) -> tuple[tuple[int, ...], ConvSpec | None] | None:
    """``(weight_shape, conv)`` for ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (and subclasses), else ``None``.

    Shapes come from the layer's hyper-parameters, not from ``module.weight``, so layers whose weight is
    on the meta device, quantised or not yet loaded still work. Grouped convs are reported with their
    ``groups``; adapters refuse them, so callers should skip layers where ``conv.groups != 1``.
    """
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features), None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        conv = ConvSpec(
            stride=tuple(module.stride),
            padding=padding,
            dilation=tuple(module.dilation),
            groups=module.groups,
            padding_mode=module.padding_mode,
        )
        return shape, conv
    return None


def flat_in_features(weight_shape: Sequence[int]) -> int:
    """``in * prod(kernel)``: the column count of the weight seen as a matrix."""
    return int(weight_shape[1]) * math.prod(weight_shape[2:])
