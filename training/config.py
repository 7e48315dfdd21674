"""Training configuration: the option table (name, kind, default, range, tooltip of every setting),
and the validated dataclass built from it. The trainer's and the options node's schemas, the checks
here and the test graphs all derive from OPTIONS."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

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
class Option:
    """One setting: its widget on a node and its check here.

    kind: "int", "float", "bool", "combo" (one of ``choices``) or "string". node: "train" (the
    trainer's widgets, the contract's) or "options" (Training Options). ``lo`` / ``hi``: the inclusive
    range (a float ``lo`` with ``above=True`` is exclusive). ``none_at``: the widget value that means
    None in the config (alpha 0: alpha = rank). ``config``: False for a node setting that is not part
    of TrainConfig (checkpoint_prefix)."""

    name: str
    kind: str
    default: Any
    node: str
    tooltip: str
    lo: float | None = None
    hi: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    above: bool = False
    none_at: Any = None
    config: bool = True

    @property
    def widget_default(self) -> Any:
        """The default as the node shows it (``none_at`` for a None default, patterns comma-separated)."""
        if self.default is None and self.none_at is not None:
            return self.none_at
        return ", ".join(self.default) if isinstance(self.default, tuple) else self.default

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` naming the option unless ``value`` is one it takes."""
        name = self.name
        if value is None and self.none_at is not None:
            return
        if self.kind == "combo":
            if value not in self.choices:
                raise ValueError(f"{name} must be one of {', '.join(self.choices)}; got {value!r}")
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not (self.lo <= value <= self.hi):
                raise ValueError(f"{name} must be between {self.lo} and {self.hi}, got {value}")
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            # NaN passes every comparison (and ComfyUI's min / max checks): refuse it, and inf, first.
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}; set it to a normal value")
            low_ok = value > self.lo if self.above else value >= self.lo
            if not (low_ok and value <= self.hi):
                low = f"above {self.lo:g}" if self.above else f"at least {self.lo:g}"
                raise ValueError(f"{name} must be {low} and at most {self.hi:g}, got {value!r}")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")


_OPTIMIZER_TIP = (
    "Optimizer. AdamW, Adam, SGD (momentum 0.9), RMSprop: PyTorch's. Prodigy (finds its own step size: "
    "set learning_rate to 1.0), Adafactor (factored second moments: least optimizer memory), CAME, Lion "
    "(one moment: half of AdamW's state): pytorch-optimizer's. AdamW8bit: bitsandbytes', CUDA only, "
    "listed where it is installed. Each one's state is checkpointed and resumes exactly."
)
_ALGORITHM_TIP = (
    "Adapter algorithm. LoRA (LoCon on convolutions), LoHa and LoKr add a learned ΔW; OFT rotates each "
    "layer's outputs in blocks (keeps the weights' norms: slow to overfit); DoRA is LoRA with a learned "
    "magnitude per input column (weight-decomposed). All five apply with ComfyUI's own LoRA loaders."
)
_KEEP_TIP = (
    "Checkpoints of this run kept on disk: after each new one, the oldest beyond this number (its LoRA file and "
    ".lorastate) is deleted. Files of other runs are never touched; 0 = keep all."
)

_OFFLOAD_TIP = (
    "Keep the frozen weights of the first N repeated blocks in CPU memory; each layer's weights come "
    "to the GPU as it runs (ComfyUI's low-VRAM casting). Less VRAM, slower steps; it needs "
    "gradient_checkpointing to save anything. -1 = auto: as many as the memory plan needs (none when "
    "the run fits); 0 = off. On a CPU-only machine it changes nothing but the code path."
)

#: Every setting, in widget order per node (saved UI workflows list widget values by position: new
#: ones go at the end of their node).
OPTIONS: tuple[Option, ...] = (
    Option("batch_size", "int", 1, "train", "Images per micro-batch (images of one size are batched together).", 1, 10_000),
    Option("grad_accumulation_steps", "int", 1, "train", "Micro-batches whose gradients are summed into one optimizer step.", 1, 1024),
    Option("steps", "int", 16, "train", "Optimizer steps to train.", 1, 100_000),
    Option("learning_rate", "float", 0.0005, "train", "Learning rate of the optimizer.", 1e-7, 1.0, step=1e-7),
    Option("rank", "int", 8, "train", "Rank of the adapter (capacity; alpha = rank, so scale 1). OFT: the size of its rotation blocks.", 1, 128),
    Option("optimizer", "combo", "AdamW", "train", _OPTIMIZER_TIP, choices=OPTIMIZER_NAMES),
    Option("loss_function", "combo", "MSE", "train", "Distance between prediction and target, in the model family's target space.", choices=LOSS_NAMES),
    Option("seed", "int", 0, "train", "One seed for adapter initialisation, batch order, noise levels and noise.", 0, MAX_SEED),
    Option("training_dtype", "combo", "bf16", "train", "Compute dtype of the forward and backward pass: bf16 where the device supports it, else fp32.", choices=DTYPE_NAMES),
    Option("lora_dtype", "combo", "bf16", "train", "Dtype of the returned and saved adapter weights (training keeps fp32 master weights).", choices=DTYPE_NAMES),
    Option("algorithm", "combo", "LoRA", "train", _ALGORITHM_TIP, choices=ALGORITHM_NAMES),
    Option("gradient_checkpointing", "bool", True, "train", "Recompute block activations in backward: less memory, more compute (measured in BENCHMARKS.md)."),
    Option("lr_schedule", "combo", "constant", "options", "Learning-rate schedule over the run's steps.", choices=SCHEDULE_NAMES),
    Option("warmup_steps", "int", 0, "options", "Linear warm-up steps before the schedule.", 0, 100_000),
    Option("lr_cycles", "int", 1, "options", "Restarts of cosine_with_restarts.", 1, 1000),
    Option("weight_decay", "float", 0.0, "options", "Decoupled weight decay (AdamW) / L2 (others).", 0.0, 1.0, step=0.0001),
    Option("max_grad_norm", "float", 1.0, "options", "Clip the gradient norm; 0 turns clipping off.", 0.0, 1000.0, step=0.01),
    Option("alpha", "float", None, "options", "LoRA alpha (scale = alpha / rank); 0 means alpha = rank. OFT: the constraint, a cap on the size of the rotation (0: none).",
           0.0, 1024.0, step=0.5, above=True, none_at=0.0),
    Option("targets", "combo", "all", "options", "Layers that get adapters: all Linear/Conv, attention only, or attention + MLP. Norms and biases are never trained.", choices=TARGET_PRESETS),
    Option("include", "string", (), "options", "Comma-separated glob patterns on module paths (e.g. *joint_blocks.1*); when set they replace the preset."),
    Option("exclude", "string", (), "options", "Comma-separated glob patterns of module paths to leave out."),
    Option("timestep_sampling", "combo", "uniform", "options", "How noise levels are drawn over the model's schedule.", choices=TIMESTEP_SAMPLINGS),
    Option("logit_mean", "float", 0.0, "options", "logit_normal: mean.", -5.0, 5.0, step=0.1),
    Option("logit_std", "float", 1.0, "options", "logit_normal: standard deviation.", 0.01, 5.0, step=0.1),
    Option("flow_shift", "float", 1.0, "options", "Flow models: extra shift of the noise levels (1 = none; >1 = noisier).", 0.01, 100.0, step=0.1),
    Option("min_snr_gamma", "float", 0.0, "options", "Min-SNR-gamma loss weighting for eps / v models; 0 = off (5 is common).", 0.0, 100.0, step=0.5),
    Option("noise_offset", "float", 0.0, "options", "Offset noise strength (helps very dark / bright images); 0 = off.", 0.0, 1.0, step=0.01),
    Option("save_every", "int", 0, "options", "Save a checkpoint (LoRA + exact-resume state) every N steps; 0 = never.", 0, 100_000),
    Option("checkpoint_prefix", "string", "loralab/checkpoints/lora", "options", "File-name prefix of checkpoints, inside the loras folder.", config=False),
    Option("keep_checkpoints", "int", 3, "options", _KEEP_TIP, 0, 100_000),
    Option("offload_blocks", "int", -1, "options", _OFFLOAD_TIP, -1, 10_000),
)  # fmt: skip
OPTION = {option.name: option for option in OPTIONS}


def node_options(node: str) -> tuple[Option, ...]:
    """The table's settings of one node ("train" or "options"), in widget order."""
    return tuple(option for option in OPTIONS if option.node == node)


def _field(name: str) -> Any:
    return dataclasses.field(default=OPTION[name].default)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run: the config options of OPTIONS (their defaults, and
    their ranges checked on construction); cross-field rules live here too."""

    steps: int = _field("steps")
    batch_size: int = _field("batch_size")
    grad_accumulation_steps: int = _field("grad_accumulation_steps")
    learning_rate: float = _field("learning_rate")
    rank: int = _field("rank")
    alpha: float | None = _field("alpha")  # None: the algorithm's default (rank: scale 1; OFT: no constraint)
    optimizer: str = _field("optimizer")
    loss_function: str = _field("loss_function")
    seed: int = _field("seed")
    training_dtype: str = _field("training_dtype")
    lora_dtype: str = _field("lora_dtype")
    algorithm: str = _field("algorithm")
    gradient_checkpointing: bool = _field("gradient_checkpointing")
    weight_decay: float = _field("weight_decay")
    max_grad_norm: float = _field("max_grad_norm")  # 0: no clipping
    lr_schedule: str = _field("lr_schedule")
    warmup_steps: int = _field("warmup_steps")
    lr_cycles: int = _field("lr_cycles")  # restarts of cosine_with_restarts
    targets: str = _field("targets")  # preset of layers to train (see lora.inject.TARGET_PATTERNS)
    include: tuple[str, ...] = _field(
        "include"
    )  # extra glob patterns on module paths; when given, replace the preset
    exclude: tuple[str, ...] = _field("exclude")
    timestep_sampling: str = _field("timestep_sampling")
    logit_mean: float = _field("logit_mean")
    logit_std: float = _field("logit_std")
    flow_shift: float = _field("flow_shift")  # extra shift of sampled noise levels for flow models (1 = none)
    min_snr_gamma: float = _field("min_snr_gamma")  # 0: off; eps / v models only
    noise_offset: float = _field("noise_offset")
    save_every: int = _field("save_every")  # optimizer steps between checkpoints; 0: none
    keep_checkpoints: int = _field("keep_checkpoints")  # newest checkpoints of a run kept on disk; 0: all
    offload_blocks: int = _field(
        "offload_blocks"
    )  # repeated blocks whose weights stay in CPU memory; -1: auto

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            option = OPTION[field.name]
            value = getattr(self, field.name)
            if option.kind == "string":
                if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
                    raise ValueError(f"{field.name} must be a tuple of glob patterns, got {value!r}")
            else:
                option.check(value)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
