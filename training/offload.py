"""Offloading frozen weights: the weights of some repeated blocks live in CPU memory during training
and come to the device layer by layer as each layer runs, through ComfyUI's own low-VRAM casting.

ComfyUI builds its models from ``comfy.ops`` layers. A layer whose ``comfy_cast_weights`` is on
copies its weight and bias to the input's device and dtype at every call (asynchronously, on
ComfyUI's offload stream where the device has one), which is how ComfyUI samples models larger than
VRAM. The copy lives while autograd needs it: with gradient checkpointing a block's weights are on
the device only while it runs forward and again while it is recomputed and differentiated.
Without checkpointing autograd keeps every copy until backward, so offloading saves nothing there.

No ComfyUI import: a layer of ComfyUI's ops is recognised by its ``comfy_cast_weights`` attribute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BlockOffload", "castable_layers", "offload_bytes"]


def castable_layers(block: nn.Module) -> list[nn.Module]:
    """The layers of ``block`` that ComfyUI's ops can cast per call (they carry ``comfy_cast_weights``)."""
    return [
        m
        for m in block.modules()
        if hasattr(m, "comfy_cast_weights") and getattr(m, "weight", None) is not None
    ]


def _tensors(layer: nn.Module) -> list[torch.Tensor]:
    return [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]


def offload_bytes(blocks: Sequence[nn.Module]) -> list[int]:
    """Per block, the bytes offloading it moves off the device (its castable layers' own tensors)."""
    return [
        sum(t.numel() * t.element_size() for m in castable_layers(b) for t in _tensors(m)) for b in blocks
    ]


class BlockOffload:
    """The weights of ``blocks``' castable layers moved to ``offload_device`` with per-call casting on
    (``apply``), and everything as it was (``restore``). ``apply`` may run again after something else
    (ComfyUI loading another clone of the same model for a preview) moved the weights back."""

    def __init__(self, blocks: Sequence[nn.Module], offload_device: torch.device | str):
        self.offload_device = torch.device(offload_device)
        self.layers = [m for b in blocks for m in castable_layers(b)]
        self._saved: dict[int, tuple[bool, list[torch.device]]] = {}  # id(layer) -> (cast flag, devices)
        self.bytes = sum(t.numel() * t.element_size() for m in self.layers for t in _tensors(m))
        self.active = False

    def apply(self) -> None:
        pin = self.offload_device.type == "cpu" and torch.cuda.is_available()
        for layer in self.layers:
            tensors = _tensors(layer)
            self._saved.setdefault(id(layer), (bool(layer.comfy_cast_weights), [t.device for t in tensors]))
            for t in tensors:
                if t.device != self.offload_device:
                    moved = t.data.to(self.offload_device)
                    t.data = moved.pin_memory() if pin else moved  # pinned: the copies to the GPU run async
            layer.comfy_cast_weights = True
        self.active = True

    def restore(self) -> None:
        for layer in self.layers:
            saved = self._saved.pop(id(layer), None)
            if saved is None:
                continue
            cast, devices = saved
            for t, device in zip(_tensors(layer), devices, strict=True):
                if t.device != device:
                    t.data = t.data.to(device)
            layer.comfy_cast_weights = cast
        self.active = False
