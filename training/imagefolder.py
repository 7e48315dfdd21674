"""Image + caption folders for LoraLab_LoadImageCaptionFolder (pure: PIL, numpy and torch, no ComfyUI).

A folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``; taken sorted by file name)
and, next to each, an optional caption file ``<stem><caption_extension>`` (``cat.png`` ->
``cat.txt``). An image without a caption file gets the default caption.

Sizing: every image keeps its aspect ratio and is brought to about ``resolution x resolution``
pixels in area, with both sides rounded to multiples of 64 (at least 64): it is scaled to cover that
size (Lanczos) and the overflow is cropped evenly from both sides (center crop). Images of different
aspect ratios thus end up at different sizes, which the trainer groups into batches of one size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIZE_MULTIPLE = 64

__all__ = [
    "IMAGE_EXTENSIONS",
    "SIZE_MULTIPLE",
    "ImageCaption",
    "bucket_size",
    "list_image_captions",
    "load_image_tensor",
    "resolve_folder",
]


@dataclass(frozen=True)
class ImageCaption:
    """One training example: the image file and its caption text."""

    path: Path
    caption: str


def resolve_folder(root: str | os.PathLike, folder: str, name: str = "folder") -> Path:
    """The folder ``folder`` inside ``root`` (ComfyUI's input directory), refused when it would leave it.

    Refused with ``ValueError`` (the message names ``name``): non-text, empty, absolute paths, drive
    letters and ``..`` components; also a path whose real location (after symlinks) is outside
    ``root``. The folder need not exist: see :func:`list_image_captions`.
    """
    if not isinstance(folder, str):
        raise ValueError(f"{name} must be text, got {type(folder).__name__}")
    text = folder.strip().replace("\\", "/")
    if not text:
        raise ValueError(f"{name} is empty; give a folder inside ComfyUI's input directory, such as 'loralab_images'")
    if text.startswith("/") or (len(text) >= 2 and text[1] == ":"):
        raise ValueError(f"{name} {folder!r} is an absolute path; give a folder relative to ComfyUI's input directory")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{name} {folder!r} contains '..'; give a folder inside ComfyUI's input directory")
    base = Path(root).resolve()
    path = base.joinpath(*parts) if parts else base
    real = path.resolve()
    if real != base and base not in real.parents:
        raise ValueError(f"{name} {folder!r} points outside ComfyUI's input directory")
    return path


def _caption_for(image: Path, caption_extension: str, default_caption: str) -> str:
    ext = caption_extension.strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if not ext:
        return default_caption
    candidate = image.with_name(image.stem + ext)
    if candidate.is_file():
        return candidate.read_text(encoding="utf-8", errors="replace").strip()
    return default_caption


def list_image_captions(
    folder: Path, caption_extension: str = ".txt", default_caption: str = "", name: str = "folder"
) -> list[ImageCaption]:
    """The images of ``folder`` (not recursive), sorted by file name, each with its caption.

    ``ValueError`` naming ``name`` when the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{name}: {str(folder)!r} is not a folder; create it inside ComfyUI's input directory and put images in it")
    images = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not images:
        raise ValueError(f"{name}: {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [ImageCaption(p, _caption_for(p, caption_extension, default_caption)) for p in images]


def _round_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """``(width, height)`` of the output: same aspect ratio, area about ``resolution**2``, multiples of 64."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    scale = math.sqrt(resolution * resolution / (width * height))
    return _round_multiple(width * scale), _round_multiple(height * scale)


def load_image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """The image at ``path`` as a ``[1, H, W, 3]`` float32 tensor in 0..1, sized by :func:`bucket_size`.

    EXIF orientation is applied; alpha and palette images are converted to RGB.
    """
    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
        img = img.convert("RGB")
    target_w, target_h = bucket_size(img.width, img.height, resolution)
    cover = max(target_w / img.width, target_h / img.height)
    new_w = max(target_w, math.ceil(img.width * cover))
    new_h = max(target_h, math.ceil(img.height * cover))
    if (new_w, new_h) != (img.width, img.height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left = (new_w - target_w) // 2
    top = (new_h - target_h) // 2
    img = img.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)
