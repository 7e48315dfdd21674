"""LoRA Lab: train LoRA, LoHa and LoKr adapters inside ComfyUI.

ComfyUI loads this folder as a custom node pack and calls `comfy_entrypoint()`. Importing this module
does nothing else: ComfyUI modules are imported only when the entry point is called.
"""

__version__ = "0.1.0"

# The frontend extension (live training view), served by ComfyUI under /extensions/<folder name>/.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import LoraLabExtension

    return LoraLabExtension()
