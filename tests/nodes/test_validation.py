"""The held-out loss measured while training (nodes/validation.py), in-process on the tiny SD1.5 UNet:
at the planned steps, equal to the Denoising Loss measure of the model at that step (the base model
before the first step, model_with_lora after the last), and without any effect on the training."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def glue(comfy_glue, families):
    return comfy_glue("train"), comfy_glue("validation"), comfy_glue, families


def _train(glue, validation, steps=4):
    train_mod, _, _, families = glue
    from training.config import TrainConfig

    model = families.build_model("sd15")
    latents, conditioning = families.make_data("sd15", count=2, seed=0)
    config = TrainConfig(steps=steps, rank=4, learning_rate=0.01, training_dtype="fp32", lora_dtype="fp32")
    out: dict = {}
    lora, losses, _ = train_mod.train(model, [latents], [conditioning], config, "[None]", None, "loralab/val",
                                      validation=validation, loss_map=out)  # fmt: skip
    return model, lora, losses, out


def _denoise_loss(glue, patcher, settings) -> float:
    """What the Denoising Loss node computes for this model and set."""
    import comfy.model_management

    from training.loop import evaluate_denoise_loss

    _, _, comfy_glue, _ = glue
    graph_inputs, model_forward = comfy_glue("graph_inputs"), comfy_glue("model_forward")
    comfy.model_management.load_models_gpu([patcher])
    device = patcher.load_device
    samples = graph_inputs.build_samples(patcher, [settings.latents], [settings.positive], device)
    return evaluate_denoise_loss(model_forward.make_predict_x0(patcher), model_forward.objective_for(patcher), samples, device,
                                 settings.seed, settings.levels)  # fmt: skip


def test_held_out_loss_at_the_planned_steps_is_the_denoising_loss_of_the_model_then(glue):
    import comfy.sd

    _, validation_mod, _, families = glue
    held_latents, held_conditioning = families.make_data("sd15", count=2, seed=5)  # not the training data
    settings = validation_mod.ValidationSettings(
        held_latents, held_conditioning, every_n_steps=2, seed=3, levels=4
    )
    model, lora, _, out = _train(glue, settings)
    assert out["validation_step"] == [0, 2, 4]
    assert all(math.isfinite(v) for v in out["validation_loss"])
    # the adapter starts at zero (the training clone runs attention through SDPA: equal to ~1e-8)
    assert out["validation_loss"][0] == pytest.approx(_denoise_loss(glue, model, settings), rel=1e-6)
    trained = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
    assert out["validation_loss"][-1] == pytest.approx(_denoise_loss(glue, trained, settings), rel=1e-5)
    assert out["validation_loss"][-1] != out["validation_loss"][0]


def test_measuring_a_held_out_set_leaves_training_as_it_is(glue):
    _, validation_mod, _, families = glue
    held_latents, held_conditioning = families.make_data("sd15", count=2, seed=5)
    settings = validation_mod.ValidationSettings(
        held_latents, held_conditioning, every_n_steps=1, seed=3, levels=2
    )
    _, with_validation, losses_a, out = _train(glue, settings)
    _, without, losses_b, none = _train(glue, None)
    assert out["validation_step"] == [0, 1, 2, 3, 4] and none == {}
    assert losses_a == losses_b
    for key, value in without.items():
        assert torch.equal(with_validation[key], value), key
