"""Training configuration: one validated dataclass, the single source of names, ranges and options."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

# The contract's four, then lean optimizers from well-kept libraries where they are installed
# (feature-detected without importing them): pytorch-optimizer (requirements.txt) and bitsandbytes
# (8-bit AdamW, CUDA only; not installed by this pack).
CONTRACT_OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
LIBRARY_OPTIMIZERS = {"Prodigy": "pytorch_optimizer", "Adafactor": "pytorch_optimizer", "CAME": "pytorch_optimizer",
                      "Lion": "pytorch_optimizer", "AdamW8bit": "bitsandbytes"}  # fmt: skip
OPTIMIZER_NAMES = CONTRACT_OPTIMIZERS + tuple(
    name for name, module in LIBRARY_OPTIMIZERS.items() if importlib.util.find_spec(module) is not None
)
LOSS_NAMES = ("MSE", "L1", "Huber", "SmoothL1")
DTYPE_NAMES = ("bf16", "fp32")
ALGORITHM_NAMES = ("LoRA", "LoHa", "LoKr", "OFT", "DoRA")  # lora.ALGORITHMS, in its order (tested)
SCHEDULE_NAMES = ("constant", "linear", "cosine", "cosine_with_restarts")
TARGET_PRESETS = ("all", "attention", "attention_mlp")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
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
    max_grad_norm: float = 1.0  # 0: no clipping
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_cycles: int = 1  # restarts of cosine_with_restarts
    targets: str = "all"  # preset of layers to train (see lora.inject.TARGET_PATTERNS)
    include: tuple[str, ...] = ()  # extra glob patterns on module paths; when given, replace the preset
    exclude: tuple[str, ...] = ()
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0  # extra shift of sampled noise levels for flow models (1 = none)
    min_snr_gamma: float = 0.0  # 0: off; eps / v models only
    noise_offset: float = 0.0
    save_every: int = 0  # optimizer steps between checkpoints; 0: none
    keep_checkpoints: int = 3  # newest checkpoints of a run kept on disk; older ones are deleted; 0: all

    def __post_init__(self) -> None:
        # NaN passes every comparison below (and ComfyUI's min / max checks): refuse it, and inf, first.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, got {value!r}; set it to a normal value")
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
        _int_range("warmup_steps", self.warmup_steps, 0, 100_000)
        _int_range("lr_cycles", self.lr_cycles, 1, 1000)
        _int_range("save_every", self.save_every, 0, 100_000)
        _int_range("keep_checkpoints", self.keep_checkpoints, 0, 100_000)
        if not (self.logit_std > 0):
            raise ValueError(f"logit_std must be positive, got {self.logit_std!r}")
        if not (self.flow_shift > 0):
            raise ValueError(f"flow_shift must be positive (1 = no shift), got {self.flow_shift!r}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0 (0 turns it off), got {self.min_snr_gamma!r}")
        if not (0 <= self.noise_offset <= 1):
            raise ValueError(f"noise_offset must be between 0 and 1, got {self.noise_offset!r}")
        _option("lr_schedule", self.lr_schedule, SCHEDULE_NAMES)
        _option("targets", self.targets, TARGET_PRESETS)
        _option("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
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
