"""OFT (orthogonal fine-tuning, diagonal-block variant): the layer's output channels are rotated in
blocks, W' = R^T W per block of rows, with each block's rotation R = (I + Q)(I - Q)^-1 (Cayley) of a
skew-symmetric Q = B - B^T.

Shapes: blocks ``B [block_num, block_size, block_size]`` with ``block_num · block_size = out``; this is
the ``oft_blocks`` tensor of a file, which ComfyUI's loader and LyCORIS' diag-oft read.

Constraint (COFT): with ``constraint > 0`` the whole Q is scaled down to Frobenius norm ``constraint``
when it is larger, as ComfyUI's loader does with the file's ``alpha``. (LyCORIS multiplies the
file's alpha by the output size first; the two agree when alpha is 0, no constraint.)

B = 0 gives R = I: the layer starts exactly as it was.
"""

from __future__ import annotations

import torch

from .lokr import factorization
from .ops import zeros

__all__ = ["oft_block_size", "oft_init", "oft_rotation", "oft_merge", "oft_rotate_channels"]


def oft_block_size(out_features: int, rank: int) -> int:
    """The block size for a requested ``rank``: the smaller side of ``factorization(out, rank)``, as
    LyCORIS and ComfyUI's own trainer lay OFT out (so LyCORIS' loader rebuilds the same blocks): the
    rank itself where it divides the output size and its square fits in it, else the nearest divisor
    below it and below √out. 320 outputs at rank 16 → 20 blocks of 16; 8 outputs at rank 4 → 4 of 2."""
    return factorization(out_features, rank)[0]


def oft_init(out_features: int, block_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero blocks ``[out / block_size, block_size, block_size]`` in float32: the identity rotation."""
    return zeros((out_features // block_size, block_size, block_size), generator)


def oft_rotation(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R ``[block_num, n, n]`` in float32 from blocks ``[block_num, n, n]``."""
    b = blocks.float()
    q = b - b.transpose(1, 2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        # No data-dependent branch (a GPU sync): scale by min(1, constraint / ‖Q‖).
        q = q * torch.clamp(constraint / norm, max=1.0)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_merge(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """W' ``[out, ...]`` = W + (R - I)^T W per block of rows, in ``weight``'s dtype (as ComfyUI adds it)."""
    num, size, _ = rotation.shape
    eye = torch.eye(size, dtype=rotation.dtype, device=rotation.device)
    diff = torch.einsum(
        "knm,kn...->km...", rotation - eye, weight.to(rotation.dtype).unflatten(0, (num, size))
    )
    return weight + diff.flatten(0, 1).to(weight.dtype)


def oft_rotate_channels(y: torch.Tensor, rotation: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(R - I)^T applied to ``y``'s channels (``channel_dim``), block by block, in ``y.dtype``:
    what the rotation adds to a layer output ``y`` that carries no bias."""
    num, size, _ = rotation.shape
    eye = torch.eye(size, dtype=rotation.dtype, device=rotation.device)
    moved = y.movedim(channel_dim, -1).unflatten(-1, (num, size))
    out = torch.einsum("knm,...kn->...km", (rotation - eye).to(y.dtype), moved)
    return out.flatten(-2).movedim(-1, channel_dim)
