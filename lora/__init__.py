"""LoRA / LoHa / LoKr / OFT / DoRA adapters for Linear and Conv1d/2d/3d layers, in plain PyTorch.

Layout: ``lora.functional`` holds the pure math per algorithm; ``lora.modules`` the ``nn.Module``s that own
parameters and call it; ``ALGORITHMS`` / ``get_algorithm`` / ``detect_algorithm`` map names and file keys
to classes. Nothing here imports ComfyUI; the file format is the one stock ComfyUI's LoRA loader reads.
"""

from . import functional
from .functional.lokr import factorization
from .modules import ALPHA_KEY, AdapterModule, DoRAModule, LoHaModule, LoKrModule, LoRAModule, OFTModule
from .registry import ALGORITHMS, detect_algorithm, get_algorithm
from .spec import ConvSpec, layer_spec

__all__ = [
    "ALGORITHMS",
    "ALPHA_KEY",
    "AdapterModule",
    "ConvSpec",
    "DoRAModule",
    "LoHaModule",
    "LoKrModule",
    "LoRAModule",
    "OFTModule",
    "detect_algorithm",
    "factorization",
    "functional",
    "get_algorithm",
    "layer_spec",
]
