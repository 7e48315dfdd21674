"""Name -> constructor tables for optimizers and losses. An unknown name raises, naming the options."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .config import OPTIMIZER_NAMES

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach: one fused kernel launch per parameter group instead of one per tensor.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _adam(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _sgd(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9, foreach=True)


def _rmsprop(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _pytorch_optimizer(class_name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """An optimizer of the pytorch-optimizer package with its own defaults (betas, eps, ...), our lr and
    weight decay. Prodigy's lr is a multiplier of the step size it finds itself: 1.0 is its default."""
    import pytorch_optimizer

    return getattr(pytorch_optimizer, class_name)(params, lr=lr, weight_decay=weight_decay)


def _adamw8bit(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW: optimizer state in 8 bits per value instead of 32, CUDA only."""
    if not all(p.device.type == "cuda" for p in params):
        raise ValueError(
            "optimizer AdamW8bit (bitsandbytes) needs a CUDA GPU; choose AdamW or Adafactor on this device"
        )
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": _adamw,
    "Adam": _adam,
    "SGD": _sgd,
    "RMSprop": _rmsprop,
    "Prodigy": functools.partial(_pytorch_optimizer, "Prodigy"),
    "Adafactor": functools.partial(_pytorch_optimizer, "AdaFactor"),
    "CAME": functools.partial(_pytorch_optimizer, "CAME"),
    "Lion": functools.partial(_pytorch_optimizer, "Lion"),
    "AdamW8bit": _adamw8bit,
}

# Element-wise (reduction="none"): the objective reduces per sample, so it can weight samples.
LOSSES: dict[str, LossFn] = {
    "MSE": lambda pred, target: F.mse_loss(pred, target, reduction="none"),
    "L1": lambda pred, target: F.l1_loss(pred, target, reduction="none"),
    "Huber": lambda pred, target: F.huber_loss(pred, target, reduction="none", delta=1.0),
    "SmoothL1": lambda pred, target: F.smooth_l1_loss(pred, target, reduction="none", beta=1.0),
}


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}; got {name!r}")
    return OPTIMIZERS[name](list(params), lr, weight_decay)


def make_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"loss_function must be one of {', '.join(LOSSES)}; got {name!r}")
    return LOSSES[name]
