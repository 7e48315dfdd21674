"""Parity with stock ComfyUI: our files, loaded by ComfyUI's own LoRA code, patch W to W + our ΔW."""

from __future__ import annotations

import logging

import pytest
import torch

from lora import ALGORITHMS, AdapterModule, ConvSpec, LoKrModule

PREFIX = "diffusion_model.layer"
WEIGHT_KEY = f"{PREFIX}.weight"

# (id, algorithm, weight_shape, rank, alpha)
CASES = [
    ("lora-linear", "LoRA", (12, 20), 4, 3.0),
    ("lora-linear-clamped", "LoRA", (3, 20), 8, 4.0),
    ("lora-conv2d", "LoRA", (8, 6, 3, 3), 4, 0.5),
    ("lora-conv1d", "LoRA", (8, 6, 5), 3, None),
    ("loha-linear", "LoHa", (12, 20), 4, 3.0),
    ("loha-conv2d", "LoHa", (8, 6, 3, 3), 2, 7.0),
    ("loha-conv1d", "LoHa", (8, 6, 5), 2, None),
    ("lokr-linear-full", "LoKr", (12, 20), 4, 3.0),
    ("lokr-linear-lowrank", "LoKr", (64, 48), 2, 3.0),
    ("lokr-linear-prime", "LoKr", (7, 13), 1, 0.5),
    ("lokr-linear-prime-full", "LoKr", (7, 13), 8, 0.5),
    ("lokr-conv2d-full", "LoKr", (8, 6, 3, 3), 4, 3.0),
    ("lokr-conv2d-lowrank", "LoKr", (32, 16, 3, 3), 1, 2.0),
    ("lokr-conv2d-prime", "LoKr", (5, 3, 3, 3), 1, 1.5),
    ("lokr-conv1d-full", "LoKr", (8, 6, 5), 8, None),
    ("lokr-conv1d-lowrank", "LoKr", (32, 16, 3), 1, 2.0),
]


def _comfy_patched_weight(
    comfy_lora, sd: dict[str, torch.Tensor], weight: torch.Tensor, caplog
) -> torch.Tensor:
    """W after stock ComfyUI loads ``sd`` (our suffixes under PREFIX) and applies it at strength 1."""
    file_sd = {f"{PREFIX}.{suffix}": tensor for suffix, tensor in sd.items()}
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(file_sd, {PREFIX: WEIGHT_KEY})
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert not not_loaded, not_loaded  # ComfyUI consumed every key we wrote
    assert list(patches) == [WEIGHT_KEY]
    # (strength, adapter, strength_model, offset, function): the tuple ModelPatcher stores per patch.
    patch = (1.0, patches[WEIGHT_KEY], 1.0, None, None)
    return comfy_lora.calculate_weight([patch], weight.clone(), WEIGHT_KEY)


def _check(comfy_lora, module: AdapterModule, caplog, sd: dict[str, torch.Tensor] | None = None) -> None:
    weight = torch.randn(module.weight_shape, generator=torch.Generator().manual_seed(3))
    patched = _comfy_patched_weight(
        comfy_lora, module.adapter_state_dict() if sd is None else sd, weight, caplog
    )
    delta = module.delta_weight().detach()
    assert delta.abs().max() > 1e-3  # non-trivial ΔW, or the comparison proves nothing
    torch.testing.assert_close(patched, weight + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("algorithm", "shape", "rank", "alpha"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_comfy_applies_our_delta(comfy_lora, randomise, caplog, algorithm, shape, rank, alpha):
    conv = ConvSpec() if len(shape) > 2 else None
    module = randomise(ALGORITHMS[algorithm](shape, rank, alpha, conv=conv))
    _check(comfy_lora, module, caplog)


def test_case_list_covers_lokr_variants():
    kinds = set()
    for _, algorithm, shape, rank, alpha in CASES:
        if algorithm == "LoKr":
            module = LoKrModule(shape, rank, alpha, conv=ConvSpec() if len(shape) > 2 else None)
            kinds.add(("conv" if len(shape) > 2 else "linear", module.w2 is None, module.w1.shape[0] == 1))
    assert {
        ("linear", True, False),
        ("linear", False, False),
        ("conv", True, False),
        ("conv", False, False),
        ("linear", True, True),
        ("conv", True, True),
    } <= kinds


def test_comfy_bf16_file(comfy_lora, randomise, caplog):
    """A bf16-saved file (the usual on-disk dtype) still patches to W + ΔW of the bf16 factors."""
    module = randomise(ALGORITHMS["LoHa"]((12, 20), 4, 0.3))
    sd = module.adapter_state_dict(dtype=torch.bfloat16)
    reloaded = ALGORITHMS["LoHa"].from_adapter_state_dict(sd, (12, 20))
    _check(comfy_lora, reloaded, caplog, sd=sd)


def test_comfy_lokr_low_rank_w1_file(comfy_lora, caplog):
    """Files from other trainers may factor w1 too; our loader must scale them the way ComfyUI does."""
    generator = torch.Generator().manual_seed(0)
    sd = {
        "lokr_w1_a": torch.randn(4, 2, generator=generator),
        "lokr_w1_b": torch.randn(2, 4, generator=generator),
        "lokr_w2": torch.randn(3, 5, generator=generator),
        "alpha": torch.tensor(3.0),
    }
    _check(comfy_lora, LoKrModule.from_adapter_state_dict(sd, (12, 20)), caplog, sd=sd)
    # both factored: ComfyUI divides alpha by w2's rank
    sd["lokr_w2_a"], sd["lokr_w2_b"] = (
        torch.randn(3, 1, generator=generator),
        torch.randn(1, 5, generator=generator),
    )
    del sd["lokr_w2"]
    module = LoKrModule.from_adapter_state_dict(sd, (12, 20))
    assert module.rank == 1
    _check(comfy_lora, module, caplog, sd=sd)
