"""ComfyUI nodes of the pack: the only package that imports comfy, folder_paths or server."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .data import DenoiseLoss, LoadLatentDataset
from .train import TrainLoraNode

NODE_CLASSES: list[type[io.ComfyNode]] = [TrainLoraNode, LoadLatentDataset, DenoiseLoss]

try:  # companion file nodes (save / load / plot)
    from .files import NODES as _FILE_NODES

    NODE_CLASSES += _FILE_NODES
except ImportError as e:  # pragma: no cover - only while files.py is being written
    import logging

    logging.getLogger("loralab").warning("LoRA Lab: file nodes unavailable: %s", e)


class LoraLabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
