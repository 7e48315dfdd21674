"""Data and measurement nodes: a latent dataset file loader and a fixed-noise denoising-loss probe."""

from __future__ import annotations

import os
import stat

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io
from safetensors.torch import load_file

from ..training.loop import evaluate_denoise_loss
from .graph_inputs import build_samples
from .model_forward import make_predict_x0, objective_for


def _input_root() -> str:
    return os.path.realpath(folder_paths.get_input_directory())


def _inside_regular_file(root: str, name: str) -> str | None:
    """The real path of ``name`` when it is a regular file inside ``root`` (after resolving every
    symlink), else None. Never opens the file; the same answer (None) whether an outside path exists
    or not."""
    if not isinstance(name, str) or not name or "\0" in name:
        return None
    real = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, real]) != root or real == root:
        return None
    try:
        st = os.stat(real)
    except (OSError, ValueError):
        return None
    return real if stat.S_ISREG(st.st_mode) else None


def _dataset_files() -> list[str]:
    """Every .safetensors regular file inside the input folder, as relative names; links that lead out
    of the folder and special files (FIFOs, devices) are left out, so ComfyUI's own list check refuses them."""
    root = _input_root()
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".safetensors"):
                rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                if _inside_regular_file(root, rel) is not None:
                    out.append(rel)
    return sorted(out)


def _dataset_path(name: str) -> str | None:
    path = _inside_regular_file(_input_root(), name)
    return path if path is not None and path.endswith(".safetensors") else None


def _not_a_dataset(name) -> str:
    # One message for missing files, outside paths, links out and special files alike: it must not
    # tell whether something exists outside input/.
    return (f"dataset: {str(name)[:200]!r} is not a regular .safetensors file inside ComfyUI's input folder; "
            "pick one from the list (copy the file into input/)")  # fmt: skip


class LoadLatentDataset(io.ComfyNode):
    """Latents + conditioning from one .safetensors file in the input folder (no VAE or text encoder needed).

    ComfyUI 0.3.75 checks list membership only for V1 combos (a list as the input type), not for V3
    ``io.Combo`` ("COMBO"), so validate_inputs does that check itself, strictly: a regular .safetensors
    file inside input/ after resolving links, the same answer for every other name whether it exists
    or not. A name from a link is checked again at execute, before anything is opened."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_LoadLatentDataset",
            display_name="Load Latent Dataset (LoRA Lab)",
            category="LoRA Lab",
            description="Reads a .safetensors file from the input folder holding 'latents' [N, C, H, W], "
            "'context' [N, T, D] and optionally 'pooled' [N, P].",
            inputs=[
                io.Combo.Input(
                    "dataset",
                    options=_dataset_files(),
                    tooltip="A .safetensors file in ComfyUI's input folder (links that lead outside it are not listed).",
                ),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", tooltip="All N latents as one batch."),
                io.Conditioning.Output(
                    display_name="positive", tooltip="One conditioning with batch N (one entry per latent)."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, dataset=None) -> bool | str:
        if not isinstance(dataset, str):  # linked from another node: checked when it runs
            return True
        return True if _dataset_path(dataset) is not None else _not_a_dataset(dataset)

    @classmethod
    def execute(cls, dataset: str) -> io.NodeOutput:
        path = _dataset_path(dataset)
        if path is None:
            raise ValueError(_not_a_dataset(dataset))
        try:
            data = load_file(path)
        except Exception as e:  # safetensors raises several types for bad files
            raise ValueError(f"dataset: cannot read {dataset!r} as safetensors ({e})") from e
        for key in ("latents", "context"):
            if key not in data:
                raise ValueError(f"dataset: {dataset!r} has no {key!r} tensor (keys: {sorted(data)[:20]})")
        latents, context = data["latents"].float(), data["context"].float()
        if context.shape[0] != latents.shape[0]:
            raise ValueError(
                f"dataset: {dataset!r} has {latents.shape[0]} latents but {context.shape[0]} contexts"
            )
        opts = {"pooled_output": data["pooled"].float()} if "pooled" in data else {}
        return io.NodeOutput({"samples": latents}, [[context, opts]])


class DenoiseLoss(io.ComfyNode):
    """Mean denoising loss of a model on latents at fixed noise levels and noise: compare models before
    and after training (or with / without a LoRA) on equal terms."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_DenoiseLoss",
            display_name="Denoising Loss (LoRA Lab)",
            category="LoRA Lab",
            is_input_list=True,
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="Model to measure (e.g. model_with_lora)."),
                io.Latent.Input("latents", tooltip="Latents to denoise."),
                io.Conditioning.Input("positive", tooltip="One conditioning per latent, or one for all."),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the fixed noise."
                ),
                io.Int.Input(
                    "levels",
                    default=8,
                    min=1,
                    max=1000,
                    tooltip="Noise levels, evenly spaced over the schedule.",
                ),
            ],
            outputs=[
                io.Float.Output(display_name="loss", tooltip="Mean MSE in the model family's target space.")
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, seed, levels) -> io.NodeOutput:
        patcher, seed, levels = model[0], seed[0], levels[0]
        comfy.model_management.load_models_gpu([patcher])
        device = patcher.load_device
        with torch.inference_mode(False):
            samples = build_samples(patcher, latents, positive, device)
            value = evaluate_denoise_loss(
                make_predict_x0(patcher), objective_for(patcher), samples, device, seed, levels
            )
        return io.NodeOutput(value, ui={"text": [f"{value:.6f}"], "loss": [value]})
