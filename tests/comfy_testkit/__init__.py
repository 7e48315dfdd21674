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


class OutOfMemoryAt:
    """A clone of a UNet MODEL whose self-attention raises the allocator's out-of-memory error at its
    ``call``-th run with gradients on (training forwards; sampling and no-grad probes do not count).
    kind "cuda" raises torch.OutOfMemoryError, "cpu" the RuntimeError of PyTorch's CPU allocator. The
    MODEL passed in is not changed (the patch lives in the clone's model options)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "call": ("INT", {"default": 10, "min": 1, "max": 10_000}),
                "kind": (["cuda", "cpu"],),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "LoRA Lab testkit"

    def patch(self, model, call: int, kind: str):
        import torch

        calls = [0]

        def attn1_patch(q, k, v, extra_options):
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == call:
                    if kind == "cuda":
                        raise torch.OutOfMemoryError(
                            "CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test kit)"
                        )
                    raise RuntimeError(
                        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 21474836480 bytes (injected by the test kit)"
                    )
            return q, k, v

        clone = model.clone()
        clone.set_model_attn1_patch(attn1_patch)
        return (clone,)


NODE_CLASS_MAPPINGS = {"LoraLabTest_TinyFamily": TinyFamily, "LoraLabTest_OutOfMemoryAt": OutOfMemoryAt}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraLabTest_TinyFamily": "Tiny family model (LoRA Lab tests)",
    "LoraLabTest_OutOfMemoryAt": "Out of memory at call N (LoRA Lab tests)",
}
