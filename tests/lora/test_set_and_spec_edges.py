"""AdapterSet, ConvSpec / layer_spec and the base module at their edges: the options the caller gives
reach every adapter, grouped or dilated convolutions are described exactly, loaded tensors are owned,
and kohya-named files are read back."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lora import LoRAModule, layer_spec
from lora.inject import AdapterSet, find_targets, group_file_keys
from lora.spec import ConvSpec


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Conv2d(4, 8, 3, padding=1))


def test_create_passes_alpha_generator_and_device_to_every_adapter():
    targets = find_targets(_net())
    one = AdapterSet.create(targets, "LoRA", 4, 2.0, torch.Generator().manual_seed(3))
    two = AdapterSet.create(targets, "LoRA", 4, 2.0, torch.Generator().manual_seed(3))
    assert all(a.alpha == 2.0 for _, a in one.items())
    assert all(
        torch.equal(p, q) for p, q in zip(one.trainable_parameters(), two.trainable_parameters(), strict=True)
    )
    meta = AdapterSet.create(
        targets, "LoRA", 4, None, torch.Generator().manual_seed(3), device=torch.device("meta")
    )
    assert all(p.device.type == "meta" for p in meta.trainable_parameters())
    assert all(a.alpha == 4.0 for _, a in meta.items())  # no alpha: the rank (scale 1)
    bf16 = one.state_dict_for_file(dtype=torch.bfloat16)
    assert {t.dtype for k, t in bf16.items() if not k.endswith(".alpha")} == {torch.bfloat16}


def test_kohya_named_files_are_grouped_back_to_module_paths():
    paths = ["input_blocks.1.1.proj_in", "out.0"]
    sd = {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(1),
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.ones(()),
        "diffusion_model.out.0.lora_up.weight": torch.zeros(2),
        "lora_unet_elsewhere.lora_up.weight": torch.zeros(3),
        "text_encoder.x.weight": torch.zeros(4),
    }
    groups, rest = group_file_keys(sd, paths)
    assert set(groups) == set(paths)
    assert set(groups["input_blocks.1.1.proj_in"]) == {"lora_down.weight", "alpha"}
    assert set(rest) == {"lora_unet_elsewhere.lora_up.weight", "text_encoder.x.weight"}


def test_conv_specs_normalise_and_check_their_fields():
    spec = ConvSpec(stride=[2, 2], padding=[1, 0], dilation=[2, 2], groups=2)
    assert (spec.stride, spec.padding, spec.dilation) == ((2, 2), (1, 0), (2, 2))
    assert ConvSpec(padding="same").padding == "same"
    with pytest.raises(ValueError, match="groups"):
        ConvSpec(groups=True)
    shape, conv = layer_spec(nn.Conv2d(8, 16, 3, padding="same", groups=4))
    assert shape == (16, 2, 3, 3) and all(type(d) is int for d in shape) and conv.padding == "same"


def test_base_module_defaults_devices_and_owned_copies():
    assert LoRAModule((16, 12), 4).alpha == 4.0
    meta = LoRAModule((16, 12), 4, 2.0, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    sd = meta.adapter_state_dict()
    assert sd["alpha"].dtype == torch.float32 and sd["alpha"].device.type == "meta"
    source = LoRAModule((16, 12), 4, generator=torch.Generator().manual_seed(0)).adapter_state_dict()
    loaded = LoRAModule.from_adapter_state_dict(source, (16, 12))
    before = loaded.adapter_state_dict()["lora_down.weight"].clone()
    source["lora_down.weight"].add_(1.0)  # the caller's tensors change later: the adapter's do not
    assert torch.equal(loaded.adapter_state_dict()["lora_down.weight"], before)
