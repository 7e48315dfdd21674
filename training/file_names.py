"""Where LoRA files go and what their names say: prefixes that stay inside their folder, the next
free ``<prefix>_<steps>_steps_<counter:05>.safetensors`` name, and the step count a file's metadata
or name carries.

The step count sits between ``_`` and ``_steps_`` as in the names of ComfyUI's built-in SaveLoRA, so
the built-in trainer's ``existing_lora`` can continue from our files too; the counter always grows
per prefix, whatever the step count. No ComfyUI imports.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from .lorafile import LORA_SUFFIX, MAX_STEP_COUNT, SIDECAR_SUFFIXES

__all__ = ["step_count", "earlier_steps", "prefix_location", "next_free_path", "safe_prefix"]

log = logging.getLogger("loralab")

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
                "between 0 and %d",
                key,
                _shown(metadata[key]),
                MAX_STEP_COUNT,
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


def prefix_location(
    root: str | os.PathLike, user_prefix: str, name: str = "filename_prefix"
) -> tuple[Path, str]:
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
        raise ValueError(f"{name} {prefix!r} has no usable name; give a name such as 'loralab/my_lora'")
    return "/".join(parts)
