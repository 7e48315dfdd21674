"""Offloading frozen weights (offload_blocks): the offloaded blocks' layers run through ComfyUI's
per-call casting, the trained adapter is bit-identical to a run without offloading (on CPU the two
differ in code path only), and the model's layers are as they were afterwards. The plan's offload
suggestion: tests/training/test_memory_plan.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def glue(comfy_glue, families):
    return comfy_glue("train"), families


def _layer_state(diffusion) -> dict:
    return {name: (bool(getattr(m, "comfy_cast_weights", False)), tuple(t.device for t in m.parameters(recurse=False)))
            for name, m in diffusion.named_modules() if hasattr(m, "comfy_cast_weights")}  # fmt: skip


@pytest.mark.parametrize(
    ("family", "algorithm"), [("sd15", "LoRA"), ("flux_dev", "DoRA"), ("wan22_5b", "OFT")]
)
def test_offloaded_blocks_train_the_same_adapter_through_comfy_casting(
    glue, loras_dir, monkeypatch, family, algorithm
):
    train_mod, families = glue
    import comfy.ops

    from training.config import TrainConfig
    from training.gradient_checkpointing import repeated_blocks
    from training.offload import castable_layers

    casts = []
    real_cast = comfy.ops.cast_bias_weight

    def counting_cast(s, *args, **kwargs):
        casts.append(s)
        return real_cast(s, *args, **kwargs)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counting_cast)
    results = {}
    for n in (0, 3):
        patcher = families.build_model(family)
        diffusion = patcher.model.diffusion_model
        before = _layer_state(diffusion)
        latents, conditioning = families.make_data(family)
        config = TrainConfig(steps=3, rank=4, algorithm=algorithm, learning_rate=0.01, training_dtype="fp32",
                             lora_dtype="fp32", offload_blocks=n)  # fmt: skip
        casts.clear()
        lora, losses, _ = train_mod.train(
            patcher, [latents], [conditioning], config, "[None]", None, "loralab/offload"
        )
        offloaded = {id(m) for b in repeated_blocks(diffusion)[:n] for m in castable_layers(b)}
        cast_ids = {id(m) for m in casts}
        # with offloading exactly the offloaded blocks' layers were cast per call (on top of any the model
        # casts anyway), every one of them
        assert offloaded <= cast_ids, len(offloaded - cast_ids)
        assert (n == 0) == (not offloaded)
        assert _layer_state(diffusion) == before  # flags and devices as they were
        results[n] = (lora, losses)
    (a, la), (b, lb) = results[0], results[3]
    assert la == lb
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_offloads_the_blocks_the_plan_asks_for_when_the_run_would_not_fit(
    glue, loras_dir, monkeypatch, caplog
):
    """offload_blocks -1 where offloading frees device memory (faked on CPU with an offload device of
    another index) and the plan does not fit: the trainer offloads the plan's number of blocks, measures
    again and trains, with the adapter a run without offloading trains."""
    import logging

    train_mod, families = glue
    import comfy.ops

    from training.config import TrainConfig
    from training.gradient_checkpointing import repeated_blocks
    from training.offload import castable_layers

    real_fit = train_mod._memory_fit
    calls = []

    def tight_fit(*args, **kwargs):
        fit = real_fit(*args, **kwargs)
        calls.append(args[-1] if len(args) > 8 else kwargs.get("block_weights", ()))
        if len(calls) == 1:  # the first measure: over budget, two blocks would do
            fit.available, fit.offload_needed = 0, 2
        return fit

    casts = []
    real_cast = comfy.ops.cast_bias_weight
    monkeypatch.setattr(
        comfy.ops, "cast_bias_weight", lambda s, *a, **k: casts.append(s) or real_cast(s, *a, **k)
    )
    config = TrainConfig(steps=2, rank=4, learning_rate=0.01, training_dtype="fp32", lora_dtype="fp32")
    results = []
    for auto in (False, True):
        patcher = families.build_model("sd15")
        latents, conditioning = families.make_data("sd15")
        if auto:
            patcher.offload_device = torch.device("cpu", 0)  # "another device" that is this CPU
            monkeypatch.setattr(train_mod, "_memory_fit", tight_fit)
        casts.clear()
        with caplog.at_level(logging.INFO, logger="loralab"):
            lora, _, _ = train_mod.train(
                patcher, [latents], [conditioning], config, "[None]", None, "loralab/auto"
            )
        results.append(lora)
    blocks = repeated_blocks(patcher.model.diffusion_model)
    assert (
        len(calls) == 2 and len(calls[0]) == len(blocks) and calls[1] == ()
    )  # measured with block sizes, then again
    assert {id(m) for b in blocks[:2] for m in castable_layers(b)} <= {id(m) for m in casts}
    assert "the weights of 2 repeated blocks" in caplog.text
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
