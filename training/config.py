"""Training configuration: one validated dataclass, the single source of names, ranges and options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OPTIMIZER_NAMES = ("AdamW", "Adam", "SGD", "RMSprop")
LOSS_NAMES = ("MSE", "L1", "Huber", "SmoothL1")
DTYPE_NAMES = ("bf16", "fp32")
ALGORITHM_NAMES = ("LoRA", "LoHa", "LoKr")
MAX_SEED = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Ranges match the node's schema; cross-field rules live here."""

    steps: int = 16
    batch_size: int = 1
    grad_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1)
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    seed: int = 0
    training_dtype: str = "bf16"
    lora_dtype: str = "bf16"
    algorithm: str = "LoRA"
    gradient_checkpointing: bool = True
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping

    def __post_init__(self) -> None:
        _int_range("steps", self.steps, 1, 100_000)
        _int_range("batch_size", self.batch_size, 1, 10_000)
        _int_range("grad_accumulation_steps", self.grad_accumulation_steps, 1, 1024)
        _int_range("rank", self.rank, 1, 128)
        _int_range("seed", self.seed, 0, MAX_SEED)
        if not (1e-7 <= self.learning_rate <= 1.0):
            raise ValueError(f"learning_rate must be between 1e-7 and 1.0, got {self.learning_rate!r}")
        if self.alpha is not None and not (self.alpha > 0):
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")
        _option("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _option("loss_function", self.loss_function, LOSS_NAMES)
        _option("training_dtype", self.training_dtype, DTYPE_NAMES)
        _option("lora_dtype", self.lora_dtype, DTYPE_NAMES)
        _option("algorithm", self.algorithm, ALGORITHM_NAMES)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _int_range(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")


def _option(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")
