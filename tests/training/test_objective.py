"""The target mapping inverts ComfyUI's own calculate_denoised for every prediction type."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from training.objective import Objective

COMFY = Path(__file__).resolve().parents[2] / ".comfyui" / "ComfyUI"


@pytest.fixture(scope="module")
def comfy_sampling():
    if not (COMFY / "comfy").is_dir():
        pytest.skip("ComfyUI is not set up (run scripts/setup.sh)")
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_sampling as ms

    return ms


def _sampling(ms, prediction_cls, sampling_cls, **settings):
    class Sampling(sampling_cls, prediction_cls):
        pass

    class Cfg:
        sampling_settings = settings

    return Sampling(Cfg())


@pytest.mark.parametrize(
    "kind,prediction",
    [
        ("EPS", "eps"),
        ("V_PREDICTION", "v"),
        ("CONST", "flow"),
        ("EPS", "raw"),
        ("V_PREDICTION", "raw"),
        ("CONST", "raw"),
        ("COSMOS_RFLOW", "raw"),
    ],
)
def test_target_inverts_calculate_denoised(comfy_sampling, kind, prediction):
    ms = comfy_sampling
    if not hasattr(ms, kind):
        pytest.skip(f"this ComfyUI has no {kind}")
    sampling_cls = {
        "CONST": ms.ModelSamplingDiscreteFlow,
        "COSMOS_RFLOW": getattr(ms, "ModelSamplingCosmosRFlow", None),
    }.get(kind, ms.ModelSamplingDiscrete)
    settings = {"shift": 3.0} if kind == "CONST" else {}
    sampling = _sampling(ms, getattr(ms, kind), sampling_cls, **settings)
    obj = Objective(sampling, prediction)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    sigma = obj.sample_sigmas(3, gen).double()
    x_t = obj.noisy(sigma, noise, x0)
    target = obj.to_target(x_t, x0, sigma)
    # If the model output the target exactly, ComfyUI's own formula gives back x0.
    back = sampling.calculate_denoised(sigma, target, x_t)
    torch.testing.assert_close(back, x0, rtol=1e-9, atol=1e-9)
    if prediction == "eps":
        torch.testing.assert_close(target, noise)
    if prediction == "flow" or kind == "CONST":
        torch.testing.assert_close(target, noise - x0)
    if kind == "EPS":
        torch.testing.assert_close(target, noise)
    if kind == "COSMOS_RFLOW":  # rectified flow on (x0 + sigma*noise) / (1 + sigma): the velocity
        torch.testing.assert_close(target, noise - x0)
    if prediction == "raw" and kind == "V_PREDICTION":
        torch.testing.assert_close(target, Objective(sampling, "v").to_target(x_t, x0, sigma))


def test_sigmas_are_inside_the_schedule(comfy_sampling):
    ms = comfy_sampling
    sampling = _sampling(ms, ms.EPS, ms.ModelSamplingDiscrete)
    obj = Objective(sampling, "eps")
    s = obj.sample_sigmas(1000, torch.Generator().manual_seed(1))
    assert torch.isfinite(s).all()
    assert float(s.min()) >= float(sampling.sigma_min) - 1e-6
    assert float(s.max()) <= float(sampling.sigma_max) + 1e-6
    # uniform in percent space covers the range
    assert float(s.max()) > 5 * float(s.min())


def test_unknown_prediction_rejected():
    with pytest.raises(ValueError, match="prediction"):
        Objective(object(), "banana")
