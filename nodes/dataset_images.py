"""LoraLab_LoadImageCaptionFolder: a folder of images + caption files, as lists for VAE Encode / CLIP Text Encode.

The file reading and sizing live in ``training/imagefolder.py`` (pure, tested without ComfyUI); this
module only resolves the folder inside ComfyUI's input directory and hands out the lists.
"""

from __future__ import annotations

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..training.imagefolder import (
    IMAGE_EXTENSIONS,
    MAX_ASPECT_RATIO,
    MAX_CAPTION_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    load_folder,
    resolve_folder,
)


def _folder_path(folder: str):
    return resolve_folder(folder_paths.get_input_directory(), folder, "folder")


class LoadImageCaptionFolder(io.ComfyNode):
    """Images and their captions from a folder in the input directory, one list item per image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_LoadImageCaptionFolder",
            display_name="Load Image + Caption Folder (LoRA Lab)",
            category="LoRA Lab",
            description="Loads every image of a folder inside ComfyUI's input directory (sorted by name) with "
            "the caption from '<name><caption_extension>' next to it. Outputs are lists: nodes downstream "
            "(VAE Encode, CLIP Text Encode) run once per image, and Train LoRA takes the lists.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="loralab_images",
                    multiline=False,
                    tooltip="A folder inside ComfyUI's input directory (relative path; '..' and absolute paths are refused) "
                    f"holding the images ({', '.join(IMAGE_EXTENSIONS)}) and their caption files. Limits: "
                    f"{MAX_IMAGES} images, {MAX_IMAGE_PIXELS // 1_000_000} Mpx and aspect {MAX_ASPECT_RATIO:g}:1 per image, "
                    f"{MAX_CAPTION_BYTES // 1024} KiB per caption; links are refused.",
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=64,
                    max=4096,
                    step=8,
                    tooltip="Target size: each image keeps its aspect ratio, is scaled to about resolution x resolution "
                    "pixels in area with both sides rounded to multiples of 64, and center-cropped to that size "
                    "(512 for SD1.5, 1024 for SDXL / SD3 / Flux).",
                ),
                io.String.Input(
                    "caption_extension",
                    default=".txt",
                    multiline=False,
                    tooltip="Extension of the caption files: 'cat.png' takes its caption from 'cat.txt'.",
                ),
                io.String.Input(
                    "default_caption",
                    default="",
                    multiline=True,
                    tooltip="Caption of images that have no caption file (e.g. a trigger word).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="images",
                    is_output_list=True,
                    tooltip="One IMAGE [1, H, W, 3] per file; sizes may differ between images.",
                ),
                io.String.Output(
                    display_name="captions",
                    is_output_list=True,
                    tooltip="One caption per image, in the same order.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder=None, caption_extension=None, default_caption=None) -> bool | str:
        if not isinstance(folder, str):  # linked from another node: checked when it runs
            return True
        try:
            path = _folder_path(folder)
        except ValueError as exc:
            return str(exc)
        if not path.is_dir():
            return f"folder: {folder!r} is not a folder inside ComfyUI's input directory"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder=None, **kwargs):
        """Re-run when the folder's files change (names, sizes or modification times)."""
        try:
            path = _folder_path(folder)
            return tuple(
                sorted(
                    (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()
                )
            )
        except (ValueError, OSError, TypeError):
            return float("nan")  # never equal: run again, and let execute report the problem

    @classmethod
    def execute(
        cls, folder: str, resolution: int, caption_extension: str, default_caption: str
    ) -> io.NodeOutput:
        images, captions = load_folder(
            _folder_path(folder), resolution, caption_extension, default_caption, name="folder",
            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        )  # fmt: skip
        return io.NodeOutput(images, captions)


NODES = [LoadImageCaptionFolder]
