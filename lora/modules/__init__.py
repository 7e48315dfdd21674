"""``nn.Module`` adapters: own the parameters, call ``lora.functional`` for the math."""

from .base import ALPHA_KEY, AdapterModule
from .loha import LoHaModule
from .lokr import LoKrModule
from .lora import LoRAModule

__all__ = ["ALPHA_KEY", "AdapterModule", "LoHaModule", "LoKrModule", "LoRAModule"]
