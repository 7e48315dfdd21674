"""The training loop. Reads top to bottom in a fixed order per optimizer step:
learning rate -> micro-steps (loss / accumulation, backward) -> finite check + clip -> step -> zero_grad -> report.

It takes the model call, the data and the callbacks as arguments and knows nothing of ComfyUI.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .config import TrainConfig
from .data import BatchOrder, Sample, collate, mix_seed
from .factory import make_loss, make_optimizer
from .objective import Objective, denoise_loss
from .schedule import lr_at

PredictX0 = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def derive_seed(seed: int, stream: str) -> int:
    """Independent 64-bit seeds per purpose ("init", "data", ...) from the one user seed."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class StepInfo:
    step: int  # 1-based optimizer step
    total: int
    loss: float  # mean loss over the step's micro-batches
    lr: float
    elapsed: float  # seconds since the first step started

    @property
    def steps_per_s(self) -> float:
        return self.step / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step

    @property
    def steps(self) -> int:
        return len(self.losses)


class TrainingDiverged(FloatingPointError):
    """Loss or gradients became non-finite; parameters were left at their last finite values."""


class TrainingOutOfMemory(torch.OutOfMemoryError):
    """Memory ran out during an optimizer step. The step's gradients are dropped; the parameters are
    those after the last completed step. A torch.OutOfMemoryError, so callers that free memory on one
    (ComfyUI unloads its models) do so."""

    def __init__(self, message: str, step: int, total: int, detail: str = ""):
        super().__init__(message)
        self.step, self.total, self.detail = step, total, detail


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA / MPS / XPU allocators raise torch.OutOfMemoryError; the CPU allocator a RuntimeError
    ("DefaultCPUAllocator: can't allocate memory"), Python a MemoryError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class ResumeState:
    """Where a stopped run was: optimizer steps done, the run's planned total, optimizer state."""

    step: int
    total_steps: int
    optimizer_state: dict | None = None


def run_training(
    *,
    params: Sequence[torch.nn.Parameter],
    samples: Sequence[Sample],
    predict_x0: PredictX0,
    objective: Objective,
    config: TrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    resume: ResumeState | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_checkpoint: Callable[[int, int, torch.optim.Optimizer, float], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `params` for config.steps optimizer steps on the denoising objective.

    predict_x0(x_t [B,C,...], sigma [B], cond) -> x0 estimate; samples hold latents in model space.
    Batch order, noise levels and noise are pure functions of (seed, global micro-batch number) and
    the learning rate of (step, planned total), so a run resumed from `resume` (optimizer state
    restored) continues exactly as if it had never stopped. on_checkpoint(step, total, optimizer, loss) is
    called every config.save_every steps. Raises TrainingDiverged (naming learning_rate) before a
    non-finite update is applied.
    """
    _require_samples(samples)
    params = list(params)
    optimizer = make_optimizer(config.optimizer, params, config.learning_rate, config.weight_decay)
    start = resume.step if resume else 0
    total = resume.total_steps if resume else config.steps
    if resume and resume.optimizer_state is not None:
        optimizer.load_state_dict(resume.optimizer_state)
    loss_fn = make_loss(config.loss_function)
    order = BatchOrder(samples, config.batch_size, derive_seed(config.seed, "order"))
    noise_seed = derive_seed(config.seed, "noise")
    accum = config.grad_accumulation_steps
    clip = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    result = TrainResult()
    t0 = time.perf_counter()

    for step in range(start + 1, start + config.steps + 1):
        lr = lr_at(
            step, total, config.learning_rate, config.lr_schedule, config.warmup_steps, config.lr_cycles
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        out_of_memory = ""
        try:
            step_loss, grad_norm = _accumulate(step, accum, samples, order, noise_seed, objective, loss_fn,
                                               predict_x0, device, autocast_dtype, params, clip, check_interrupt)  # fmt: skip
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if out_of_memory:  # raised here, outside the handler: its traceback (and the step's tensors) is gone
            optimizer.zero_grad(set_to_none=True)
            raise TrainingOutOfMemory(f"out of memory at step {step} of {total}", step, total, out_of_memory)
        if not math.isfinite(step_loss) or not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"training diverged at step {step} (loss={step_loss}, grad norm={float(grad_norm)}): "
                f"lower learning_rate (now {config.learning_rate:g})"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        result.losses.append(step_loss)
        if on_step is not None:
            on_step(StepInfo(step - start, config.steps, step_loss, lr, time.perf_counter() - t0))
        if on_checkpoint is not None and config.save_every and step % config.save_every == 0:
            on_checkpoint(step, total, optimizer, step_loss)
    return result


def _accumulate(step, accum, samples, order, noise_seed, objective, loss_fn, predict_x0, device, autocast_dtype,
                params, clip, check_interrupt) -> tuple[float, torch.Tensor]:  # fmt: skip
    """One optimizer step's micro-batches: forward, backward (loss / accum), then the gradient norm
    clipped to clip. Returns (mean loss, gradient norm before clipping)."""
    step_loss = 0.0
    for k in range(accum):
        if check_interrupt is not None:
            check_interrupt()
        micro = (step - 1) * accum + k
        gen = torch.Generator().manual_seed(mix_seed(noise_seed, micro))
        indices = order(micro)
        x0, cond = collate(samples, indices, device)
        sigma = objective.sample_sigmas(len(indices), gen)
        noise = objective.sample_noise(x0.shape, gen).to(device=device, dtype=x0.dtype)
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            loss = denoise_loss(
                lambda xt, s, c=cond: predict_x0(xt, s, c), objective, loss_fn, x0, noise, sigma
            )
        (loss / accum).backward()
        step_loss += loss.item() / accum
    return step_loss, torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)


@torch.no_grad()
def evaluate_denoise_loss(
    predict_x0: PredictX0,
    objective: Objective,
    samples: Sequence[Sample],
    device: torch.device,
    seed: int = 0,
    levels: int = 8,
) -> float:
    """Mean MSE (target space) over every sample at `levels` evenly spaced noise levels with fixed
    noise: the same number for the same model, so before/after comparisons are fair."""
    _require_samples(samples)
    percents = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    sigmas = objective.sigmas_from_percents(percents)
    gen = torch.Generator().manual_seed(derive_seed(seed, "eval"))
    mse = make_loss("MSE")
    total = 0.0
    for i in range(len(samples)):
        x0, cond = collate(samples, [i], device)
        for s in sigmas:
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(
                device=device, dtype=x0.dtype
            )
            total += denoise_loss(
                lambda xt, sg, c=cond: predict_x0(xt, sg, c), objective, mse, x0, noise, s.view(1)
            ).item()
    return total / (len(samples) * levels)


def _require_samples(samples: Sequence[Sample]) -> None:
    if not samples:
        raise ValueError("latents is empty: give at least one latent image")
