"""Applying a LORA_MODEL to a MODEL whatever tool named its keys: Apply LoRA (LoRA Lab), and the
mapping onto the model's own keys that Save LoRA's converter shares."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from comfy_api.latest import io

from ..lora.inject import normalize_file_keys
from ..training.lora_metadata import peft_alphas
from ..training.lorafile import LoraStateDict

log = logging.getLogger("loralab")


CATEGORY = "LoRA Lab"
LORA_MODEL = io.Custom("LORA_MODEL")


class LoraLab_ApplyLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_ApplyLora",
            display_name="Apply LoRA (LoRA Lab)",
            category=CATEGORY,
            description=(
                "Applies LORA_MODEL weights (from a trainer or Load LoRA file) to a model at a strength. Reads every "
                "naming ComfyUI's loader reads, plus the attention layers of diffusers / peft SD UNet files (which "
                "stock loaders skip) and the alpha peft keeps in a file's metadata."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="The diffusion model to apply the adapter to; it is not changed."
                ),
                LORA_MODEL.Input("lora", tooltip="Adapter weights (LORA_MODEL)."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Multiplier of the adapter's effect; negative values invert it.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A copy of the model with the adapter applied.")
            ],
        )

    @classmethod
    def execute(cls, model, lora, strength: float) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        import comfy.sd

        return io.NodeOutput(
            comfy.sd.load_lora_for_models(model, None, model_keys(model, lora), strength, 0)[0]
        )


def for_model(model, lora: Mapping) -> LoraStateDict:
    """The LoRA in the model's "diffusion_model.<module>" keys (model_keys), knowing the model's kohya and
    diffusers names for its layers, as a LoRA from the trainer does; metadata kept."""
    from ..lora.inject import find_targets, group_file_keys
    from . import lora_keys

    keys = lora_keys.key_targets(model)
    tensors = model_keys(model, lora, keys)
    layers = find_targets(model.model.diffusion_model)
    groups, _ = group_file_keys(tensors, layers)
    targets = {p: layers[p] for p in groups}
    names = {"kohya": lora_keys.kohya_names(model, targets, lora_keys.lora_key_names(model, keys)),
             "diffusers": lora_keys.diffusers_names(model, targets, keys)}  # fmt: skip
    return LoraStateDict(tensors, metadata=getattr(lora, "metadata", None), file_names=names)


def model_keys(model, lora: Mapping, keys: list | None = None) -> dict:
    """A LoRA in any naming the model's loader maps, in "diffusion_model.<module>" keys, with the alpha of
    a peft file's metadata on its layers; parts of a fused layer become one LoRA of it. Keys that map to
    no layer stay as they are (ComfyUI's loader still applies what it knows). keys: the model's
    lora_keys.key_targets, when the caller has it."""
    from . import lora_keys

    keys = lora_keys.key_targets(model) if keys is None else keys
    return normalize_file_keys(lora, lora_keys.lora_key_names(model, keys), peft_alphas(getattr(lora, "metadata", None)),
                               parts=lora_keys.lora_split_names(model, keys))  # fmt: skip


NODES: list[type[io.ComfyNode]] = [LoraLab_ApplyLora]
