"""LoRA Lab's Plot Loss node: a LOSS_MAP drawn as a PNG in the output folder (the chart itself is
``training/plotting.py``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL.PngImagePlugin import PngInfo

from ..training.file_names import safe_prefix
from ..training.plotting import render_loss_plot
from .files import CATEGORY, LOSS_MAP, PREFIX_HELP, check_prefix, write_new_png

log = logging.getLogger("loralab")


class LoraLab_PlotLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_PlotLoss",
            display_name="Plot Loss (LoRA Lab)",
            category=CATEGORY,
            description=(
                "Draws the loss history of a training run (raw and smoothed, min and final values marked), "
                "saves it as PNG in the output folder and shows it on the node."
            ),
            is_output_node=True,
            inputs=[
                LOSS_MAP.Input(
                    "loss",
                    tooltip="Loss history (LOSS_MAP, {'loss': [one value per optimizer step]}) from LoRA Lab's "
                    "trainer or ComfyUI's own 'Train LoRA' node; a held-out loss (Validation Set) is drawn too.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="loralab/loss",
                    tooltip=PREFIX_HELP + " Relative to the output folder.",
                ),
            ],
            outputs=[io.Image.Output("image", display_name="image", tooltip="The chart as an IMAGE.")],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return check_prefix(filename_prefix)

    @classmethod
    def execute(cls, loss, filename_prefix: str) -> io.NodeOutput:
        values = loss.get("loss", []) if isinstance(loss, Mapping) else loss
        if isinstance(values, torch.Tensor):
            values = values.detach().flatten().tolist()
        values = [float(v) for v in (values or [])]
        held_out = []
        if isinstance(loss, Mapping) and loss.get("validation_loss") is not None:  # LoRA Lab's Validation Set
            held_out = [
                (float(st), float(v))
                for st, v in zip(loss.get("validation_step") or [], loss["validation_loss"], strict=False)
            ]
        img = render_loss_plot(values, validation=held_out)

        prefix = safe_prefix(filename_prefix)
        out_dir = folder_paths.get_output_directory()
        full_folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, out_dir, img.width, img.height
        )
        pnginfo = cls._png_metadata(values)
        while True:
            name = f"{stem}_{counter:05}_.png"
            target = Path(full_folder) / name
            try:
                if write_new_png(img, target, pnginfo):
                    break
            except OSError as exc:
                raise OSError(
                    f"Plot Loss: could not write {target}: {exc.strerror or exc}; check that the output folder "
                    "is writable and has free space"
                ) from exc
            counter += 1

        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        image = torch.from_numpy(arr)[None]  # [1, H, W, 3]
        subfolder = subfolder.replace(os.sep, "/") if subfolder else ""
        return io.NodeOutput(
            image, ui={"images": [{"filename": name, "subfolder": subfolder, "type": "output"}]}
        )

    @classmethod
    def _png_metadata(cls, values: list[float]) -> PngInfo | None:
        try:
            from comfy.cli_args import args

            if getattr(args, "disable_metadata", False):
                return None
        except Exception:  # metadata is optional
            pass
        info = PngInfo()
        finite = [v for v in values if v == v and abs(v) != float("inf")]
        info.add_text("loralab.steps", str(len(values)))
        if finite:
            info.add_text("loralab.final_loss", repr(finite[-1]))
            info.add_text("loralab.min_loss", repr(min(finite)))
        hidden = getattr(cls, "hidden", None)
        if hidden is not None:
            if getattr(hidden, "prompt", None) is not None:
                info.add_text("prompt", json.dumps(hidden.prompt))
            extra = getattr(hidden, "extra_pnginfo", None)
            if isinstance(extra, Mapping):
                for key, value in extra.items():
                    info.add_text(str(key), json.dumps(value))
        return info


NODES: list[type[io.ComfyNode]] = [LoraLab_PlotLoss]
