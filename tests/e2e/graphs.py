"""Small builders for API-format ComfyUI prompts, and readers for what such prompts leave behind.

    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=30, algorithm="LoHa")
    g.save_lora(trainer[1], "e2e/loha", steps=trainer[3])
    result = client.run(g.prompt)

``Graph.add`` returns a :class:`Node`; ``node[i]`` is the link ``[node_id, i]`` to its output ``i``.
Node ids are short sequential strings, so two graphs built the same way have the same ids.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness.client import RunResult
from harness.server import DATASET_NAME, MODEL_NAME
from harness.workflow import fill_required_defaults
from training.config import node_options

NO_LORA = "[None]"

#: The trainer's widget inputs with the contract's defaults (the pack's node and the built-in share them),
#: from the option table the node's schema is built from.
TRAIN_DEFAULTS: dict[str, Any] = {
    **{option.name: option.widget_default for option in node_options("train")},
    "existing_lora": NO_LORA,
}

# Trainer outputs (both trainers).
MODEL_OUT, LORA_OUT, LOSS_OUT, STEPS_OUT = 0, 1, 2, 3

#: LoraLab_TrainingOptions' widget inputs with the node's defaults (all of them are required inputs).
OPTIONS_DEFAULTS: dict[str, Any] = {option.name: option.widget_default for option in node_options("options")}

# LoraLab_LoadLora outputs.
LOADED_LORA_OUT, LOADED_STEPS_OUT = 0, 1


@dataclass(frozen=True)
class Node:
    id: str
    class_type: str

    def __getitem__(self, index: int) -> list:
        return [self.id, index]


class Graph:
    """An API-format prompt under construction (``.prompt`` is what ``POST /prompt`` takes)."""

    def __init__(self) -> None:
        self.prompt: dict[str, dict] = {}

    def add(self, class_type: str, **inputs: Any) -> Node:
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        return Node(node_id, class_type)

    # ------------------------------------------------------------------ sources

    def unet(self, name: str = MODEL_NAME) -> list:
        """The tiny SD3 model through ComfyUI's UNETLoader: its MODEL link."""
        return self.add("UNETLoader", unet_name=name, weight_dtype="default")[0]

    def dataset(self, name: str = DATASET_NAME) -> tuple[list, list]:
        """The pack's latent dataset loader: (LATENT link, CONDITIONING link)."""
        node = self.add("LoraLab_LoadLatentDataset", dataset=name)
        return node[0], node[1]

    def empty_latent(self, width: int = 128, height: int = 128, batch_size: int = 1) -> list:
        return self.add("EmptySD3LatentImage", width=width, height=height, batch_size=batch_size)[0]

    # ------------------------------------------------------------------ training

    def train(self, model, latents, positive, **widgets: Any) -> Node:
        """The pack's trainer; ``widgets`` override :data:`TRAIN_DEFAULTS`."""
        return self._trainer("LoraLab_TrainLoraNode", model, latents, positive, widgets)

    def stock_train(self, model, latents, positive, **widgets: Any) -> Node:
        """ComfyUI's built-in ``TrainLoraNode`` with the same inputs."""
        return self._trainer("TrainLoraNode", model, latents, positive, widgets)

    def _trainer(self, class_type: str, model, latents, positive, widgets: dict) -> Node:
        unknown = set(widgets) - set(TRAIN_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown trainer inputs: {sorted(unknown)}")
        return self.add(
            class_type, model=model, latents=latents, positive=positive, **{**TRAIN_DEFAULTS, **widgets}
        )

    def denoise_loss(self, model, latents, positive, seed: int = 0, levels: int = 8) -> Node:
        return self.add(
            "LoraLab_DenoiseLoss", model=model, latents=latents, positive=positive, seed=seed, levels=levels
        )

    # ------------------------------------------------------------------ LoRA files and loaders

    def save_lora(self, lora, prefix: str, steps=None) -> Node:
        """The pack's SaveLora (writes into models/loras/)."""
        inputs: dict[str, Any] = {"lora": lora, "filename_prefix": prefix}
        if steps is not None:
            inputs["steps"] = steps
        return self.add("LoraLab_SaveLora", **inputs)

    def stock_save_lora(self, lora, prefix: str, steps=None) -> Node:
        """ComfyUI's ``SaveLoRA`` (writes into output/)."""
        inputs: dict[str, Any] = {"lora": lora, "prefix": prefix}
        if steps is not None:
            inputs["steps"] = steps
        return self.add("SaveLoRA", **inputs)

    def lora_loader(self, model, lora_name: str, strength: float = 1.0) -> list:
        """ComfyUI's ``LoraLoaderModelOnly`` (a file from the loras folder)."""
        return self.add("LoraLoaderModelOnly", model=model, lora_name=lora_name, strength_model=strength)[0]

    def lora_model_loader(self, model, lora, strength: float = 1.0) -> list:
        """ComfyUI's ``LoraModelLoader`` (a LORA_MODEL link)."""
        return self.add("LoraModelLoader", model=model, lora=lora, strength_model=strength)[0]

    def plot_loss(self, loss, prefix: str) -> Node:
        return self.add("LoraLab_PlotLoss", loss=loss, filename_prefix=prefix)

    def stock_loss_graph(self, loss, prefix: str) -> Node:
        return self.add("LossGraphNode", loss=loss, filename_prefix=prefix)

    # ------------------------------------------------------------------ sampling

    def ksampler(
        self,
        model,
        positive,
        latent_image,
        *,
        seed: int = 7,
        steps: int = 3,
        cfg: float = 1.0,
        sampler_name: str = "euler",
        scheduler: str = "simple",
        denoise: float = 1.0,
    ) -> Node:
        return self.add(
            "KSampler",
            model=model,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            positive=positive,
            negative=positive,
            latent_image=latent_image,
            denoise=denoise,
        )

    def save_latent(self, samples, prefix: str) -> Node:
        return self.add("SaveLatent", samples=samples, filename_prefix=prefix)

    def sample_and_save(self, model, positive, prefix: str, **sampler: Any) -> tuple[Node, Node]:
        """KSampler from an empty 128x128 (16x16 latent) SD3 latent, then SaveLatent: (sampler, saver)."""
        sampled = self.ksampler(model, positive, self.empty_latent(), **sampler)
        return sampled, self.save_latent(sampled[0], prefix)

    # ------------------------------------------------------------------ LoRA Lab companion nodes

    def training_options(self, **overrides: Any) -> Node:
        """LoraLab_TrainingOptions; ``overrides`` replace :data:`OPTIONS_DEFAULTS`."""
        unknown = set(overrides) - set(OPTIONS_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown training options: {sorted(unknown)}")
        return self.add("LoraLab_TrainingOptions", **{**OPTIONS_DEFAULTS, **overrides})

    def train_with_options(self, model, latents, positive, options, **widgets: Any) -> Node:
        """The pack's trainer with its optional ``options`` input linked (an OPTIONS node's output 0)."""
        node = self.train(model, latents, positive, **widgets)
        self.prompt[node.id]["inputs"]["options"] = options[0] if isinstance(options, Node) else options
        return node

    def save_lora_format(self, lora, prefix: str, key_format: str, steps=None) -> Node:
        """The pack's SaveLora with its optional ``key_format`` (comfyui | kohya | diffusers)."""
        node = self.save_lora(lora, prefix, steps=steps)
        self.prompt[node.id]["inputs"]["key_format"] = key_format
        return node

    def apply_lora(self, model, lora, strength: float = 1.0) -> list:
        """LoraLab_ApplyLora: its MODEL link."""
        return self.add("LoraLab_ApplyLora", model=model, lora=lora, strength=strength)[0]

    def load_lora(self, lora_name: str) -> Node:
        """LoraLab_LoadLora (outputs: LORA_MODEL, steps INT)."""
        return self.add("LoraLab_LoadLora", lora_name=lora_name)


# ---------------------------------------------------------------------- reading results


def cached_nodes(result: RunResult) -> set[str]:
    """Node ids the server served from its cache (its ``execution_cached`` message)."""
    out: set[str] = set()
    for data in result.events_of("execution_cached"):
        out.update(str(n) for n in data.get("nodes") or [])
    return out


def executed_nodes(result: RunResult) -> set[str]:
    """Node ids that ran in this prompt (``executing`` messages)."""
    return {str(d["node"]) for d in result.events_of("executing") if d.get("node") is not None}


def denoise_value(result: RunResult, node: Node) -> float:
    values = result.outputs[node.id]["loss"]
    assert len(values) == 1, values
    return float(values[0])


def saved_lora(result: RunResult, node: Node) -> tuple[str, pathlib.Path]:
    """(name relative to the loras folder, absolute path) of a LoraLab_SaveLora node's file. The node's
    UI result names the file relative to the loras folder only (no absolute path leaves the server);
    the path is found under the base directory of the server that ran the prompt."""
    entries = result.outputs[node.id]["loras"]
    assert len(entries) == 1, entries
    assert "path" not in entries[0], entries  # no absolute server path in UI results
    assert result.base_dir is not None, "run the prompt with a client made by ComfyServer.client()"
    path = result.base_dir / "models" / "loras" / entries[0]["filename"]
    assert path.is_file(), path
    return entries[0]["filename"], path


def lora_metadata(path: pathlib.Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def lora_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def latent_path(result: RunResult, node: Node, output_dir: pathlib.Path) -> pathlib.Path:
    entries = result.outputs[node.id]["latents"]
    assert len(entries) == 1, entries
    e = entries[0]
    path = output_dir / e["subfolder"] / e["filename"]
    assert path.is_file(), path
    return path


def load_latent(result: RunResult, node: Node, output_dir: pathlib.Path) -> torch.Tensor:
    """The tensor a SaveLatent node wrote (a safetensors file, key ``latent_tensor``)."""
    return load_file(str(latent_path(result, node, output_dir)))["latent_tensor"]


def with_stock_defaults(comfy_server, prompt: dict) -> dict:
    """`prompt` with the server's defaults for required inputs it leaves out: for graphs of stock
    nodes that newer ComfyUI releases gave more inputs (built-in TrainLoraNode, LoraModelLoader)."""
    return fill_required_defaults(prompt, comfy_server.object_info)


def output_index(comfy_server, class_type: str, output_type: str) -> int:
    """Index of a stock node's first output of `output_type`, from the server's /object_info: stock
    nodes change their outputs between releases (ComfyUI 0.3.75's TrainLoraNode returns MODEL,
    LORA_MODEL, LOSS_MAP, INT; newer ones drop the MODEL)."""
    return list(comfy_server.object_info[class_type]["output"]).index(output_type)


def progress_events(result: RunResult, node: Node) -> list[dict]:
    return [d for d in result.events_of("progress") if str(d.get("node")) == node.id]


def assert_progress_bar(result: RunResult, node: Node, steps: int) -> None:
    """ComfyUI's progress bar of a trainer went 1 .. steps, once per optimizer step. ComfyUI 0.3.75
    sends every value; newer releases throttle the messages, so a missing intermediate value is
    allowed, but a value out of order, past `steps` or a wrong maximum is not."""
    values = [e["value"] for e in progress_events(result, node)]
    assert values and values[-1] == steps, values
    assert values == sorted(set(values)) and 1 <= values[0], values
    assert all(e["max"] == steps for e in progress_events(result, node))


def assert_loss_per_step(result: RunResult, node: Node, steps: int) -> None:
    """The pack's own events carry one finite loss for every step 1 .. steps, each exactly once; the
    first one the run's memory plan (bytes; training adds adapters, gradients and activations)."""
    covered = []
    events = loralab_progress(result, node)
    memory = events[0].get("memory") if events else None
    assert memory and memory["added"] >= memory["activations"] > 0 and memory["trainable"] > 0, memory
    assert memory["available"] > 0 and not any("memory" in e for e in events[1:])
    for e in events:
        covered += range(e["first_step"], e["first_step"] + len(e["losses"]))
        assert all(math.isfinite(v) and v > 0 for v in e["losses"]), e["losses"]
    assert covered == list(range(1, steps + 1)), covered


def loralab_progress(result: RunResult, node: Node) -> list[dict]:
    """The pack's own ``loralab.progress`` websocket events of one trainer node."""
    return [d for d in result.events_of("loralab.progress") if str(d.get("node")) == node.id]


def ui_image_paths(result: RunResult, node: Node, output_dir: pathlib.Path) -> list[pathlib.Path]:
    """Files an output node listed under ``ui.images`` (type output), as absolute paths."""
    out = []
    for e in result.outputs[node.id]["images"]:
        assert e.get("type") == "output", e
        out.append(output_dir / e.get("subfolder", "") / e["filename"])
    return out


# ---------------------------------------------------------------------- files on disk


def tree_snapshot(root: pathlib.Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file, folder and symlink below ``root`` (symlinks listed, not followed): relative posix
    path -> (size, mtime_ns) for files, (-1, 0) for folders and links. Top-level entries named in
    ``skip`` (e.g. ``"user"``, where ComfyUI keeps its database) are left out. Compare two snapshots
    to prove that nothing was written, changed or removed."""
    out: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = pathlib.Path(folder)
        if here == root:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in dirs + files:
            path = here / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            is_file = path.is_file() and not path.is_symlink()
            out[rel] = (st.st_size, st.st_mtime_ns) if is_file else (-1, 0)
    return out


def snapshot_diff(before: dict, after: dict) -> dict[str, list[str]]:
    """What changed between two :func:`tree_snapshot` results (empty lists when nothing did)."""
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
    }


def write_latent_dataset(base_dir: pathlib.Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Save ``tensors`` (keys latents [N,C,H,W], context [N,T,D], optional pooled [N,P]) as
    ``<base_dir>/input/<name>`` for ``LoraLab_LoadLatentDataset``; returns ``name``."""
    from safetensors.torch import save_file

    path = base_dir / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return name


def run_ok(comfy, prompt: dict, timeout: float = 300.0, **kwargs):
    """Run a prompt and insist it succeeded (the failure message is ComfyUI's own)."""
    result = comfy.run(prompt, timeout=timeout, **kwargs)
    assert result.status == "success", result.error_message
    return result


def run_logged(comfy_server, prompt: dict, timeout: float = 300.0):
    """Run a prompt; return (result, the server log written while it ran)."""
    start = len(comfy_server.log_text())
    result = comfy_server.client.run(prompt, timeout=timeout)
    return result, comfy_server.log_text()[start:]
