"""The denoising objective: noise levels from the model's own sampling, loss in the family's target space.

Works with any object shaped like ComfyUI's `model_sampling` (duck-typed: `percent_to_sigma(float)`,
`noise_scaling(sigma, noise, latent)`, `sigma_data`), so this module never imports ComfyUI.

Why a target space: `apply_model` returns the model's x0 estimate. Training on x0 alone weights
every noise level the same and under-trains the low-noise end that decides fine detail. Each family
was trained to predict something else - eps (SD1.x/SDXL), v (SD2 768-v), the flow velocity
noise - x0 (SD3, Flux) - and that quantity is an affine function of x0 for fixed x_t and sigma, so
we map both the prediction and the truth into it and compare there. The loss is then the one the
base model was trained with, up to the choice of distance (MSE, L1, Huber, SmoothL1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PREDICTIONS = ("eps", "v", "flow", "x0")

# Percent 0 is "pure noise" (sigma may be unbounded) and 1 is "clean" (sigma 0, where eps and flow
# targets divide by zero), so noise levels are drawn from the open interval in between.
PERCENT_MARGIN = 1e-3


@dataclass(frozen=True)
class Objective:
    """Noise-level sampling and target mapping for one model family.

    sampling: ComfyUI-like model_sampling object. prediction: one of PREDICTIONS.
    """

    sampling: Any
    prediction: str

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")

    @property
    def sigma_data(self) -> float:
        return float(getattr(self.sampling, "sigma_data", 1.0))

    def sigmas_from_percents(self, percents: torch.Tensor) -> torch.Tensor:
        """percents [B] in (0, 1), 0 = most noise -> sigmas [B] (fp32, CPU)."""
        return torch.tensor([float(self.sampling.percent_to_sigma(float(p))) for p in percents], dtype=torch.float32)

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n noise levels, uniform in the model's own percent-of-schedule space."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return self.sigmas_from_percents(PERCENT_MARGIN + u * (1 - 2 * PERCENT_MARGIN))

    def noisy(self, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x_t the way the model's sampler builds it. sigma [B], noise/x0 [B, C, ...]."""
        return self.sampling.noise_scaling(sigma, noise, x0)

    def to_target(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Map an x0 (true or predicted) to what this family predicts, given x_t and sigma [B]."""
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x0.ndim - 1)).to(x0.dtype)
        if self.prediction in ("eps", "flow"):
            # eps: x_t = x0 + s*eps. flow: x_t = s*noise + (1-s)*x0, so (x_t - x0)/s = noise - x0.
            return (x_t - x0) / s
        if self.prediction == "v":
            # Inverse of x0 = x_t*sd^2/(s^2+sd^2) - v*s*sd/sqrt(s^2+sd^2).
            sd = self.sigma_data
            denom = s**2 + sd**2
            return (x_t * sd**2 / denom - x0) * denom.sqrt() / (s * sd)
        return x0


def denoise_loss(
    predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    objective: Objective,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """Loss of one batch. predict_x0(x_t, sigma) is the model call; x0, noise [B, C, ...]; sigma [B]."""
    x_t = objective.noisy(sigma.to(x0.device), noise, x0)
    pred = predict_x0(x_t, sigma.to(x0.device)).float()
    sigma = sigma.to(pred.device)
    return loss_fn(objective.to_target(x_t.float(), pred, sigma), objective.to_target(x_t.float(), x0.float(), sigma))
