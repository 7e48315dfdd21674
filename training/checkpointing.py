"""Gradient checkpointing of a model's repeated blocks, applied and removed around training.

Activations inside a checkpointed block are not kept for backward; they are recomputed. The blocks
are the elements of the outermost nn.ModuleLists (MMDiT joint_blocks, UNet input/output_blocks,
Flux double/single_blocks, ...), the granularity at which recomputation costs ~one extra forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch.utils.checkpoint
from torch import nn


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


@contextlib.contextmanager
def gradient_checkpointing(root: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, each repeated block's forward runs under torch.utils.checkpoint.
    Yields the number of checkpointed blocks; the original forwards are restored on exit."""
    if not enabled:
        yield 0
        return
    blocks = repeated_blocks(root)
    patched = []
    try:
        for b in blocks:
            if "forward" in b.__dict__:  # already patched by someone else: leave it alone
                continue
            b.forward = functools.partial(_checkpointed, b.__class__.forward.__get__(b))
            patched.append(b)
        yield len(patched)
    finally:
        for b in patched:
            del b.forward


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
