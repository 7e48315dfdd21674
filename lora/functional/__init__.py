"""Pure, stateless math of each algorithm: initial parameters, ΔW and bypass output.

Nothing here owns parameters; ``lora.modules`` wraps these functions in ``nn.Module``s.
"""

from .loha import loha_delta_weight, loha_init, loha_max_rank
from .lokr import (
    LoKrLayout,
    factorization,
    lokr_delta_weight,
    lokr_full_w1,
    lokr_full_w2,
    lokr_init,
    lokr_layout,
    lokr_linear_forward,
)
from .lora import lora_delta_weight, lora_forward, lora_init, lora_max_rank
from .ops import apply_weight

__all__ = [
    "LoKrLayout",
    "apply_weight",
    "factorization",
    "loha_delta_weight",
    "loha_init",
    "loha_max_rank",
    "lokr_delta_weight",
    "lokr_full_w1",
    "lokr_full_w2",
    "lokr_init",
    "lokr_layout",
    "lokr_linear_forward",
    "lora_delta_weight",
    "lora_forward",
    "lora_init",
    "lora_max_rank",
]
