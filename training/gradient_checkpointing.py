"""Gradient checkpointing of a model's repeated blocks, applied and removed around training.

Activations inside a checkpointed block are not kept for backward; they are recomputed. The blocks
are the elements of the outermost nn.ModuleLists (MMDiT joint_blocks, UNet input/output_blocks,
Flux double/single_blocks, ...), the granularity at which recomputation costs ~one extra forward.

The block that runs last in a forward pass is the exception once the first pass has shown which one
it is: backward begins by recomputing exactly that block, so keeping its activations from the
forward pass instead holds the same memory at the same moment, and saves recomputing it (a quarter
of the recomputation on a 4-block MMDiT).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from .autograd_safe import InPlaceWatch, autograd_safe


def repeated_blocks(root: nn.Module) -> list[nn.Module]:
    """Elements of the outermost ModuleLists under root (not descending into found blocks).

    An element that is an nn.Sequential is opened up into its children: callers may iterate a
    Sequential instead of calling it (ComfyUI's UNet runs TimestepEmbedSequential layer by layer),
    and a patched forward on the container would then never run."""
    blocks: list[nn.Module] = []

    def take(m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            for child in m.children():
                take(child)
        else:
            blocks.append(m)

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                for element in child:
                    take(element)
            else:
                visit(child)

    visit(root)
    return blocks


class _LastBlock:
    """Learns from the first forward pass with grad which block runs last: the pass is over when its
    first block is called again. A pass that calls some other block twice leaves it undecided (and
    every block checkpointed)."""

    def __init__(self) -> None:
        self.order: list[nn.Module] = []
        self.block: nn.Module | None = None
        self.decided = False

    def called(self, block: nn.Module) -> None:
        if self.decided:
            return
        if not any(b is block for b in self.order):
            self.order.append(block)
            return
        self.decided = True
        if block is self.order[0]:
            self.block = self.order[-1]


@contextlib.contextmanager
def gradient_checkpointing(root: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, each repeated block's forward runs under torch.utils.checkpoint (except the
    last-running one, see the module doc). Yields the number of patched blocks; the original forwards
    are restored on exit."""
    if not enabled:
        yield 0
        return
    blocks = repeated_blocks(root)
    last = _LastBlock()
    patched = []
    try:
        for b in blocks:
            if "forward" in b.__dict__:  # already patched by someone else: leave it alone
                continue
            b.forward = functools.partial(_checkpointed, b, b.__class__.forward.__get__(b), last)
            patched.append(b)
        yield len(patched)
    finally:
        for b in patched:
            b.__dict__.pop("forward", None)


def _checkpointed(block: nn.Module, forward, last: _LastBlock, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    first_pass = not last.decided
    last.called(block)
    if last.block is block:
        return forward(*args, **kwargs)
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    versions = [a._version for a in inputs]
    run = _probed_call if first_pass else _autograd_safe_call
    out = torch.utils.checkpoint.checkpoint(run, forward, *args, use_reentrant=False, **kwargs)
    if any(a._version != v for a, v in zip(inputs, versions, strict=True)):
        raise InPlaceError(type(block).__name__, "change their input in place")
    return out


def _autograd_safe_call(forward, *args, **kwargs):
    """The block's forward with augmented assignments out-of-place (see training/autograd_safe.py):
    recomputation in backward runs outside the training loop's own mode (and on CUDA in another
    thread), and a block that updated its input in place would recompute from the updated values."""
    with autograd_safe():
        return forward(*args, **kwargs)


def _probed_call(forward, *args, **kwargs):
    """_autograd_safe_call, watched for explicit in-place writes (``x.addcmul_(...)``, ``x[i] = ...``)
    to a tensor an earlier op of the block already used: that op may have kept it for backward, and a
    recomputation would then see the written values. Only the first pass with grad is watched (the
    model code is the same on every pass); the watch costs a Python call per op."""
    with InPlaceWatch() as watch:
        out = _autograd_safe_call(forward, *args, **kwargs)
    if watch.found:
        raise InPlaceError(_block_name(forward), f"write into a tensor they already used ({watch.found})")
    return out


class InPlaceError(RuntimeError):
    """A checkpointed block writes in place into a tensor it already used, so recomputing it in
    backward would give wrong gradients (silently: recomputed values are not version-checked)."""

    def __init__(self, block: str, what: str):
        super().__init__(
            f"gradient_checkpointing: the {block} blocks of this model {what}, an explicit in-place operation "
            "in the model code that recomputation in backward cannot repeat exactly; set gradient_checkpointing "
            "off to train this model on this ComfyUI release"
        )


def _block_name(forward) -> str:
    owner = getattr(forward, "__self__", None)
    return type(owner).__name__ if owner is not None else "repeated"
