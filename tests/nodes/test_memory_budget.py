"""The memory plan inside the trainer: a run over the budget is refused before its first step with
the plan's figures and the settings that would fit, leaving the model and the loras folder as they
were (the plan's figures against measured peaks: benchmarks/memory_plan.py; its arithmetic:
tests/training/test_memory_plan.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def glue(comfy_glue, families):
    return comfy_glue("train"), families


def test_a_run_over_the_memory_budget_is_refused_before_it_starts_naming_what_fits(
    glue, loras_dir, monkeypatch
):
    """LORALAB_TRAINING_MEMORY_MIB below the plan: MemoryError before the first step with the plan's
    figures and the changes that fit; the model is unchanged and no file is written."""
    train_mod, families = glue
    from training.config import TrainConfig

    patcher = families.build_model("sd15")
    before = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    latents, conditioning = families.make_data("sd15", count=4)
    config = TrainConfig(steps=2, rank=4, batch_size=4, gradient_checkpointing=False, training_dtype="fp32",
                         lora_dtype="fp32", save_every=1)  # fmt: skip
    monkeypatch.setenv("LORALAB_TRAINING_MEMORY_MIB", "12")
    with pytest.raises(MemoryError) as info:
        train_mod.train(patcher, [latents], [conditioning], config, "[None]", None, "loralab/budget")
    message = str(info.value)
    assert "training did not start" in message and "LORALAB_TRAINING_MEMORY_MIB has 12 MiB free" in message, (
        message
    )
    assert "Settings that fit: " in message and "batch_size 1" in message, message
    assert not list(loras_dir.rglob("*.safetensors"))
    for k, v in patcher.model.diffusion_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    monkeypatch.setenv("LORALAB_TRAINING_MEMORY_MIB", "64")
    lora, losses, _ = train_mod.train(
        patcher, [latents], [conditioning], config, "[None]", None, "loralab/budget"
    )
    assert len(losses) == 2
