"""Learning rate as a pure function of the optimizer step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, base_lr: float, schedule: str, warmup: int = 0, cycles: int = 1) -> float:
    """Learning rate for 1-based optimizer `step` of a run planned for `total` steps.

    Linear warmup from base_lr/warmup to base_lr over `warmup` steps, then:
    constant; linear decay to 0 at `total`; cosine decay to 0 at `total`; cosine with `cycles`
    hard restarts over the steps after warmup.
    """
    if warmup > 0 and step <= warmup:
        return base_lr * step / warmup
    if schedule == "constant":
        return base_lr
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    raise ValueError(
        f"lr_schedule must be constant, linear, cosine or cosine_with_restarts; got {schedule!r}"
    )
