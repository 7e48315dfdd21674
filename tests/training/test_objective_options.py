"""The objective's options on a schedule whose numbers are known (rectified flow, sigma = 1 - percent):
how noise levels are drawn, the flow shift, the noise offset, min-SNR weights, and the v target with a
sigma_data other than 1."""

from __future__ import annotations

import math

import pytest
import torch

from tests.training.test_loop import FlowSampling as Flow
from training.objective import Objective, denoise_loss


class VSampling(Flow):
    sigma_data = 0.5

    def percent_to_sigma(self, p: float) -> float:
        return 10.0 ** (1 - 3 * p)  # 10 .. 0.01

    def noise_scaling(self, sigma, noise, latent):
        return latent + sigma.reshape(-1, *([1] * (noise.ndim - 1))) * noise


def _sigmas(n=20_000, **options):
    return Objective(Flow(), "flow", **options).sample_sigmas(n, torch.Generator().manual_seed(0)).double()


def _middle(s):  # the share of noise levels between 0.25 and 0.75
    return float(((s > 0.25) & (s < 0.75)).double().mean())


def test_noise_levels_are_uniform_or_logit_normal_as_asked():
    assert _middle(_sigmas()) == pytest.approx(0.5, abs=0.02)
    assert _middle(_sigmas(timestep_sampling="logit_normal")) == pytest.approx(
        0.728, abs=0.02
    )  # P(|N| < 1.0986)
    assert _middle(_sigmas(timestep_sampling="logit_normal", logit_std=2.0)) == pytest.approx(0.417, abs=0.02)
    shifted = _sigmas(timestep_sampling="logit_normal", logit_mean=1.0)  # noisier: sigma = sigmoid(N(1, 1))
    assert float(shifted.mean()) == pytest.approx(0.696, abs=0.01)


@pytest.mark.parametrize("shift", [2.0, 3.0])
def test_flow_shift_moves_every_level_towards_noise(shift):
    base = _sigmas(1000)
    expected = shift * base / (1 + (shift - 1) * base)
    torch.testing.assert_close(_sigmas(1000, flow_shift=shift), expected, rtol=1e-6, atol=1e-7)
    eps = Objective(Flow(), "eps", flow_shift=shift).sample_sigmas(1000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(eps.double(), base)  # only flow models shift


def test_noise_offset_adds_one_draw_per_sample_and_channel():
    shape = torch.Size([2, 3, 4, 4])
    plain = Objective(Flow(), "flow").sample_noise(shape, torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    offset = Objective(Flow(), "flow", noise_offset=0.1).sample_noise(shape, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    torch.randn(shape, generator=gen)
    per_channel = torch.randn(shape[:2], generator=gen)
    torch.testing.assert_close(offset - plain, 0.1 * per_channel[..., None, None].expand(shape))


def test_min_snr_weights():
    sigma = torch.tensor([0.1, 0.5, 2.0])
    snr = (0.5 / sigma.double()) ** 2  # sigma_data 0.5: 25, 1, 0.0625
    for prediction, denominator in [("eps", snr), ("v", snr + 1)]:
        weights = Objective(VSampling(), prediction, min_snr_gamma=1.0).sample_weights(sigma)
        torch.testing.assert_close(
            weights.double(), torch.clamp(snr, max=1.0) / denominator, rtol=1e-6, atol=0
        )
    assert Objective(VSampling(), "eps").sample_weights(sigma) is None  # gamma 0: off
    assert Objective(Flow(), "flow", min_snr_gamma=5.0).sample_weights(sigma) is None  # not for flow


def test_v_target_with_sigma_data_and_a_weighted_loss():
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.3, 2.0])
    x_t, v = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    s, sd = sigma.view(-1, 1, 1), 0.5
    x0 = x_t * sd**2 / (s**2 + sd**2) - v * s * sd / (s**2 + sd**2).sqrt()
    objective = Objective(VSampling(), "v", min_snr_gamma=2.0)
    torch.testing.assert_close(objective.to_target(x_t, x0, sigma), v, rtol=1e-5, atol=1e-5)

    clean, noise = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    wrong = torch.randn(2, 3, 4, generator=gen)
    loss = denoise_loss(lambda x, s: wrong, objective, lambda a, b: (a - b) ** 2, clean, noise, sigma)
    x_t = objective.noisy(sigma, noise, clean)
    per_sample = (
        (objective.to_target(x_t, wrong, sigma) - objective.to_target(x_t, clean, sigma)) ** 2
    ).mean((1, 2))
    assert float(loss) == pytest.approx(
        float((per_sample * objective.sample_weights(sigma)).mean()), rel=1e-5
    )


@pytest.mark.parametrize(
    "step,schedule,expected",
    [(1, "linear", 0.25), (4, "linear", 1.0), (5, "linear", 0.9375), (12, "linear", 0.5), (20, "linear", 0.0),
     (30, "linear", 0.0), (12, "cosine", 0.5), (8, "cosine_with_restarts", 0.5), (12, "cosine_with_restarts", 1.0),
     (19, "cosine_with_restarts", 0.5 * (1 + math.cos(math.pi * 0.875))), (20, "cosine_with_restarts", 0.0),
     (12, "constant", 1.0)],
)  # fmt: skip
def test_lr_schedule_values(step, schedule, expected):
    """20 steps, 4 of warm-up, base 1: warm-up reaches 1 at step 4; decays run over the 16 after it;
    cosine_with_restarts (its default 1 cycle here, 2 below) restarts every 8."""
    from training.schedule import lr_at

    cycles = 2 if schedule == "cosine_with_restarts" else 1
    assert lr_at(step, 20, 1.0, schedule, warmup=4, cycles=cycles) == pytest.approx(expected, abs=1e-12)


def test_lr_schedule_defaults_and_a_run_shorter_than_its_warmup():
    from training.schedule import lr_at

    assert lr_at(5, 10, 1.0, "cosine_with_restarts") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5))
    )  # 1 cycle
    assert lr_at(3, 2, 1.0, "linear", warmup=2) == 0.0  # past a total the warm-up used up
