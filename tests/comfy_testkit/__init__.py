"""LoRA Lab test kit: a ComfyUI custom node that builds the tiny models of ``families.py``.

Installed only into the test servers' ``custom_nodes`` (``harness.server.prepare_base_dir(...,
testkit=True)``), never shipped with the pack. ``LoraLabTest_TinyFamily`` returns a family's tiny
MODEL with learnable LATENT data and its CONDITIONING, as ComfyUI's loaders and text encoders would.
"""

from __future__ import annotations

from .families import FAMILIES, available, build_model, make_data

WEIGHT_DTYPES = ("default", "fp8_e4m3fn")


class TinyFamily:
    @classmethod
    def INPUT_TYPES(cls):
        names = [n for n in FAMILIES if available(n)]
        return {
            "required": {
                "family": (names,),
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "count": ("INT", {"default": 2, "min": 1, "max": 16}),
            }
        }

    RETURN_TYPES = ("MODEL", "LATENT", "CONDITIONING")
    RETURN_NAMES = ("model", "latents", "positive")
    FUNCTION = "build"
    CATEGORY = "LoRA Lab testkit"

    def build(self, family: str, weight_dtype: str, seed: int, count: int):
        latents, conditioning = make_data(family, count=count, seed=seed)
        return build_model(family, weight_dtype, seed), latents, conditioning


NODE_CLASS_MAPPINGS = {"LoraLabTest_TinyFamily": TinyFamily}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabTest_TinyFamily": "Tiny family model (LoRA Lab tests)"}
