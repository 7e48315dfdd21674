"""Checkpoints: a LoRA file plus a training-state sidecar, bound to each other, pruned, written durably.

A checkpoint is two files side by side in the loras folder:
  <name>.safetensors   the adapter in lora_dtype with metadata (any LoRA loader reads it)
  <name>.lorastate     safetensors too: fp32 master weights "master.<key>", optimizer tensors
                       "optim.<param index>.<state name>", and JSON metadata (step, planned total,
                       param groups, non-tensor optimizer state, the config that made it, and the
                       sha256 of the LoRA file's bytes)
The extension keeps the sidecar out of ComfyUI's LoRA lists. Noise, batch order and learning rate are
pure functions of (seed, step), so no RNG or scheduler state is needed.

Binding: the sidecar records ``lora_sha256``, the hash of its LoRA file's exact bytes (computed in
memory before either file is published). On resume a sidecar whose hash does not match the LoRA
beside it (a replaced LoRA, a sidecar copied from elsewhere, one written by an older version) is
ignored with a warning, and training continues from the LoRA's weights only.

Write order (:func:`write_checkpoint`): free space is checked first; then the sidecar goes to a
temporary file (fsynced), the LoRA is published (temporary file, fsync, link without overwriting),
and only then the sidecar is published under its name. At every moment a LoRA has either no
sidecar or its own; neither name ever replaces an existing file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .file_names import next_free_path, step_count
from .lorafile import SIDECAR_SUFFIXES, lora_file_bytes, save_lora_bytes
from .safe_write import fsync_dir, fsync_file, publish, write_atomically, write_error_cause

STATE_SUFFIX = SIDECAR_SUFFIXES[0]
FORMAT = "loralab.trainstate.v2"  # v2: carries lora_sha256 (v1 files are not bound and are ignored)
# Kept free beyond a checkpoint's own size, for the safetensors headers and the filesystem's own needs.
FREE_SPACE_MARGIN = 1 << 20
# Tries to find a free name when another writer takes the chosen one between look-up and write.
_NAME_TRIES = 20

log = logging.getLogger("loralab")


def state_path_for(lora_path: str | os.PathLike) -> Path:
    p = Path(lora_path)
    return p.with_name(p.name.removesuffix(".safetensors") + STATE_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _state_payload(
    master: Mapping[str, torch.Tensor],
    optimizer_state: dict,
    step: int,
    total_steps: int,
    config: Mapping,
    lora_sha256: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"master.{k}": v.detach().float().cpu().contiguous() for k, v in master.items()}
    scalars: dict[str, dict] = {}
    for idx, st in optimizer_state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = []  # tensors in a param group (Prodigy's d estimates) travel as tensors "group.<i>.<name>"
    for i, group in enumerate(optimizer_state["param_groups"]):
        plain = {}
        for name, value in group.items():
            if torch.is_tensor(value):
                tensors[f"group.{i}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        groups.append(plain)
    meta = {
        "format": FORMAT,
        "step": step,
        "total_steps": total_steps,
        "param_groups": groups,
        "scalar_state": scalars,
        "config": dict(config),
        "lora_sha256": lora_sha256,
    }
    return tensors, {"loralab.trainstate": json.dumps(meta)}


def _write_state_file(tmp: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the sidecar's bytes to ``tmp`` and fsync them."""
    save_file(tensors, str(tmp), metadata=metadata)
    fsync_file(tmp)


def save_training_state(
    path: str | os.PathLike,
    master: Mapping[str, torch.Tensor],
    optimizer_state: dict,
    step: int,
    total_steps: int,
    config: Mapping,
    lora_sha256: str | None = None,
) -> Path:
    """Write a sidecar atomically (temp file, fsync, rename). master: fp32 adapter weights keyed as in
    the LoRA file; ``lora_sha256``: the hash of the LoRA file's bytes it belongs to (without it the
    state is not bound and a resume ignores it). Checkpoints use :func:`write_checkpoint`."""
    path = Path(path)
    tensors, metadata = _state_payload(master, optimizer_state, step, total_steps, config, lora_sha256)
    write_atomically(
        path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), True, "training state"
    )
    return path


def _state_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Bytes the sidecar will take, near enough: tensor data plus a generous header estimate."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = sum(len(k) + 96 for k in tensors) + sum(len(v) for v in metadata.values()) + 1024
    return data + header


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def write_checkpoint(
    folder: str | os.PathLike,
    stem: str,
    step: int,
    lora_sd: Mapping[str, torch.Tensor],
    lora_metadata: Mapping[str, str],
    master: Mapping[str, torch.Tensor],
    optimizer_state: dict,
    total_steps: int,
    config: Mapping,
    what: str = "checkpoint_prefix",
) -> tuple[Path, Path]:
    """Write the step-``step`` checkpoint ``<folder>/<stem>_<step>_steps_<counter>.safetensors`` and
    its ``.lorastate`` sidecar (bound by the LoRA bytes' sha256); returns both paths.

    Refused before anything is written (``OSError`` ENOSPC) when the folder has less free space than
    both files need plus :data:`FREE_SPACE_MARGIN`. Any failure leaves neither file nor a temporary
    file behind. Error messages start with ``what`` (the input to change) and name the file.
    """
    folder = Path(folder).absolute()
    lora_bytes = lora_file_bytes(lora_sd, lora_metadata)
    digest = hashlib.sha256(lora_bytes).hexdigest()
    tensors, state_meta = _state_payload(master, optimizer_state, step, total_steps, config, digest)

    path = next_free_path(folder, stem, step)
    state = state_path_for(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise _failed(what, step, path, exc) from exc
    needed = len(lora_bytes) + _state_size(tensors, state_meta) + FREE_SPACE_MARGIN
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"{what}: not enough free space for the step {step} checkpoint {path} and its training state "
            f"{state} ({os.strerror(errno.ENOSPC)}): they need about {_mib(needed)}, {folder} has "
            f"{_mib(free)} free; free some space, save less often (a larger save_every, or 0 for no "
            "checkpoints), keep fewer (keep_checkpoints) or choose another checkpoint_prefix",
        )

    for _ in range(_NAME_TRIES):
        state = state_path_for(path)
        tmp = state.with_name(f"{state.name}.tmp-{os.getpid()}")
        target = state
        published: Path | None = None
        try:
            _write_state_file(tmp, tensors, state_meta)
            target = path
            published = save_lora_bytes(lora_bytes, path)
            target = state
            publish(tmp, state, overwrite=False)
        except FileExistsError:  # another writer took the name: leave its file alone, take the next one
            if published is not None:
                _remove(published)
            _remove(tmp)
            path = next_free_path(folder, stem, step)
            continue
        except BaseException as exc:
            if published is not None:
                _remove(published)  # never a checkpoint LoRA without its state
            _remove(tmp)
            if isinstance(exc, Exception):
                cause = write_error_cause(exc)
                if cause is not None:
                    raise _failed(what, step, target, cause) from exc
            raise
        fsync_dir(folder)
        return path, state
    raise FileExistsError(
        errno.EEXIST, f"{what}: no free checkpoint name after {_NAME_TRIES} tries", str(folder)
    )


def _remove(path: Path) -> None:
    """Clean-up that must not hide the error being handled (unlink fails on a read-only disk)."""
    with contextlib.suppress(OSError):
        path.unlink()


def _failed(what: str, step: int, target: Path, cause: OSError) -> OSError:
    reason = os.strerror(cause.errno) if cause.errno else (cause.strerror or str(cause))
    message = (
        f"{what}: could not save the step {step} checkpoint {target}: {reason}; check that the folder is "
        f"writable and has free space, or choose another {what.split()[0]}"
    )
    return OSError(cause.errno, message) if cause.errno else OSError(message)


class CheckpointSeries:
    """The checkpoints one run wrote, oldest first; keeps the newest ``keep`` (0 = all) by deleting
    older ones of this run only (LoRA and sidecar). Files of other runs are never touched."""

    def __init__(self, keep: int):
        self.keep = keep
        self.written: list[tuple[Path, Path]] = []

    def add(self, lora: Path, state: Path) -> list[Path]:
        """Record a new checkpoint; delete and return the files that fall out of the window."""
        self.written.append((lora, state))
        removed: list[Path] = []
        while self.keep and len(self.written) > self.keep:
            for p in self.written.pop(0):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
        return removed


# ------------------------------------------------------------------------------------------ reading


def _checked_meta(name: str, raw: str) -> dict:
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"training state {name}: its metadata is not readable JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"training state {name}: its metadata is not a JSON object")
    if meta.get("format") not in (FORMAT, "loralab.trainstate.v1"):
        raise ValueError(f"training state {name}: unknown format {str(meta.get('format'))[:40]!r}")
    # JSON integers only (no text, floats or bools), 0..MAX_STEP_COUNT
    step, total = (
        step_count(v) if type(v) is int else None for v in (meta.get("step"), meta.get("total_steps"))
    )
    if step is None or total is None or step > total:
        raise ValueError(
            f"training state {name}: step {str(meta.get('step'))[:40]} of {str(meta.get('total_steps'))[:40]} is not a "
            "whole number between 0 and the planned total (at most 10**9)"
        )
    for key, kind in (("param_groups", list), ("scalar_state", dict), ("config", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"training state {name}: {key} is missing or not a JSON {kind.__name__}")
    return meta


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (master weights, optimizer state_dict, info {step, total_steps, config, lora_sha256}).

    ``ValueError`` naming the file for anything unreadable or out of range (step and total_steps must
    be whole numbers 0..10**9, step <= total)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("loralab.trainstate")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(
            f"training state {path.name}: cannot read it ({e}); delete it to resume from the weights only"
        ) from e
    if raw is None:
        raise ValueError(f"training state {path.name}: not a LoRA Lab training state file")
    meta = _checked_meta(path.name, raw)
    master = {k.removeprefix("master."): v for k, v in tensors.items() if k.startswith("master.")}
    state: dict[int, dict] = {}
    try:
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
            elif k.startswith("group."):
                _, idx, name = k.split(".", 2)
                meta["param_groups"][int(idx)][name] = v
        for idx, values in meta["scalar_state"].items():
            state.setdefault(int(idx), {}).update(values)
    except (ValueError, TypeError, AttributeError, IndexError):
        raise ValueError(f"training state {path.name}: malformed optimizer state") from None
    optimizer_state = {"state": state, "param_groups": meta["param_groups"]}
    info = {
        "step": int(meta["step"]),
        "total_steps": int(meta["total_steps"]),
        "config": meta["config"],
        "lora_sha256": meta.get("lora_sha256"),
    }
    return master, optimizer_state, info


def bound_training_state(lora_path: str | os.PathLike) -> tuple[tuple | None, str | None]:
    """The training state that belongs to the LoRA file ``lora_path``: ``(state, None)`` with state as
    :func:`load_training_state` returns it; ``(None, None)`` when there is no sidecar; ``(None,
    reason)`` when there is one that must not be used (unreadable, out of range, not a regular file,
    or not bound to this LoRA's bytes): the caller warns and resumes from the weights only."""
    state_file = state_path_for(lora_path)
    try:
        st = os.lstat(state_file)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot look at {state_file.name} ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return None, f"{state_file.name} is not a regular file (a link or special file)"
    try:
        master, optimizer_state, info = load_training_state(state_file)
    except ValueError as e:
        return None, str(e)
    recorded = info["lora_sha256"]
    if not isinstance(recorded, str) or not recorded:
        return None, f"{state_file.name} is not bound to a LoRA file (written by an older LoRA Lab)"
    try:
        actual = file_sha256(lora_path)
    except OSError as e:
        return None, f"cannot read {Path(lora_path).name} to check its training state ({e.strerror})"
    if actual != recorded:
        return (
            None,
            f"{state_file.name} belongs to another LoRA file (the content hash it records does not match)",
        )
    return (master, optimizer_state, info), None
