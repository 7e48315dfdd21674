"""The model as training calls it: its prediction target and noise schedule (an Objective), its x0
prediction through ComfyUI's own apply_model, and a check that its forward can be differentiated."""

from __future__ import annotations

import comfy.model_sampling
import torch

from ..training.autograd_safe import writes_into_used_tensors
from ..training.config import TrainConfig
from ..training.data import Sample, collate
from ..training.objective import Objective


def prediction_type(model_sampling) -> str:
    """Which target the family was trained on, from the class of ComfyUI's model_sampling: eps, v and
    flow by name; any other parameterisation (EDM, Cosmos' rectified flow, x0 models, ones newer
    ComfyUI adds) trains in its network's raw output space, read off its own calculate_denoised."""
    ms = comfy.model_sampling
    # Order matters: EDM subclasses V_PREDICTION, X0 and V_PREDICTION subclass EPS.
    if isinstance(model_sampling, getattr(ms, "EDM", ())) or isinstance(
        model_sampling, getattr(ms, "X0", ())
    ):
        return "raw"
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    if isinstance(model_sampling, ms.CONST):
        return "flow"
    return "raw"


def objective_for(patcher, config: TrainConfig | None = None) -> Objective:
    """The model's own sampling and target; noise-level options from config (None: plain uniform)."""
    ms = patcher.get_model_object("model_sampling")
    if config is None:
        return Objective(ms, prediction_type(ms))
    return Objective(
        ms, prediction_type(ms), timestep_sampling=config.timestep_sampling, logit_mean=config.logit_mean,
        logit_std=config.logit_std, flow_shift=config.flow_shift, min_snr_gamma=config.min_snr_gamma,
        noise_offset=config.noise_offset,
    )  # fmt: skip


def in_place_writes(patcher, sample: Sample, device: torch.device) -> str:
    """Whether the model's code writes in place into a tensor it already used (an explicit in-place
    op that autograd cannot train through), found by one forward pass without grad on ``sample``:
    the op's name, or "" (most models)."""
    x0, cond = collate([sample], [0], device)
    sigma = torch.tensor(
        [float(patcher.get_model_object("model_sampling").percent_to_sigma(0.5))], device=device
    )
    predict = make_predict_x0(patcher)
    floating = [t for t in (x0, *cond.values()) if torch.is_tensor(t) and t.is_floating_point()]
    return writes_into_used_tensors(lambda: predict(x0, sigma, cond), floating)


def make_predict_x0(patcher):
    """(x_t, sigma, cond) -> x0 estimate through ComfyUI's own apply_model (input scaling, timestep
    mapping, dtype casts, patches registered on the model), the path samplers use."""
    base = patcher.model
    topts = patcher.model_options.get("transformer_options", {})

    def predict_x0(x_t: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        opts = dict(topts)
        opts["sigmas"] = sigma
        return base.apply_model(x_t, sigma, transformer_options=opts, **cond)

    return predict_x0
