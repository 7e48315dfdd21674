"""``nn.Module`` adapters: own the parameters, call ``lora.functional`` for the math."""

from .base import ALPHA_KEY, AdapterModule
from .dora import DoRAModule
from .loha import LoHaModule
from .lokr import LoKrModule
from .lora import LoRAModule
from .oft import OFTModule

__all__ = ["ALPHA_KEY", "AdapterModule", "DoRAModule", "LoHaModule", "LoKrModule", "LoRAModule", "OFTModule"]
