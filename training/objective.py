"""The denoising objective: noise levels from the model's own sampling, loss in the family's target space.

Works with any object shaped like ComfyUI's `model_sampling` (duck-typed: `percent_to_sigma(float)`,
`noise_scaling(sigma, noise, latent)`, `sigma_data`), so this module never imports ComfyUI.

Why a target space: `apply_model` returns the model's x0 estimate. Training on x0 alone weights
every noise level the same and under-trains the low-noise end that decides fine detail. Each family
was trained to predict something else - eps (SD1.x/SDXL), v (SD2 768-v), the flow velocity
noise - x0 (SD3, Flux), the raw network output of any other parameterisation ("raw": read off the
model's own `calculate_denoised`) - and that quantity is an affine function of x0 for fixed x_t and
sigma, so we map both the prediction and the truth into it and compare there. The loss is then the one the
base model was trained with, up to the choice of distance (MSE, L1, Huber, SmoothL1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PREDICTIONS = ("eps", "v", "flow", "raw", "x0")

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
    timestep_sampling: str = "uniform"  # or "logit_normal" (SD3 paper): noise level t = sigmoid(N(mean, std))
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = (
        1.0  # flow models: sigma -> shift*sigma / (1 + (shift-1)*sigma), on top of the model's own
    )
    min_snr_gamma: float = 0.0  # eps / v models: weight min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v)
    noise_offset: float = 0.0  # per-sample, per-channel constant added to the noise

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(
                f"timestep_sampling must be uniform or logit_normal, got {self.timestep_sampling!r}"
            )

    @property
    def sigma_data(self) -> float:
        return float(getattr(self.sampling, "sigma_data", 1.0))

    def sigmas_from_percents(self, percents: torch.Tensor) -> torch.Tensor:
        """percents [B] in (0, 1), 0 = most noise -> sigmas [B] (fp32, CPU)."""
        return torch.tensor(
            [float(self.sampling.percent_to_sigma(float(p))) for p in percents], dtype=torch.float32
        )

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n noise levels drawn in the model's own percent-of-schedule space (uniform or
        logit-normal), then shifted for flow models when flow_shift != 1."""
        if self.timestep_sampling == "logit_normal":
            t = torch.sigmoid(
                torch.randn(n, generator=generator, dtype=torch.float64) * self.logit_std + self.logit_mean
            )
            u = 1.0 - t  # t is "how noisy"; percent 0 is the noisiest end
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        sigmas = self.sigmas_from_percents(PERCENT_MARGIN + u * (1 - 2 * PERCENT_MARGIN))
        if self.prediction == "flow" and self.flow_shift != 1.0:
            s = self.flow_shift
            sigmas = s * sigmas / (1 + (s - 1) * sigmas)
        return sigmas

    def sample_noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise [B, C, ...] (fp32, CPU), plus the noise offset if set."""
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if self.noise_offset > 0:
            offset = torch.randn(shape[:2], generator=generator, dtype=torch.float32)
            noise = noise + self.noise_offset * offset.reshape(*shape[:2], *([1] * (len(shape) - 2)))
        return noise

    def sample_weights(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights [B] (min-SNR-gamma), or None for equal weights."""
        if self.min_snr_gamma <= 0 or self.prediction not in ("eps", "v"):
            return None
        snr = (self.sigma_data / sigma.double()) ** 2
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return (clipped / (snr + 1 if self.prediction == "v" else snr)).float()

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
        if self.prediction == "raw":
            # The network's own output space, whatever the parameterisation: ComfyUI's
            # calculate_denoised(sigma, out, x_t) is affine in out, x0 = a*x_t + b*out, so
            # out = (x0 - a*x_t) / b, with a*x_t and b read off the model's own formula (Cosmos
            # Predict2's rectified flow on x0 + sigma*noise: the velocity noise - x0; EDM: F).
            ax = self.sampling.calculate_denoised(sigma, torch.zeros_like(x_t), x_t)
            b = self.sampling.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x_t))
            return (x0 - ax) / b
        return x0


def denoise_loss(
    predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    objective: Objective,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """Loss of one batch. predict_x0(x_t, sigma) is the model call; x0, noise [B, C, ...]; sigma [B].
    loss_fn is element-wise; the result is the (weighted) mean over samples of per-sample means."""
    x_t = objective.noisy(sigma.to(x0.device), noise, x0)
    pred = predict_x0(x_t, sigma.to(x0.device)).float()
    sigma = sigma.to(pred.device)
    elementwise = loss_fn(
        objective.to_target(x_t.float(), pred, sigma), objective.to_target(x_t.float(), x0.float(), sigma)
    )
    per_sample = elementwise.reshape(elementwise.shape[0], -1).mean(dim=1)
    weights = objective.sample_weights(sigma)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
