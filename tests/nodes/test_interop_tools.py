"""LoRA files against the real tools, installed from the package registry (requirements-test.txt):
diffusers, peft and LyCORIS. The tiny SD1.5 / SDXL UNets get a diffusers twin (same weights, through
ComfyUI's UNet-to-diffusers table); a file applied by a tool must give the output ComfyUI gives with the
same file, every layer applied.

- the pack's kohya and diffusers files: diffusers' own LoRA loader (load_lora_into_unet)
- the pack's kohya LoRA / LoHa / LoKr files: LyCORIS' kohya loader (the sd-scripts network module)
- files made by peft / diffusers (save_lora_weights, per-layer alpha in lora_adapter_metadata) and by
  LyCORIS (SimpleTuner's "lycoris_" names): continue through existing_lora, and the continued file
  applies in ComfyUI and in the originating tool alike."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers not installed (requirements-test.txt)")
pytest.importorskip("peft", reason="peft not installed (requirements-test.txt)")
pytest.importorskip("lycoris", reason="lycoris-lora not installed (requirements-test.txt)")

from tests.nodes import diffusers_twins as twins  # noqa: E402

RANK, ALPHA = 4, 2.0
TOL = 1e-4


@pytest.fixture(scope="module")
def glue(comfy_glue, families):
    return comfy_glue("train"), comfy_glue("files"), families


def _lora(glue, family: str, algorithm: str = "LoRA", steps: int = 2):
    """A trained LoRA of the family's tiny model (all layers), its factors then replaced by random
    values so its effect is large (alpha and the trainer's file names kept)."""
    train_mod, _, families = glue
    from training.config import TrainConfig

    patcher = families.build_model(family)
    latents, conditioning = families.make_data(family)
    config = TrainConfig(steps=steps, rank=RANK, alpha=ALPHA, algorithm=algorithm, learning_rate=0.01,
                         training_dtype="fp32", lora_dtype="fp32")  # fmt: skip
    lora, _, _ = train_mod.train(patcher, [latents], [conditioning], config, "[None]", None, "loralab/test")
    gen = torch.Generator().manual_seed(1)
    for key, value in list(lora.items()):
        if not key.endswith(".alpha"):
            lora[key] = torch.randn(value.shape, generator=gen) * 0.3
    return patcher, lora


def _save(glue, lora, key_format: str, loras_dir):
    """Through the Save LoRA node; returns (path, tensors, metadata) of the file."""
    _, files, _ = glue
    from training.lorafile import read_lora_file

    name = files.LoraLab_SaveLora.execute(lora, f"interop/{key_format}", None, key_format).result[0]
    path = loras_dir / name
    tensors, metadata = read_lora_file(path)
    return path, tensors, metadata


def _applied(glue, patcher, tensors, metadata=None):
    """The model with the file applied by the pack's Apply LoRA (ComfyUI's loader after key mapping)."""
    import importlib

    from training.lorafile import LoraStateDict

    apply_lora = importlib.import_module(glue[1].__package__ + ".apply_lora")
    return apply_lora.LoraLab_ApplyLora.execute(
        patcher, LoraStateDict(tensors, metadata=metadata), 1.0
    ).result[0]


def _stock(patcher, tensors):
    """The model with the file applied by ComfyUI's own loader, as LoraLoaderModelOnly does."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(patcher, None, tensors, 1.0, 0)[0]


def _layers(tensors) -> int:
    return len({k.rsplit(".", 2)[0] for k in tensors if k.endswith(("lora_down.weight", "lora_A.weight"))}
               | {k.rsplit(".", 1)[0] for k in tensors if k.endswith(("hada_w1_a", "lokr_w1", "lokr_w1_a"))})  # fmt: skip


def _peft_layers(unet) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in unet.modules())


def _mixin(family):
    import diffusers.loaders.lora_pipeline as lp

    return lp.StableDiffusionXLLoraLoaderMixin if family == "sdxl" else lp.StableDiffusionLoraLoaderMixin


def _diffusers_apply(family, unet, path) -> None:
    mixin = _mixin(family)
    # as the pipelines' load_lora_weights calls it (unet_config: SDXL's SAI block names -> diffusers')
    state_dict, alphas, metadata = mixin.lora_state_dict(
        str(path), unet_config=unet.config, return_lora_metadata=True
    )
    mixin.load_lora_into_unet(state_dict, alphas, unet, metadata=metadata)


def test_twins_compute_what_comfyui_computes(glue):
    _, _, families = glue
    for family in ("sd15", "sdxl"):
        patcher = families.build_model(family)
        inputs = twins.make_inputs(family)
        ours = twins.comfy_forward(patcher, inputs)
        theirs = twins.diffusers_forward(twins.diffusers_unet(patcher, family), inputs)
        assert (ours - theirs).abs().max() < TOL, family
    patcher = families.build_model("flux_dev")
    inputs = twins.make_inputs("flux_dev")
    theirs = twins.diffusers_flux_forward(twins.diffusers_flux(patcher), inputs)
    assert (twins.comfy_forward(patcher, inputs) - theirs).abs().max() < TOL


def test_pack_flux_diffusers_file_in_diffusers_equals_comfyui(glue, loras_dir):
    """Flux.1 dev, attention + MLP layers (what the attention_mlp preset trains): the diffusers file (qkv /
    linear1 split into to_q / to_k / to_v / proj_mlp sharing one A) in diffusers' Flux loader, and in
    ComfyUI's stock loader. (diffusers' conversion of kohya Flux files assumes Flux's real width, 3072,
    so the tiny model cannot check that path.)"""
    key_format = "diffusers"
    import diffusers.loaders.lora_pipeline as lp

    train_mod, _, families = glue
    from training.config import TrainConfig

    patcher = families.build_model("flux_dev")
    latents, conditioning = families.make_data("flux_dev")
    config = TrainConfig(steps=2, rank=RANK, alpha=ALPHA, targets="attention_mlp", learning_rate=0.01,
                         training_dtype="fp32", lora_dtype="fp32")  # fmt: skip
    lora, _, _ = train_mod.train(patcher, [latents], [conditioning], config, "[None]", None, "loralab/test")
    gen = torch.Generator().manual_seed(1)
    for key in [k for k in lora if not k.endswith(".alpha")]:
        lora[key] = torch.randn(lora[key].shape, generator=gen) * 0.3
    path, tensors, _ = _save(glue, lora, key_format, loras_dir)
    inputs = twins.make_inputs("flux_dev")
    trained = twins.comfy_forward(_stock(patcher, lora), inputs)
    assert (trained - twins.comfy_forward(patcher, inputs)).abs().max() > 0.1
    assert (twins.comfy_forward(_stock(patcher, tensors), inputs) - trained).abs().max() < TOL  # stock loader

    model = twins.diffusers_flux(patcher)
    mixin = lp.FluxLoraLoaderMixin
    state_dict, alphas, metadata = mixin.lora_state_dict(
        str(path), return_alphas=True, return_lora_metadata=True
    )
    mixin.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=model, metadata=metadata)
    parts = sum(
        len(v) for p, v in lora.file_names["diffusers"].items() if f"diffusion_model.{p}.alpha" in lora
    )
    assert _peft_layers(model) == parts  # every layer, the fused ones as diffusers' parts
    assert (twins.diffusers_flux_forward(model, inputs) - trained).abs().max() < TOL


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("key_format", ["kohya", "diffusers"])
def test_pack_lora_in_diffusers_equals_comfyui(glue, loras_dir, family, key_format):
    patcher, lora = _lora(glue, family)
    path, tensors, metadata = _save(glue, lora, key_format, loras_dir)
    layers = _layers(tensors)
    assert layers == _layers(lora) > 50
    inputs = twins.make_inputs(family)
    base = twins.comfy_forward(patcher, inputs)
    trained = twins.comfy_forward(_stock(patcher, lora), inputs)  # the LORA_MODEL, as the trainer applies it
    assert (trained - base).abs().max() > 0.1  # the LoRA changes the output a lot
    comfy_out = twins.comfy_forward(_applied(glue, patcher, tensors, metadata), inputs)
    assert (comfy_out - trained).abs().max() < TOL
    if key_format == "kohya":  # stock loaders read it the same way
        torch.testing.assert_close(
            twins.comfy_forward(_stock(patcher, tensors), inputs), comfy_out, rtol=0, atol=1e-6
        )

    unet = twins.diffusers_unet(patcher, family)
    _diffusers_apply(family, unet, path)
    assert _peft_layers(unet) == layers  # every layer applied, none left over
    theirs = twins.diffusers_forward(unet, inputs)
    assert (theirs - comfy_out).abs().max() < TOL


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr"])
def test_pack_kohya_file_in_lycoris_equals_comfyui(glue, loras_dir, monkeypatch, algorithm):
    """LyCORIS' kohya network module (what sd-scripts loads with --network_module lycoris.kohya) on the
    diffusers UNet, as A1111 / sd-scripts name SD1.x layers."""
    patcher, lora = _lora(glue, "sd15", algorithm)
    path, tensors, _ = _save(glue, lora, "kohya", loras_dir)
    inputs = twins.make_inputs("sd15")
    comfy_out = twins.comfy_forward(_stock(patcher, tensors), inputs)
    assert (comfy_out - twins.comfy_forward(patcher, inputs)).abs().max() > 0.1
    assert (
        comfy_out - twins.comfy_forward(_stock(patcher, lora), inputs)
    ).abs().max() < TOL  # the file = the LORA_MODEL

    unet = twins.diffusers_unet(patcher, "sd15")
    network = _lycoris_kohya(path, unet, monkeypatch)
    assert len(network.unet_loras) == _layers(tensors)
    theirs = twins.diffusers_forward(unet, inputs)
    assert (theirs - comfy_out).abs().max() < TOL


def _lycoris_kohya(path, unet, monkeypatch):
    """LyCORIS' kohya loader on the diffusers UNet. Its constructor first builds a default network and
    trips over its own defaults on a diffusers UNet (time_embedding.linear_1 matched twice, "duplicated
    lora name"); those default modules are thrown away before the file's are made, so they are switched
    off here. The modules made from the file are LyCORIS' own."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    network, weights = create_network_from_weights(1.0, str(path), None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.load_state_dict(weights)
    return network


def _continue(glue, patcher, name: str, algorithm: str = "LoRA"):
    """One step at the smallest learning rate from an existing file (AdamW's first step moves each
    factor by ~1e-7: the function stays the file's)."""
    train_mod, _, families = glue
    from training.config import TrainConfig

    latents, conditioning = families.make_data("sd15")
    config = TrainConfig(steps=1, rank=RANK, algorithm=algorithm, learning_rate=1e-7, training_dtype="fp32",
                         lora_dtype="fp32")  # fmt: skip
    lora, _, total = train_mod.train(patcher, [latents], [conditioning], config, name, None, "loralab/test")
    return lora, total


def test_peft_file_continues_and_applies_in_comfyui_and_diffusers(glue, loras_dir):
    """A LoRA made with peft on the diffusers UNet and saved by diffusers' save_lora_weights (alpha and a
    per-layer alpha_pattern only in lora_adapter_metadata): the pack applies it as diffusers does,
    continues it, and its diffusers-format result loads back into diffusers with ComfyUI's output."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, _, families = glue
    patcher = families.build_model("sd15")
    inputs = twins.make_inputs("sd15")
    unet = twins.diffusers_unet(patcher, "sd15")
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, alpha_pattern={"proj_out": 2},
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"])  # fmt: skip
    unet.add_adapter(config)
    expected = twins.diffusers_forward(unet, inputs)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        loras_dir, unet_lora_layers=get_peft_model_state_dict(unet), weight_name="from_peft.safetensors",
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )  # fmt: skip
    from training.lorafile import read_lora_file

    tensors, metadata = read_lora_file(loras_dir / "from_peft.safetensors")
    assert "lora_adapter_metadata" in metadata and not any(k.endswith(".alpha") for k in tensors)
    assert (expected - twins.comfy_forward(patcher, inputs)).abs().max() > 0.1
    ours = twins.comfy_forward(_applied(glue, patcher, tensors, metadata), inputs)
    assert (ours - expected).abs().max() < TOL  # every layer, each with its own alpha

    lora, total = _continue(glue, patcher, "from_peft.safetensors")
    assert total == 1
    continued = twins.comfy_forward(_applied(glue, patcher, lora), inputs)
    assert (continued - expected).abs().max() < 1e-3
    path, _, _ = _save(glue, lora, "diffusers", loras_dir)
    fresh = twins.diffusers_unet(patcher, "sd15")
    _diffusers_apply("sd15", fresh, path)
    assert (twins.diffusers_forward(fresh, inputs) - continued).abs().max() < TOL


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr"])
def test_lycoris_file_continues_and_applies_in_comfyui_and_lycoris(glue, loras_dir, monkeypatch, algorithm):
    """A LoHa / LoKr made by LyCORIS' own wrapper (SimpleTuner's "lycoris_" names): the pack applies
    it as LyCORIS does, continues it, and its kohya-format result loads back into LyCORIS with ComfyUI's
    output."""
    from lycoris import create_lycoris

    _, _, families = glue
    patcher = families.build_model("sd15")
    inputs = twins.make_inputs("sd15")
    unet = twins.diffusers_unet(patcher, "sd15")
    network = create_lycoris(unet, 1.0, linear_dim=RANK, linear_alpha=ALPHA, algo=algorithm.lower())
    network.apply_to()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    expected = twins.diffusers_forward(unet, inputs)
    network.save_weights(str(loras_dir / "from_lycoris.safetensors"), torch.float32, {})
    from training.lorafile import read_lora_file

    tensors, metadata = read_lora_file(loras_dir / "from_lycoris.safetensors")
    assert all(k.startswith("lycoris_") for k in tensors)
    assert (expected - twins.comfy_forward(patcher, inputs)).abs().max() > 0.1
    ours = twins.comfy_forward(_applied(glue, patcher, tensors, metadata), inputs)
    assert (ours - expected).abs().max() < TOL

    lora, _ = _continue(glue, patcher, "from_lycoris.safetensors", algorithm)
    continued = twins.comfy_forward(_applied(glue, patcher, lora), inputs)
    assert (continued - expected).abs().max() < 1e-3
    path, saved, _ = _save(glue, lora, "kohya", loras_dir)
    fresh = twins.diffusers_unet(patcher, "sd15")
    network = _lycoris_kohya(path, fresh, monkeypatch)
    assert len(network.unet_loras) == _layers(saved)
    assert (twins.diffusers_forward(fresh, inputs) - continued).abs().max() < TOL


@pytest.mark.parametrize("key_format", ["kohya", "diffusers"])
def test_save_lora_with_model_converts_a_loaded_file_for_other_tools(
    glue, loras_dir, monkeypatch, key_format
):
    """Load LoRA file (a file in ComfyUI's own names) -> Save LoRA with the model connected: the kohya
    file loads in LyCORIS' kohya loader and the diffusers file in diffusers, each with every layer and
    the output the original file gives in ComfyUI. Without the model, kohya keeps ComfyUI's LDM names."""
    _, files, _ = glue
    patcher, lora = _lora(glue, "sd15")
    path, _, _ = _save(glue, lora, "comfyui", loras_dir)
    loaded = files.LoraLab_LoadLora.execute(path.relative_to(loras_dir).as_posix()).result[0]
    inputs = twins.make_inputs("sd15")
    expected = twins.comfy_forward(_stock(patcher, loaded), inputs)

    name = files.LoraLab_SaveLora.execute(loaded, "interop/converted", None, key_format, patcher).result[0]
    from training.lorafile import read_lora_file

    tensors, _ = read_lora_file(loras_dir / name)
    assert not any("input_blocks" in k for k in tensors)
    unet = twins.diffusers_unet(patcher, "sd15")
    if key_format == "kohya":
        assert (
            len(_lycoris_kohya(loras_dir / name, unet, monkeypatch).unet_loras)
            == _layers(tensors)
            == _layers(lora)
        )
    else:
        _diffusers_apply("sd15", unet, loras_dir / name)
        assert _peft_layers(unet) == _layers(tensors) == _layers(lora)
    assert (twins.diffusers_forward(unet, inputs) - expected).abs().max() < TOL

    plain = files.LoraLab_SaveLora.execute(loaded, "interop/plain", None, "kohya").result[0]
    assert any("input_blocks" in k for k in read_lora_file(loras_dir / plain)[0])
