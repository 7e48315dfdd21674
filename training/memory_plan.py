"""The memory a training run will add, estimated before its first step, and what would make it fit.

What training adds on top of the loaded model:
  trainable   adapter parameters (fp32 master weights)
  gradients   one fp32 gradient per trainable value
  optimizer   the optimizer's state (values per trainable value: AdamW 2, SGD / RMSprop / Lion 1, ...)
  activations what autograd keeps for backward, measured by one probe forward of the run's largest
              latent (2 copies where batch_size > 1), in which every saved tensor is counted and
              dropped at once (so the probe holds none of them), then scaled to batch_size. Without
              gradient checkpointing: all of it; with checkpointing: what lies outside the repeated
              blocks, each block's input (what checkpointing keeps) and the largest block (its
              recomputation in backward). Checked against measured peaks by benchmarks/memory_plan.py.

Nothing here knows ComfyUI: the caller gives the probe's forward and the model's repeated blocks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# Optimizer state per trainable value, in fp32 values, where it is not counted (optimizer_state_values):
# pytorch-optimizer's Adafactor and CAME keep a first moment plus factored (row + column) second
# moments, 1.06-2.6 depending on the shapes; AdamW8bit two 8-bit moments.
OPTIMIZER_STATE = {"AdamW": 2.0, "Adam": 2.0, "SGD": 1.0, "RMSprop": 1.0, "Prodigy": 4.0, "Adafactor": 1.1,
                   "CAME": 1.2, "Lion": 1.0, "AdamW8bit": 0.5}  # fmt: skip

MIB = 2**20


@dataclass
class ActivationProfile:
    """What autograd keeps for backward in one forward of a batch of `samples`, in bytes. Probe with 2
    samples where the run's batch is larger: at batch 1 some reshapes are free views that copy at
    larger batches (measured on a conv / linear toy: 274 KiB at 1, 745 at 2, 1491 at 4)."""

    total: int
    blocks: list[int] = field(default_factory=list)  # each repeated block's share of total
    block_inputs: list[int] = field(default_factory=list)  # each block's input: what checkpointing keeps
    samples: int = 1

    def for_run(self, batch: int, checkpointing: bool) -> int:
        largest = max(self.blocks, default=0)
        if not checkpointing or not self.blocks:
            return batch * self.total // self.samples
        outside = max(self.total - sum(self.blocks), 0)
        return batch * (outside + sum(self.block_inputs) + largest) // self.samples


@dataclass
class MemoryPlan:
    """Bytes: the loaded model's weights, and what training adds (the rest)."""

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def added(self) -> int:
        return self.trainable + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        return self.weights + self.added

    def describe(self) -> str:
        return (f"~{self.added / MIB:.0f} MiB on top of the model's {self.weights / MIB:.0f} MiB: activations "
                f"{self.activations / MIB:.0f}, adapters {self.trainable / MIB:.1f} + gradients {self.gradients / MIB:.1f} "
                f"+ optimizer state {self.optimizer / MIB:.1f} MiB")  # fmt: skip

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "trainable": self.trainable, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations, "added": self.added}  # fmt: skip


def optimizer_state_values(name: str, shapes: Iterable[Sequence[int]]) -> int | None:
    """fp32 values the optimizer keeps for parameters of these shapes, counted: one step on one zero
    parameter of each distinct shape (on CPU, a few per run: LoRA factors repeat their shapes).
    None where it cannot be counted on CPU (AdamW8bit) or the optimizer refuses (the factor table
    then stands in)."""
    if name == "AdamW8bit":
        return None
    from .factory import make_optimizer

    counts: dict[tuple[int, ...], int] = {}
    for shape in shapes:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    total = 0
    try:
        for shape, n in counts.items():
            param = torch.nn.Parameter(torch.zeros(shape))
            param.grad = torch.full(shape, 1e-3)
            opt = make_optimizer(name, [param], 1e-3)
            opt.step()
            total += n * sum(
                v.numel() for v in opt.state[param].values() if torch.is_tensor(v) and v.numel() > 1
            )
    except Exception:
        return None
    return total


def plan(
    weights: int, trainable_values: int, optimizer: str, profile: ActivationProfile, batch: int, checkpointing: bool,
    optimizer_values: int | None = None,
) -> MemoryPlan:  # fmt: skip
    """The plan for one set of settings (trainable_values: number of adapter parameters;
    optimizer_values: the optimizer's state as counted by optimizer_state_values, else the table's)."""
    trainable = 4 * trainable_values
    state = (
        4 * optimizer_values
        if optimizer_values is not None
        else int(OPTIMIZER_STATE.get(optimizer, 2.0) * trainable)
    )
    return MemoryPlan(
        weights=weights, trainable=trainable, gradients=trainable, optimizer=state,
        activations=profile.for_run(batch, checkpointing),
    )  # fmt: skip


def offloaded_weights(block_weights: Sequence[int]) -> int:
    """Device bytes offloading these blocks frees during a checkpointed run: all of them but the largest,
    which is back on the device while it is recomputed and differentiated."""
    return sum(block_weights) - max(block_weights, default=0)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def profile_activations(forward: Callable[[], object], blocks: Sequence[nn.Module], skip: Iterable[torch.Tensor] = (),
                        samples: int = 1) -> ActivationProfile:  # fmt: skip
    """Run forward() once with gradients on and count what autograd saves for backward, each storage
    once, leaving out the storages of `skip` (the weights, which are there anyway). Saved tensors are
    dropped as they are counted, so the probe never holds them; the graph it builds cannot be
    differentiated. Bytes saved while a block of `blocks` runs are that block's."""
    skipped = {t.untyped_storage().data_ptr() for t in skip}
    # storage address -> the tensor that owns it (a view's base), weakly: while that tensor lives the
    # storage does, and a tensor saved later at the same address shares it; once it is gone the address
    # may hold a new storage (the probe drops what it counts, so the allocator reuses addresses)
    owners: dict[int, weakref.ref] = {}
    counted = [0]
    per_block = [0] * len(blocks)
    inputs = [0] * len(blocks)
    starts: dict[int, int] = {}
    entered: set[int] = set()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        owner = owners.get(ptr)
        if ptr not in skipped and (owner is None or owner() is None):
            base = t._base if t._base is not None else t
            owners[ptr] = weakref.ref(base)
            counted[0] += storage.nbytes()
        return None

    def unpack(_):
        raise RuntimeError("the memory probe's forward cannot be differentiated")

    def enter(i):
        def hook(module, args):
            starts[i] = counted[0]
            first = next((a for a in args if torch.is_tensor(a)), None)
            if first is not None and i not in entered:
                inputs[i] = first.untyped_storage().nbytes()
            entered.add(i)

        return hook

    def leave(i):
        def hook(module, args, output):
            per_block[i] += counted[0] - starts.pop(i, counted[0])

        return hook

    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(enter(i)))
            handles.append(block.register_forward_hook(leave(i)))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = forward()
        del out
    finally:
        for h in handles:
            h.remove()
    return ActivationProfile(counted[0], per_block, inputs, samples)


@dataclass
class Fit:
    """Whether the plan fits the memory at hand, and settings that would."""

    plan: MemoryPlan
    available: int  # bytes the run may add
    where: str  # "cuda" / "cpu", for the message
    alternatives: list[tuple[str, MemoryPlan]] = field(default_factory=list)
    offload_needed: int = (
        0  # the fewest blocks to offload for the run to fit (0: none would do, or none needed)
    )

    @property
    def fits(self) -> bool:
        return self.plan.added <= self.available


def check_fit(
    weights: int, trainable_values: int, optimizer: str, profile: ActivationProfile, batch: int, checkpointing: bool,
    available: int, where: str, fp8_savings: int = 0, training_dtype: str = "bf16", optimizer_values: int | None = None,
    block_weights: Sequence[int] = (),
) -> Fit:  # fmt: skip
    """The plan for the run's settings against `available` bytes, and the changes that would fit, cheapest
    first: gradient checkpointing on, a smaller batch, bf16 instead of fp32 activations (about half),
    an fp8 base (fp8_savings: bytes its weights would free on this device), offloading the first N
    repeated blocks (block_weights: the device bytes each block's weights take, in order; empty where
    offloading frees nothing, on a CPU). Offloading frees weights only with checkpointing on, and the
    largest offloaded block is on the device again while it is recomputed (offloaded_weights)."""

    def make(b: int = batch, ckpt: bool = checkpointing) -> MemoryPlan:
        return plan(weights, trainable_values, optimizer, profile, b, ckpt, optimizer_values)

    fit = Fit(make(), available, where)
    if fit.fits:
        return fit
    candidates: list[tuple[str, MemoryPlan, int]] = []  # (change, its plan, memory it frees besides)
    if not checkpointing:
        candidates.append(("turn gradient_checkpointing on", make(ckpt=True), 0))
    for smaller in range(batch - 1, 0, -1):
        if make(smaller).added <= available:
            candidates.append((f"batch_size {smaller} (raise grad_accumulation_steps to keep the effective batch)",
                               make(smaller), 0))  # fmt: skip
            break
    if training_dtype == "fp32":
        halved = make()
        halved.activations //= 2
        candidates.append(("training_dtype bf16", halved, 0))
    if fp8_savings > 0:
        candidates.append(
            ("an fp8 base (Load Diffusion Model, weight_dtype fp8_e4m3fn)", make(), fp8_savings)
        )
    if block_weights and checkpointing:
        short = fit.plan.added - available
        for n in range(1, len(block_weights) + 1):
            freed = offloaded_weights(block_weights[:n])
            if freed >= short:
                fit.offload_needed = n
                candidates.append(
                    (f"offload_blocks {n} (Training Options; -1 picks it by itself)", make(), freed)
                )
                break
    fit.alternatives = [(what, p) for what, p, freed in candidates if p.added <= available + freed]
    return fit
