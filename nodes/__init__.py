"""ComfyUI nodes of the pack: the only package that imports comfy, folder_paths or server."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply_lora import NODES as APPLY_NODES
from .data import DenoiseLoss, LoadLatentDataset
from .dataset_images import LoadImageCaptionFolder
from .files import NODES as FILE_NODES
from .options import TrainingOptions
from .plot_loss import NODES as PLOT_NODES
from .preview import NODES as PREVIEW_NODES
from .train import TrainLoraNode
from .validation import NODES as VALIDATION_NODES

NODE_CLASSES: list[type[io.ComfyNode]] = [
    TrainLoraNode,
    TrainingOptions,
    *FILE_NODES,
    *APPLY_NODES,
    *PLOT_NODES,
    LoadLatentDataset,
    DenoiseLoss,
    LoadImageCaptionFolder,
    *PREVIEW_NODES,
    *VALIDATION_NODES,
]


class LoraLabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
