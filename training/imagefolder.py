"""Image + caption folders for LoraLab_LoadImageCaptionFolder (pure: PIL, numpy and torch, no ComfyUI).

A folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``; taken sorted by file name)
and, next to each, an optional caption file ``<stem><caption_extension>`` (``cat.png`` ->
``cat.txt``). An image without a caption file gets the default caption.

Sizing: every image keeps its aspect ratio and is brought to about ``resolution x resolution``
pixels in area, with both sides rounded to multiples of 64 (at least 64): it is scaled to cover that
size (Lanczos) and the overflow is cropped evenly from both sides (center crop). Images of different
aspect ratios thus end up at different sizes, which the trainer groups into batches of one size.

Limits (anyone who can queue a prompt or upload a file controls these folders), each checked before
the work it bounds, with a ``ValueError`` naming the input, the file and the limit:

* at most :data:`MAX_IMAGES` images per folder (checked while listing);
* caption files of at most :data:`MAX_CAPTION_BYTES` bytes (checked before reading);
* images of at most :data:`MAX_IMAGE_PIXELS` pixels and an aspect ratio of at most
  :data:`MAX_ASPECT_RATIO`:1, read from the file's header before anything is decoded, and a resize
  intermediate of at most :data:`MAX_RESIZE_FACTOR` times the output's area (a 1 x 1 000 000 PNG at
  resolution 4096 would otherwise be scaled through a 64 x 64 000 000 image, ~11 GiB);
* symbolic links and special files (FIFOs, devices) among the images and captions are refused, and
  files are opened with ``O_NOFOLLOW`` / ``O_NONBLOCK`` and checked to be regular files;
* only PNG, JPEG, WebP and BMP decoders are used, whatever the extension says.

Images smaller than the target are scaled up (a 1 x 1 image becomes a flat 512 x 512 one); images
scaled up by more than :data:`UPSCALE_WARNING` per side are named in one warning.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
SIZE_MULTIPLE = 64
MAX_IMAGES = 10_000
MAX_CAPTION_BYTES = 64 * 1024  # far above any text encoder's context (CLIP 77 tokens, T5 512)
MAX_IMAGE_PIXELS = 8192 * 8192  # 67 Mpx; decoding one takes ~200 MB as RGB
MAX_ASPECT_RATIO = 8.0  # long side / short side
MAX_RESIZE_FACTOR = 4.0  # resize intermediate area / output area (at most ~2.7 within the aspect limit)
UPSCALE_WARNING = 2.0

log = logging.getLogger("loralab")

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_CAPTION_BYTES",
    "MAX_IMAGES",
    "MAX_IMAGE_PIXELS",
    "MAX_RESIZE_FACTOR",
    "SIZE_MULTIPLE",
    "ImageCaption",
    "bucket_size",
    "check_image_size",
    "list_image_captions",
    "load_folder",
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
        raise ValueError(
            f"{name} is empty; give a folder inside ComfyUI's input directory, such as 'loralab_images'"
        )
    if text.startswith("/") or (len(text) >= 2 and text[1] == ":"):
        raise ValueError(
            f"{name} {folder!r} is an absolute path; give a folder relative to ComfyUI's input directory"
        )
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{name} {folder!r} contains '..'; give a folder inside ComfyUI's input directory")
    base = Path(root).resolve()
    path = base.joinpath(*parts) if parts else base
    real = path.resolve()
    if real != base and base not in real.parents:
        raise ValueError(f"{name} {folder!r} points outside ComfyUI's input directory")
    return path


def _open_regular(path: Path, what: str) -> int:
    """An fd of ``path`` opened read-only without following a final symlink and without blocking
    (a FIFO would block a plain open forever); ``ValueError`` when it is not a regular file."""
    flags = (
        os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if path.is_symlink():
            raise ValueError(
                f"{what} is a symbolic link; links are refused (copy the file into the folder)"
            ) from None
        raise ValueError(f"{what} cannot be opened ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(
            f"{what} is not a regular file (a FIFO, device or folder); remove it from the folder"
        )
    return fd


def _caption_for(image: Path, caption_extension: str, default_caption: str, name: str = "folder") -> str:
    ext = caption_extension.strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if not ext:
        return default_caption
    candidate = image.with_name(image.stem + ext)
    try:
        st = os.lstat(candidate)
    except FileNotFoundError:
        return default_caption
    what = f"{name}: caption file {candidate.name!r}"
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{what} is a symbolic link; links are refused (copy the file into the folder)")
    if stat.S_ISDIR(st.st_mode):
        return default_caption
    fd = _open_regular(candidate, what)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(MAX_CAPTION_BYTES + 1)
    if size > MAX_CAPTION_BYTES or len(data) > MAX_CAPTION_BYTES:
        raise ValueError(f"{what} has {max(size, len(data))} bytes, more than the limit of {MAX_CAPTION_BYTES}; "
                         "shorten it (text encoders read only the first few hundred tokens)")  # fmt: skip
    return data.decode("utf-8", errors="replace").strip()


def _image_files(folder: Path, name: str, max_images: int) -> list[Path]:
    images = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if entry.is_symlink():
                raise ValueError(f"{name}: image {entry.name!r} is a symbolic link; links are refused "
                                 "(copy the file into the folder)")  # fmt: skip
            if entry.is_dir(follow_symlinks=False):
                continue
            if not entry.is_file(follow_symlinks=False):
                raise ValueError(
                    f"{name}: image {entry.name!r} is not a regular file (a FIFO or device); remove it"
                )
            images.append(Path(entry.path))
            if len(images) > max_images:
                raise ValueError(f"{name}: {str(folder)!r} holds more than {max_images} images, the limit of one "
                                 "folder; split it into several folders")  # fmt: skip
    return sorted(images, key=lambda p: p.name)


def list_image_captions(
    folder: Path,
    caption_extension: str = ".txt",
    default_caption: str = "",
    name: str = "folder",
    max_images: int = MAX_IMAGES,
    check_interrupt: Callable[[], None] | None = None,
) -> list[ImageCaption]:
    """The images of ``folder`` (not recursive), sorted by file name, each with its caption.

    ``ValueError`` naming ``name`` when the folder does not exist, holds no image or more than
    ``max_images``, or an image or caption file is a symlink, a special file or (captions) larger than
    :data:`MAX_CAPTION_BYTES`. ``check_interrupt()`` is called before each caption is read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"{name}: {str(folder)!r} is not a folder; create it inside ComfyUI's input directory and put images in it"
        )
    images = _image_files(folder, name, max_images)
    if not images:
        raise ValueError(f"{name}: {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    out = []
    for p in images:
        if check_interrupt is not None:
            check_interrupt()
        out.append(ImageCaption(p, _caption_for(p, caption_extension, default_caption, name)))
    return out


def _round_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """``(width, height)`` of the output: same aspect ratio, area about ``resolution**2``, multiples of 64."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    scale = math.sqrt(resolution * resolution / (width * height))
    return _round_multiple(width * scale), _round_multiple(height * scale)


def _cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Size the image is scaled to before the center crop: the smallest that covers the target."""
    cover = max(target_w / width, target_h / height)
    return max(target_w, math.ceil(width * cover)), max(target_h, math.ceil(height * cover))


def check_image_size(width: int, height: int, resolution: int, what: str = "image") -> tuple[int, int]:
    """The output size of a ``width x height`` image (:func:`bucket_size`), or ``ValueError`` (naming
    ``what`` and the limit) when the image is larger than :data:`MAX_IMAGE_PIXELS`, more elongated
    than :data:`MAX_ASPECT_RATIO`:1, or would need a resize intermediate above
    :data:`MAX_RESIZE_FACTOR` times the output's area. Needs only the header's size: call it before
    decoding."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} has an empty size {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} is {width}x{height} = {width * height:,} pixels, more than the limit of "
                         f"{MAX_IMAGE_PIXELS:,} (8192x8192); scale it down before training")  # fmt: skip
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"{what} is {width}x{height}, an aspect ratio of {ratio:.4g}:1, beyond the limit of "
                         f"{MAX_ASPECT_RATIO:g}:1; crop it to a less elongated shape")  # fmt: skip
    target_w, target_h = bucket_size(width, height, resolution)
    new_w, new_h = _cover_size(width, height, target_w, target_h)
    if new_w * new_h > MAX_RESIZE_FACTOR * target_w * target_h:
        raise ValueError(f"{what} ({width}x{height}) would be scaled through a {new_w}x{new_h} intermediate for a "
                         f"{target_w}x{target_h} output, more than {MAX_RESIZE_FACTOR:g} times its area; crop it closer "
                         "to the output's shape")  # fmt: skip
    return target_w, target_h


def load_image_tensor(path: Path, resolution: int, what: str | None = None) -> torch.Tensor:
    """The image at ``path`` as a ``[1, H, W, 3]`` float32 tensor in 0..1, sized by :func:`bucket_size`.

    Its size is checked (:func:`check_image_size`) from the header before it is decoded; EXIF
    orientation is applied; alpha and palette images are converted to RGB. ``ValueError`` naming
    ``what`` (default: the file name) for files over the limits, links and special files.
    """
    return _load_image(Path(path), resolution, what or f"image {Path(path).name!r}")[0]


def _load_image(path: Path, resolution: int, what: str) -> tuple[torch.Tensor, float]:
    """(tensor, how much the image was scaled up per side: > 1 for images smaller than the output)."""
    fd = _open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        try:
            with warnings.catch_warnings():  # Pillow warns above 89 Mpx; our own, lower limit follows
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(f, formats=PIL_FORMATS)  # reads the header only
        except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours
            raise ValueError(
                f"{what} is more than {MAX_IMAGE_PIXELS:,} pixels, the limit; scale it down ({exc})"
            ) from None
        except Image.UnidentifiedImageError:
            raise ValueError(f"{what} is not a PNG, JPEG, WebP or BMP image") from None
        with opened:
            check_image_size(opened.width, opened.height, resolution, what)
            img = ImageOps.exif_transpose(opened)
            img = img.convert("RGB")
    target_w, target_h = check_image_size(img.width, img.height, resolution, what)
    new_w, new_h = _cover_size(img.width, img.height, target_w, target_h)
    scale = new_w / img.width
    if (new_w, new_h) != (img.width, img.height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left = (new_w - target_w) // 2
    top = (new_h - target_h) // 2
    img = img.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0), scale


def load_folder(
    folder: Path,
    resolution: int,
    caption_extension: str = ".txt",
    default_caption: str = "",
    name: str = "folder",
    check_interrupt: Callable[[], None] | None = None,
) -> tuple[list[torch.Tensor], list[str]]:
    """Every image of ``folder`` (:func:`list_image_captions`) as a ``[1, H, W, 3]`` tensor
    (:func:`load_image_tensor`) and its caption. ``check_interrupt()`` runs before each file, so a
    long load can be stopped. Errors are ``ValueError`` naming ``name``, the file and the limit."""
    items = list_image_captions(
        folder, caption_extension, default_caption, name=name, check_interrupt=check_interrupt
    )
    images, upscaled = [], []
    for item in items:
        if check_interrupt is not None:
            check_interrupt()
        what = f"{name}: image {item.path.name!r}"
        try:
            tensor, factor = _load_image(item.path, resolution, what)
        except OSError as exc:  # a damaged file: Pillow reports decoding errors as OSError
            raise ValueError(f"{what} cannot be read ({exc})") from exc
        images.append(tensor)
        if factor > UPSCALE_WARNING:
            upscaled.append((factor, item.path.name))
    if upscaled:
        upscaled.sort(reverse=True)
        factor, worst = upscaled[0]
        log.warning("LoRA Lab: %s: %d of %d images are smaller than resolution %d and scaled up more than %gx "
                    "per side (most: %r, %.0fx); they train on blurred pixels", name, len(upscaled), len(images),
                    resolution, UPSCALE_WARNING, worst, factor)  # fmt: skip
    return images, [item.caption for item in items]
