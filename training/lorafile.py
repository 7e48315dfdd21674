"""Reading and writing LoRA files (safetensors only), naming them, and their metadata.

No ComfyUI imports: this module is used by the nodes, by the trainer and by plain tests.

Conventions:

* A LoRA state dict maps ``diffusion_model.<module path>.<suffix>`` to tensors, which is what
  ComfyUI's own "Save LoRA Weights" / "Load LoRA Model" nodes consume.  :class:`LoraStateDict` is
  such a plain dict with an extra ``metadata`` attribute, so stock nodes keep working with it.
* Files are written atomically (temporary file in the same folder, fsync, rename) and never
  overwrite an existing file unless asked to.
* Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ...) are refused and never unpickled.
* File names: ``<prefix>_<steps>_steps_<counter:05>.safetensors`` (or ``<prefix>_<counter:05>``
  without a step count).  The step count sits between ``_`` and ``_steps_`` as in the names of
  ComfyUI's built-in SaveLoRA, so the built-in trainer's ``existing_lora`` can continue from our
  files too; the counter always grows per prefix, whatever the step count.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "LORA_SUFFIX",
    "LoraStateDict",
    "PICKLE_SUFFIXES",
    "save_lora_file",
    "save_lora_bytes",
    "lora_file_bytes",
    "MAX_STEP_COUNT",
    "SIDECAR_SUFFIXES",
    "read_lora_file",
    "earlier_steps",
    "next_free_path",
    "safe_prefix",
    "write_error_cause",
    "build_metadata",
    "base_model_info",
]

LORA_SUFFIX = ".safetensors"
# Files that live beside a LoRA under its name (the training-state sidecar of a checkpoint): a name is
# only free when none of these exists either, so a new LoRA is never joined to an older sidecar.
SIDECAR_SUFFIXES = (".lorastate",)
# Largest step count read from a file (metadata, name, training state); anything above is refused as
# bogus: 10**9 steps is far beyond any real run, and keeps names and sums small.
MAX_STEP_COUNT = 10**9

log = logging.getLogger("loralab")
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".th"})

# Largest JSON header we accept when checking a file (safetensors itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class LoraStateDict(dict):
    """``dict[str, Tensor]`` of LoRA weights plus ``metadata: dict[str, str]``.

    A plain dict subclass, so ComfyUI's stock LORA_MODEL consumers (``SaveLoRA``,
    ``LoraModelLoader``, ``comfy.sd.load_lora_for_models``) and ``safetensors.torch.save_file``
    accept it unchanged.
    """

    def __init__(self, *args, metadata: Mapping[str, str] | None = None,
                 file_names: Mapping[str, Mapping] | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.metadata: dict[str, str] = dict(metadata or {})
        # key format -> module path -> that format's name(s) for the layer on the model this LoRA was
        # trained on: "kohya" the "lora_unet_..." stem kohya sd-scripts uses (nodes.comfy_model.kohya_names),
        # "diffusers" the peft module names with the output rows each covers (comfy_model.diffusers_names).
        # Not written into files; a LoRA read from a file has none, and keeps the model's own names.
        self.file_names: dict[str, dict] = {k: dict(v) for k, v in (file_names or {}).items()}

    def copy(self) -> LoraStateDict:  # dict.copy() would drop the metadata
        return LoraStateDict(self, metadata=self.metadata, file_names=self.file_names)

    def __repr__(self) -> str:
        return f"LoraStateDict({len(self)} tensors, {len(self.metadata)} metadata keys)"


# --------------------------------------------------------------------------------------------
# Writing


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"LoRA metadata keys must be str, got {type(key).__name__} {key!r}")
        if not isinstance(value, str):
            raise TypeError(
                f"LoRA metadata value for {key!r} must be str, got {type(value).__name__}; "
                "convert it with str() or json.dumps() first"
            )
        out[key] = value
    return out


def _prepare_tensors(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Check keys and values, refuse non-finite weights, return contiguous CPU tensors that share
    no storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen_ptrs: set[int] = set()
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"LoRA state dict keys must be str, got {type(key).__name__} {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"LoRA state dict value {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach()
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"refusing to save {path}: weight {key!r} has {bad} NaN/inf values of {t.numel()}; the "
                "training diverged, lower the learning rate or train in a wider dtype (fp32/bf16)"
            )
        t = t.to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_ptrs:
                t = t.clone()
            else:
                seen_ptrs.add(ptr)
        out[key] = t
    return out


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to its final name."""
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link fails when the target exists: an atomic "rename unless taken".
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (exFAT, some SMB / FUSE mounts): create the name exclusively
        # (O_EXCL: fails if it exists, whoever made it and whenever) and copy the data into it. A file
        # that appears at any moment is never overwritten.
        _copy_exclusive(tmp, path)
    os.unlink(tmp)


def _copy_exclusive(src: Path, path: Path) -> None:
    """Copy ``src`` to the new file ``path`` (created with O_EXCL, fsynced); removed again on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours: created exclusively above
        raise


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def write_error_cause(exc: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, or None when ``exc`` is no I/O error.

    ``safetensors`` reports I/O failures (disk full, read-only folder) as its own ``SafetensorError``,
    which is not an ``OSError``; its text carries the code (``... (os error 28)``), which this turns
    back into an ``OSError`` with that errno, so callers can name the file and the cause.
    """
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ != "SafetensorError":
        return None
    text = str(exc)
    found = _OS_ERROR_CODE.search(text)
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return OSError(text) if "I/O error" in text else None


def save_lora_file(
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``sd`` (and string ``metadata``) to ``path`` as safetensors, atomically.

    The data go to ``<name>.tmp-<pid>`` in the same folder, are fsynced and then renamed.  Refuses
    to replace an existing file unless ``overwrite=True`` (``FileExistsError``), refuses NaN/inf
    weights (``ValueError`` naming the first bad key) and non-str metadata (``TypeError``).  Missing
    parent folders are created.  On any error the temporary file is removed and nothing is left at
    ``path``.  Returns the absolute path written.
    """
    path = _check_target(path, overwrite)
    meta = _check_metadata(metadata)
    tensors = _prepare_tensors(sd, path)
    if not tensors:
        raise ValueError(f"refusing to write an empty LoRA (no tensors) to {path}")

    # Imported here so that merely importing this module stays cheap.
    import safetensors.torch

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta or None)

    _write_atomically(path, write, overwrite)
    return path


def lora_file_bytes(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The exact bytes :func:`save_lora_bytes` would write for ``sd`` (same checks as
    :func:`save_lora_file`): for hashing a file before it is published."""
    meta = _check_metadata(metadata)
    tensors = _prepare_tensors(sd, Path("<in memory>"))
    if not tensors:
        raise ValueError("refusing to build an empty LoRA (no tensors)")
    import safetensors.torch

    return safetensors.torch.save(tensors, metadata=meta or None)


def save_lora_bytes(data: bytes, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write already serialised LoRA bytes (:func:`lora_file_bytes`) to ``path``, atomically and
    durably, never over an existing file unless ``overwrite``; errors as :func:`save_lora_file`."""
    path = _check_target(path, overwrite)

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(data)

    _write_atomically(path, write, overwrite)
    return path


def _check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path).absolute()
    if path.suffix.lower() != LORA_SUFFIX:
        raise ValueError(f"LoRA files are written as {LORA_SUFFIX}, not {path.suffix or 'no suffix'}: {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(
            errno.EEXIST,
            "refusing to overwrite an existing LoRA file; choose another name or pass overwrite=True",
            str(path),
        )
    return path


def _write_atomically(path: Path, write, overwrite: bool) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsynced and published under
    ``path`` (never over an existing file unless ``overwrite``). I/O errors become an ``OSError``
    naming the file; nothing is left behind on any error."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _publish(tmp, path, overwrite)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST,
                "refusing to overwrite an existing LoRA file; choose another name or pass overwrite=True",
                str(path),
            ) from None
        except Exception as exc:
            io_error = write_error_cause(exc)
            if io_error is None:
                raise
            message = (
                f"could not write LoRA file {path}: {io_error.strerror or io_error}; check that the folder is "
                "writable and has free space, or choose another filename_prefix"
            )
            if io_error.errno is None:
                raise OSError(message) from exc
            raise OSError(io_error.errno, message) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------
# Reading


def _check_safetensors_layout(path: Path) -> None:
    """Explain what is wrong with a file that is not a complete safetensors file (ValueError)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"LoRA file {path} is empty (0 bytes); it was probably cut off while being written")
    if size < 8:
        raise ValueError(f"LoRA file {path} is truncated ({size} bytes): not a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError(
                f"LoRA file {path} is not a safetensors file (its first 8 bytes do not give a sane "
                "header length)"
            )
        if 8 + header_len > size:
            raise ValueError(
                f"LoRA file {path} is truncated or not a safetensors file: header says {header_len} "
                f"bytes but the file has {size} bytes"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"LoRA file {path} is not a safetensors file (its header is not JSON)") from None
    except RecursionError:  # e.g. [[[[...]]]] nested far deeper than any real header
        raise ValueError(
            f"LoRA file {path} is not a safetensors file (its header is nested too deeply)"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"LoRA file {path} is not a safetensors file (its header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"LoRA file {path} has a malformed safetensors header entry for {key!r}")
        end = max(end, offsets[1])
    if 8 + header_len + end > size:
        raise ValueError(
            f"LoRA file {path} is truncated: its tensors need {8 + header_len + end} bytes but the file "
            f"has {size}; save or download it again"
        )


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a ``.safetensors`` LoRA file: ``(tensors, metadata)``.

    Pickle-based formats are refused without being opened.  Empty, truncated or foreign files give a
    ``ValueError`` naming the file and the problem; a missing file gives ``FileNotFoundError``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to load {path}: {suffix} files are pickle-based and could run arbitrary code, so "
            "LoRA Lab never unpickles them; convert the file to .safetensors first"
        )
    if suffix != LORA_SUFFIX:
        raise ValueError(
            f"refusing to load {path}: only .safetensors LoRA files are read (pickle-based files are "
            "refused and never unpickled); convert it to .safetensors"
        )
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "LoRA file not found", str(path))

    _check_safetensors_layout(path)

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception)
        raise ValueError(f"LoRA file {path} could not be read as safetensors: {exc}") from exc
    return tensors, {str(k): str(v) for k, v in metadata.items()}


# --------------------------------------------------------------------------------------------
# Step counts and names

_STEP_KEYS = ("loralab.steps", "ss_steps", "steps")
_STEPS_IN_NAME = re.compile(r"_(\d+)_?steps(?=_|\.|$)")
# A whole number, optionally written with a zero fraction ("250.0"); no signs, exponents or spaces inside.
_STEP_TEXT = re.compile(r"(\d{1,12})(?:\.0*)?")


def step_count(value: object) -> int | None:
    """``value`` as a step count in 0..MAX_STEP_COUNT, or None when it is not one.

    Accepts ints and the text of whole numbers (``"250"``, ``"250.0"``); refuses bools, floats with
    a fraction, exponents (``"1e308"``), negative numbers and anything above ``MAX_STEP_COUNT``.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        found = _STEP_TEXT.fullmatch(value.strip())
        if not found:
            return None
        number = int(found.group(1))
    else:
        return None
    return number if 0 <= number <= MAX_STEP_COUNT else None


def _shown(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def earlier_steps(metadata: Mapping[str, str] | None, filename: str | os.PathLike | None) -> tuple[int, str]:
    """How many steps an existing LoRA was trained for.

    Looks at the metadata keys ``loralab.steps``, ``ss_steps`` and ``steps`` (in that order), then
    at a ``_<N>_steps`` (or ``_<N>steps``) part of the file name, as in ComfyUI's built-in SaveLoRA
    names ``<prefix>_<N>_steps_<counter>_.safetensors``.  Returns ``(steps, source)`` with source
    ``"metadata"``, ``"filename"`` or ``"none"`` (steps 0), so callers can warn on a guess.  A value
    that is not a whole number in 0..MAX_STEP_COUNT (``"1e308"``, ``"-3"``, 400 digits) is skipped
    with a warning naming the key.
    """
    for key in _STEP_KEYS:
        if metadata and key in metadata:
            steps = step_count(metadata[key])
            if steps is not None:
                return steps, "metadata"
            log.warning(
                "LoRA Lab: ignoring the step count %s=%s in the LoRA's metadata: not a whole number "
                "between 0 and %d", key, _shown(metadata[key]), MAX_STEP_COUNT,
            )
    if filename:
        for digits in reversed(_STEPS_IN_NAME.findall(Path(filename).name)):
            steps = step_count(digits)
            if steps is not None:
                return steps, "filename"
            log.warning("LoRA Lab: ignoring the step count in the file name %s: above %d",
                        _shown(Path(filename).name, 80), MAX_STEP_COUNT)  # fmt: skip
    return 0, "none"


def _counter_pattern(prefix: str, ext: str) -> re.Pattern[str]:
    # Ours: <prefix>_<counter>.ext, <prefix>_<steps>_steps_<counter>.ext; the built-in SaveLoRA adds a
    # trailing "_" before the extension.
    return re.compile(
        rf"^{re.escape(prefix)}_(?:\d+_?steps_)?(\d+)_?{re.escape(ext)}$",
        re.IGNORECASE if os.name == "nt" else 0,
    )


def prefix_location(root: str | os.PathLike, user_prefix: str, name: str = "filename_prefix") -> tuple[Path, str]:
    """A user's ``filename_prefix`` (may hold sub-folders) -> (folder under root, file-name stem),
    validated and sanitised by :func:`safe_prefix` (errors name the input as ``name``), so the result
    never leaves ``root``."""
    sub, _, stem = safe_prefix(user_prefix, name).rpartition("/")
    root = Path(root)
    return (root / sub if sub else root), stem


def next_free_path(folder: str | os.PathLike, prefix: str, steps: int | None, ext: str = LORA_SUFFIX) -> Path:
    """A new file name ``<folder>/<prefix>_<steps>_steps_<counter:05><ext>`` that does not exist.

    ``counter`` is one more than the highest counter of any existing file of this prefix (with or
    without a step count, ours or the built-in SaveLoRA's), so counters never repeat across step
    counts.  ``prefix`` is a plain file-name stem (use :func:`safe_prefix` for user input and put its
    folders into ``folder``).  The folder is not created.  A name whose sidecar
    (``<stem><suffix>`` for :data:`SIDECAR_SUFFIXES`) exists counts as taken too, so a new file is never
    joined to a leftover training state.
    """
    folder = Path(folder)
    if not prefix or "/" in prefix or "\\" in prefix:
        raise ValueError(f"next_free_path wants a plain file-name prefix, got {prefix!r}")
    if not ext.startswith("."):
        ext = "." + ext
    if steps is not None:
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
    sidecars = SIDECAR_SUFFIXES if ext.lower() == LORA_SUFFIX else ()
    patterns = [_counter_pattern(prefix, e) for e in (ext, *sidecars)]
    highest = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        names = []
    for name in names:
        for pattern in patterns:
            m = pattern.match(name)
            if m:
                highest = max(highest, int(m.group(1)))
    counter = highest + 1
    while True:
        middle = f"{steps}_steps_" if steps is not None else ""
        stem = f"{prefix}_{middle}{counter:05}"
        candidate = folder / f"{stem}{ext}"
        if not any(os.path.lexists(folder / f"{stem}{e}") for e in (ext, *sidecars)):
            return candidate
        counter += 1


_BAD_CHARS = re.compile(r"[^A-Za-z0-9._ -]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(1, 10)] + [f"LPT{i}" for i in range(1, 10)]
)
_MAX_COMPONENT = 150


def safe_prefix(prefix: str, name: str = "filename_prefix") -> str:
    """Validate and clean a user-given ``filename_prefix`` (may hold sub-folders, ``/`` or ``\\``).

    Refused with ``ValueError``: empty prefixes, absolute paths, drive letters, ``..`` components and
    a trailing separator (no file name).  Cleaned: characters outside ``[A-Za-z0-9._ -]`` become
    ``_``, leading dots and surrounding spaces of every component are stripped, ``.`` and empty
    components are dropped.  Returns ``"folder/sub/name"`` with ``/`` separators.  Error messages name
    the input as ``name``.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"{name} must be text, got {type(prefix).__name__}")
    text = prefix.strip().replace("\\", "/")
    if not text:
        raise ValueError(f"{name} is empty; give a name such as 'loralab/my_lora'")
    if text.startswith("/"):
        raise ValueError(
            f"{name} {prefix!r} is an absolute path; give a path relative to the save "
            "folder, such as 'loralab/my_lora'"
        )
    if _DRIVE.match(text):
        raise ValueError(
            f"{name} {prefix!r} starts with a drive letter; give a path relative to the save "
            "folder, such as 'loralab/my_lora'"
        )
    if text.endswith("/"):
        raise ValueError(
            f"{name} {prefix!r} ends with a folder separator; add a file name after it, such as "
            f"'{text}my_lora'"
        )
    parts: list[str] = []
    for raw in text.split("/"):
        if raw.strip() == "..":
            raise ValueError(
                f"{name} {prefix!r} contains '..'; files stay inside the folder they are saved to; remove "
                "the '..' parts"
            )
        if raw.strip() in ("", "."):
            continue
        part = _BAD_CHARS.sub("_", raw.strip()).lstrip(".").strip()
        if not part:
            raise ValueError(
                f"{name} {prefix!r} has a folder or file name made only of dots or spaces "
                f"({raw!r}); use letters or digits"
            )
        if len(part) > _MAX_COMPONENT:
            raise ValueError(
                f"{name} {prefix!r} has a name longer than {_MAX_COMPONENT} characters; shorten it"
            )
        if part.split(".")[0].upper() in _WINDOWS_RESERVED:
            part = "_" + part
        parts.append(part)
    if not parts:
        raise ValueError(
            f"{name} {prefix!r} has no usable name; give a name such as 'loralab/my_lora'"
        )
    return "/".join(parts)


# --------------------------------------------------------------------------------------------
# Metadata

PACK_NAME = "LoRA Lab"
MODELSPEC_VERSION = "1.0.1"  # the version kohya sd-scripts writes (resolution, prediction_type)
# The tensor keys are ComfyUI module paths, so ComfyUI is the implementation they follow.
MODELSPEC_IMPLEMENTATION = "https://github.com/comfyanonymous/ComfyUI"

# family key -> (modelspec architecture, ss_base_model_version)
_FAMILIES: dict[str, tuple[str, str]] = {
    "sd1": ("stable-diffusion-v1", "sd_v1"),
    "sd2": ("stable-diffusion-v2-512", "sd_v2"),
    "sd2v": ("stable-diffusion-v2-768-v", "sd_v2"),
    "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
    "sdxlrefiner": ("stable-diffusion-xl-v1-refiner", "sdxl_refiner_v1-0"),
    "sd3": ("stable-diffusion-3", "sd3"),
    "flux": ("flux-1", "flux1"),  # a Flux.1 variant kohya has no name for (Kontext, Fill, ...)
    "fluxdev": ("flux-1-dev", "flux1"),
    "fluxschnell": ("flux-1-schnell", "flux1"),
    "chroma": ("chroma", "chroma"),
    "lumina2": ("lumina-2", "lumina2"),
}


def base_model_info(family: str | None) -> tuple[str, str]:
    """``(modelspec architecture, ss_base_model_version)`` for a base-model family name.

    Accepts loose spellings and ComfyUI model-config class names: ``sd15``/``SD15``/``sd1.5``,
    ``sd2``/``SD20``/``SD21UnclipL``, ``sdxl``/``SDXL``, ``SDXLRefiner``, ``sd3``/``SD3``, ``Flux`` (Flux.1
    dev), ``FluxSchnell``, other Flux.1 variants, ``Chroma``, ``Lumina2``: the architecture names kohya
    sd-scripts writes (``flux-1-dev``, ``flux-1-schnell``, ``flux-1``, ``chroma``, ``lumina-2``).
    Unknown names are passed through (lower-cased, cleaned); None gives ``("unknown", "unknown")``.
    """
    key = re.sub(r"[^a-z0-9]", "", str(family or "").lower())
    if key in ("", "unknown", "basemodel", "none"):  # comfy.model_base.BaseModel serves SD1 and SD2 alike
        return "unknown", "unknown"
    if key.startswith("sdxlrefiner"):
        return _FAMILIES["sdxlrefiner"]
    if key.startswith("sdxl") or key.startswith("ssd1b"):
        return _FAMILIES["sdxl"]
    if key.startswith("sd3"):
        return _FAMILIES["sd3"]
    if key in ("flux", "fluxdev", "flux1dev"):  # ComfyUI's "Flux" class is Flux.1 dev
        return _FAMILIES["fluxdev"]
    if key.startswith(("fluxschnell", "flux1schnell")):
        return _FAMILIES["fluxschnell"]
    if key.startswith("flux") and not key.startswith("flux2"):
        return _FAMILIES["flux"]
    if key.startswith("chroma") and "radiance" not in key:
        return _FAMILIES["chroma"]
    if key.startswith("lumina2"):
        return _FAMILIES["lumina2"]
    if key.startswith("sd2") or key.startswith("sdv2"):
        return _FAMILIES["sd2v" if key.endswith("v") else "sd2"]
    if key.startswith("sd1") or key.startswith("sdv1"):
        return _FAMILIES["sd1"]
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", str(family).strip().lower()).strip("-") or "unknown"
    return cleaned, cleaned


_ALGO_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
# the trainer's target -> ModelSpec's prediction_type (other parameterisations: not written)
_MODELSPEC_PREDICTION = {"eps": "epsilon", "v": "v", "flow": "flow"}


def _num(value: float | int) -> str:
    """Shortest round-tripping text of a number (``1e-4`` -> ``'0.0001'``, ``8`` -> ``'8'``)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


# LyCORIS network arguments that train the same kind of file (kohya ss_network_args).
_LYCORIS_ARGS = {"oft": {"algo": "diag-oft"}, "dora": {"algo": "lora", "dora_wd": True, "wd_on_out": False}}


def build_metadata(
    *,
    steps: int,
    algorithm: str = "lora",
    rank: int | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    optimizer: str | None = None,
    learning_rate: float | None = None,
    loss: float | None = None,
    training_dtype: str | None = None,
    lora_dtype: str | None = None,
    model_family: str | None = None,
    base_model: str | None = None,
    dataset_size: int | None = None,
    pack_version: str | None = None,
    title: str | None = None,
    resolution: str | None = None,
    prediction_type: str | None = None,
    date: _dt.datetime | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """String metadata for a trained adapter: ``loralab.*``, kohya ``ss_*`` and SAI ModelSpec keys.

    ``algorithm`` is ``"lora"``, ``"loha"``, ``"lokr"``, ``"oft"`` or ``"dora"`` (other LyCORIS names pass
    through); kohya's ``ss_network_args`` name them as LyCORIS' network module does.
    ``loss`` is the final (or smoothed final) training loss.  ``model_family`` (alias ``base_model``)
    names the base model, best as ComfyUI's model-config class name (``SD15``, ``SDXL``, ``SD3``,
    ``Flux``; see :func:`base_model_info`).  Keys whose value is None are left out.
    ``extra`` entries are added last as ``str(value)`` (already ``str`` values are kept as they are).
    ``resolution`` ("<width>x<height>" in pixels) and ``prediction_type`` (the trainer's target: eps,
    v, flow) go into ModelSpec 1.0.1 as kohya sd-scripts writes it; ``ss_v2`` tells A1111 / Forge an SD2
    file from an SD1 one, and a v-prediction SD2 is the 768-v architecture.
    """
    algo = (algorithm or "lora").strip().lower()
    if model_family is None:
        model_family = base_model
    arch, base_version = base_model_info(model_family)
    if base_version == "sd_v2" and prediction_type == "v":
        arch = _FAMILIES["sd2v"][0]
    when = (date or _dt.datetime.now(_dt.timezone.utc)).replace(microsecond=0)
    if when.tzinfo is None:
        when = when.astimezone()
    iso_date = when.isoformat()

    md: dict[str, str | None] = {
        "loralab.format_version": "1",
        "loralab.steps": _num(int(steps)),
        "loralab.algorithm": algo,
        "loralab.rank": None if rank is None else _num(int(rank)),
        "loralab.alpha": None if alpha is None else _num(alpha),
        "loralab.seed": None if seed is None else _num(int(seed)),
        "loralab.optimizer": optimizer,
        "loralab.learning_rate": None if learning_rate is None else _num(learning_rate),
        "loralab.final_loss": None if loss is None else _num(loss),
        "loralab.training_dtype": training_dtype,
        "loralab.lora_dtype": lora_dtype,
        "loralab.model_family": None if model_family is None else str(model_family),
        "loralab.dataset_size": None if dataset_size is None else _num(int(dataset_size)),
        "loralab.version": pack_version,
        # kohya-ss / A1111 readers
        "ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya",
        "ss_network_dim": None if rank is None else _num(int(rank)),
        "ss_network_alpha": None if alpha is None else _num(alpha),
        "ss_network_args": None if algo == "lora" else json.dumps(_LYCORIS_ARGS.get(algo, {"algo": algo})),
        "ss_steps": _num(int(steps)),
        "ss_max_train_steps": _num(int(steps)),
        "ss_learning_rate": None if learning_rate is None else _num(learning_rate),
        "ss_unet_lr": None if learning_rate is None else _num(learning_rate),
        "ss_seed": None if seed is None else _num(int(seed)),
        "ss_optimizer": optimizer,
        "ss_num_train_images": None if dataset_size is None else _num(int(dataset_size)),
        "ss_base_model_version": base_version,
        "ss_v2": None if base_version == "unknown" else str(base_version == "sd_v2"),
        "ss_network_train_unet_only": "True",
        "ss_training_finished_at": _num(int(when.timestamp())),
        # SAI ModelSpec 1.0.1
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/{algo}",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title or f"{PACK_NAME} {_ALGO_NAMES.get(algo, algo)} {iso_date}",
        "modelspec.date": iso_date,
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": _MODELSPEC_PREDICTION.get(prediction_type or ""),
    }
    out = {k: v for k, v in md.items() if v is not None}
    for key, value in (extra or {}).items():
        out[str(key)] = value if isinstance(value, str) else str(value)
    return out


# peft's pattern keys are regular expressions; only plain ones are honoured (literal text, ".", "\\.",
# "^", "$", "[...]" and at most one "*"), so a file's metadata cannot make matching slow.
_PLAIN_PATTERN = re.compile(r"^\^?(?:[\w\-]|\\.|\.|\[[^\]]{1,40}\]|\*|\?){1,400}\$?$")


def _peft_field(value, kind=float):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return kind(value)
    return None


def peft_alphas(metadata: Mapping[str, str] | None) -> Callable[[str], float | None] | None:
    """The LoRA alpha a diffusers / peft file keeps outside its tensors, per layer: file stem (e.g.
    "unet.down_blocks.0.attentions.0.proj_in") -> alpha, from ``lora_adapter_metadata``. That JSON is a
    peft LoraConfig, either flat ("lora_alpha", "alpha_pattern") or per component the way diffusers
    writes it ("unet.lora_alpha", "transformer.alpha_pattern") or nested ({"unet": {...}}); an
    alpha_pattern entry wins over lora_alpha. None when the file has no such metadata; the function
    returns None for a layer it says nothing about (that layer then keeps alpha = rank, scale 1)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(info, dict):
        return None
    configs: dict[str, dict] = {}  # component ("" for a flat config) -> its fields
    for key, value in info.items():
        if isinstance(value, dict) and "." not in str(key) and key not in ("alpha_pattern", "rank_pattern"):
            configs.setdefault(str(key), {}).update(value)
        elif "." in str(key):
            component, _, field = str(key).partition(".")
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("", {})[str(key)] = value
    rules: list[tuple[str, list[tuple[re.Pattern, float]], float | None]] = []
    for component in sorted(configs, key=len, reverse=True):  # a component's own config before a flat one
        fields = configs[component]
        patterns = []
        raw_patterns = fields.get("alpha_pattern")
        for pattern, value in (raw_patterns.items() if isinstance(raw_patterns, dict) else ()):
            alpha = _peft_field(value)
            if alpha is not None and isinstance(pattern, str) and _PLAIN_PATTERN.match(pattern) and pattern.count("*") <= 1:
                try:
                    patterns.append((re.compile(rf"(.*\.)?({pattern})$"), alpha))
                except re.error:
                    continue
        rules.append((component, patterns, _peft_field(fields.get("lora_alpha"))))

    def alpha_for(stem: str) -> float | None:
        for component, patterns, default in rules:
            if component and not stem.startswith(component + "."):
                continue
            module = stem[len(component) + 1 :] if component else stem
            for pattern, alpha in patterns:
                if pattern.match(module):
                    return alpha
            return default
        return None

    return alpha_for
