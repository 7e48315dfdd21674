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

from .autograd_safe import autograd_safe


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
            del b.forward


def _checkpointed(block: nn.Module, forward, last: _LastBlock, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    last.called(block)
    if last.block is block:
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(_autograd_safe_call, forward, *args, use_reentrant=False, **kwargs)


def _autograd_safe_call(forward, *args, **kwargs):
    """The block's forward with augmented assignments out-of-place (see training/autograd_safe.py):
    recomputation in backward runs outside the training loop's own mode (and on CUDA in another
    thread), and a block that updated its input in place would recompute from the updated values."""
    with autograd_safe():
        return forward(*args, **kwargs)
