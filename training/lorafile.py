"""Reading and writing LoRA files (safetensors only). Their names: ``training.file_names``; their
metadata: ``training.lora_metadata``; the atomic writes themselves: ``training.safe_write``.

No ComfyUI imports: this module is used by the nodes, by the trainer and by plain tests.

Conventions:

* A LoRA state dict maps ``diffusion_model.<module path>.<suffix>`` to tensors, which is what
  ComfyUI's own "Save LoRA Weights" / "Load LoRA Model" nodes consume.  :class:`LoraStateDict` is
  such a plain dict with an extra ``metadata`` attribute, so stock nodes keep working with it.
* Files are written atomically (temporary file in the same folder, fsync, rename) and never
  overwrite an existing file unless asked to.
* Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ...) are refused and never unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .safe_write import write_atomically

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
]

LORA_SUFFIX = ".safetensors"
# Files that live beside a LoRA under its name (the training-state sidecar of a checkpoint): a name is
# only free when none of these exists either, so a new LoRA is never joined to an older sidecar.
SIDECAR_SUFFIXES = (".lorastate",)
# Largest step count read from a file (metadata, name, training state); anything above is refused as
# bogus: 10**9 steps is far beyond any real run, and keeps names and sums small.
MAX_STEP_COUNT = 10**9

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
        # trained on: "kohya" the "lora_unet_..." stem kohya sd-scripts uses (nodes.lora_keys.kohya_names),
        # "diffusers" the peft module names with the output rows each covers (lora_keys.diffusers_names).
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

    write_atomically(path, write, overwrite, "LoRA file", ", or choose another filename_prefix")
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

    write_atomically(path, write, overwrite, "LoRA file", ", or choose another filename_prefix")
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
