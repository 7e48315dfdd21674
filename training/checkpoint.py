"""Training-state sidecar files: everything beyond the LoRA weights that an exact resume needs.

A checkpoint is two files side by side in the loras folder:
  <name>.safetensors   the adapter in lora_dtype with metadata (any LoRA loader reads it)
  <name>.lorastate     safetensors too: fp32 master weights "master.<key>", optimizer tensors
                       "optim.<param index>.<state name>", and JSON metadata (step, planned total,
                       param groups, non-tensor optimizer state, the config that made it)
The extension keeps the sidecar out of ComfyUI's LoRA lists. Noise, batch order and learning rate are
pure functions of (seed, step), so no RNG or scheduler state is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lorafile import write_error_cause

STATE_SUFFIX = ".lorastate"
FORMAT = "loralab.trainstate.v1"


def state_path_for(lora_path: str | os.PathLike) -> Path:
    p = Path(lora_path)
    return p.with_name(p.name.removesuffix(".safetensors") + STATE_SUFFIX)


def save_training_state(
    path: str | os.PathLike,
    master: Mapping[str, torch.Tensor],
    optimizer_state: dict,
    step: int,
    total_steps: int,
    config: Mapping,
) -> Path:
    """Write atomically (temp file + rename). master: fp32 adapter weights keyed as in the LoRA file."""
    path = Path(path)
    tensors = {f"master.{k}": v.detach().float().cpu().contiguous() for k, v in master.items()}
    scalars: dict[str, dict] = {}
    for idx, st in optimizer_state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {
        "format": FORMAT,
        "step": step,
        "total_steps": total_steps,
        "param_groups": optimizer_state["param_groups"],
        "scalar_state": scalars,
        "config": dict(config),
    }
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"loralab.trainstate": json.dumps(meta)})
        os.replace(tmp, path)
    except Exception as exc:
        io_error = write_error_cause(exc)  # safetensors reports disk full / read-only as its own error
        if io_error is None:
            raise
        message = (
            f"could not write training state {path}: {io_error.strerror or io_error}; check that the "
            "folder is writable and has free space"
        )
        raise (OSError(message) if io_error.errno is None else OSError(io_error.errno, message)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (master weights, optimizer state_dict, info {step, total_steps, config})."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("loralab.trainstate")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(f"training state {path.name}: cannot read it ({e}); delete it to resume from the weights only") from e
    if raw is None:
        raise ValueError(f"training state {path.name}: not a LoRA Lab training state file")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"training state {path.name}: unknown format {meta.get('format')!r}")
    master = {k.removeprefix("master."): v for k, v in tensors.items() if k.startswith("master.")}
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, values in meta["scalar_state"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer_state = {"state": state, "param_groups": meta["param_groups"]}
    info = {"step": meta["step"], "total_steps": meta["total_steps"], "config": meta["config"]}
    return master, optimizer_state, info
