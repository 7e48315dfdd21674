"""existing_lora reads LoRA files in the namings other tools write, through ComfyUI's own key map for
the loaded model: kohya names of both SD namings, diffusers / peft (lora_A / lora_B, alpha in
``lora_adapter_metadata``), LyCORIS ``lycoris_``. The same adapter renamed each way loads back to the
same weights and alpha; a file for another model names a file key and an expected key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

CPU = torch.device("cpu")
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def glue(comfy_glue, cm, families):
    return comfy_glue("train"), cm, families


def _trained(glue, family):
    """A rank-4, alpha-2 LoRA of the family's tiny model with non-zero factors (3 steps)."""
    train_mod, _, families = glue
    from training.config import TrainConfig

    patcher = families.build_model(family)
    latents, conditioning = families.make_data(family)
    config = TrainConfig(steps=3, rank=RANK, alpha=ALPHA, learning_rate=0.01, training_dtype="fp32", lora_dtype="fp32")
    lora, _, _ = train_mod.train(patcher, [latents], [conditioning], config, "[None]", None, "loralab/test")
    return patcher, lora


def _renamed(sd: dict, stems: dict, peft: bool) -> tuple[dict, dict]:
    """Our "diffusion_model.<path>.<suffix>" keys written the way another tool names them."""
    out, meta = {}, {}
    for key, value in sd.items():
        suffix = next(s for s in ("lora_down.weight", "lora_up.weight", "alpha") if key.endswith("." + s))
        stem = stems[key.removeprefix("diffusion_model.")[: -len(suffix) - 1]]
        if peft:  # factors as lora_A / lora_B, alpha only in the metadata
            if suffix == "alpha":
                continue
            suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[suffix]
        out[f"{stem}.{suffix}"] = value.contiguous()
    if peft:
        meta["lora_adapter_metadata"] = json.dumps({"r": RANK, "lora_alpha": ALPHA})
    return out, meta


def _pick(names: dict, paths, test) -> dict:
    """For each module path, a file stem of ComfyUI's key map for which test(stem, path) holds."""
    out = {}
    for stem, path in names.items():
        if path in paths and path not in out and test(stem, path):
            out[path] = stem
    assert set(out) == set(paths), sorted(set(paths) - set(out))[:5]
    return out


def _ldm_kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


STYLES = {
    # style: (family, which of the key map's names, peft factor names)
    # kohya sd-scripts / LyCORIS / A1111 names for SD1.x: diffusers module paths (down_blocks_0_...)
    "kohya_sd_diffusers_names": ("sd15", lambda s, p: s.startswith("lora_unet_") and s != _ldm_kohya(p), False),
    "peft_unet": ("sd15", lambda s, p: s.startswith("unet."), True),
    "lycoris": ("sd15", lambda s, p: s.startswith("lycoris_"), False),
    "kohya_flux": ("flux_dev", lambda s, p: s == _ldm_kohya(p), False),
    "peft_wan": ("wan21_t2v", lambda s, p: s.startswith("diffusion_model."), True),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_foreign_naming_continues_with_the_same_weights_and_alpha(glue, loras_dir, style):
    train_mod, cm, _ = glue
    family, test, peft = STYLES[style]
    patcher, ours = _trained(glue, family)
    names = cm.lora_key_names(patcher)
    paths = {k.removeprefix("diffusion_model.")[: -len(".alpha")] for k in ours if k.endswith(".alpha")}
    tensors, meta = _renamed(ours, _pick(names, paths, test), peft)
    save_file(tensors, str(loras_dir / f"{style}.safetensors"), metadata=meta)

    from training.config import TrainConfig

    config = TrainConfig(rank=RANK, alpha=ALPHA, training_dtype="fp32", lora_dtype="fp32")
    start = train_mod._Start.read(f"{style}.safetensors", config, names)
    loaded = {k: v for k, v in start.weights.items() if k.startswith("diffusion_model.")}
    assert set(loaded) == set(ours), sorted(set(ours) ^ set(loaded))[:6]
    for key, value in ours.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), rtol=0, atol=0, msg=key)


def test_file_for_another_model_names_a_file_key_and_an_expected_key(glue, loras_dir):
    train_mod, cm, families = glue
    from lora.inject import find_targets
    from training.config import TrainConfig

    _, sd15 = _trained(glue, "sd15")
    save_file({k: v.contiguous() for k, v in sd15.items()}, str(loras_dir / "sd15.safetensors"))
    flux = families.build_model("flux_dev")
    config = TrainConfig(rank=RANK, training_dtype="fp32", lora_dtype="fp32")
    start = train_mod._Start.read("sd15.safetensors", config, cm.lora_key_names(flux))
    targets = find_targets(flux.model.diffusion_model)
    with pytest.raises(ValueError, match=r"0 matched; a file key: 'diffusion_model\.\S+', a key this model expects: "
                                         r"'diffusion_model\.\S+\.lora_up\.weight'"):
        train_mod._load_existing(None, start.weights, targets, "sd15.safetensors", config, CPU)


@pytest.mark.parametrize("family,diffusers_names", [("sd15", True), ("sd2_v", True), ("sdxl", False), ("flux_dev", False)])
def test_kohya_format_uses_the_names_kohya_writes_and_comfyui_maps_every_layer(glue, family, diffusers_names):
    """SD1.x / SD2: diffusers module names (lora_unet_down_blocks_0_attentions_0_proj_in), which kohya
    sd-scripts, LyCORIS, A1111 and diffusers read; SDXL and Flux: the model's own names."""
    import comfy.lora

    from lora.inject import convert_key_format

    patcher, lora = _trained(glue, family)
    assert bool(lora.file_names["kohya"]) == diffusers_names
    tensors, _ = convert_key_format(lora, "kohya", lora.file_names)
    assert len(tensors) == len(lora) and all(k.startswith("lora_unet_") for k in tensors)
    ldm = any(part in k for k in tensors for part in ("input_blocks", "output_blocks", "middle_block"))
    if diffusers_names:
        assert not ldm and any("down_blocks" in k for k in tensors), sorted(tensors)[:4]
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    layers = {k.rsplit(".", 2)[0] for k in lora if k.endswith("lora_up.weight")}
    assert len(patches) == len(layers)  # every layer mapped: no "lora key not loaded"


def test_continuing_keeps_the_files_alpha_for_every_layer_and_in_the_metadata(glue, loras_dir):
    """A rank-4, alpha-2 file holding half of the layers, continued with alpha left at its default:
    the layers it lacked get alpha 2 as well, and the metadata says 2 (it said 4 = rank before)."""
    train_mod, _, families = glue
    from training.config import TrainConfig

    patcher, ours = _trained(glue, "sd3")
    layers = sorted({k.removeprefix("diffusion_model.")[: -len(".alpha")] for k in ours if k.endswith(".alpha")})
    kept = set(layers[::2])
    half = {k: v.contiguous() for k, v in ours.items() if any(k.startswith(f"diffusion_model.{p}.") for p in kept)}
    save_file(half, str(loras_dir / "half.safetensors"), metadata={"ss_steps": "3"})
    latents, conditioning = families.make_data("sd3")
    config = TrainConfig(steps=1, rank=RANK, training_dtype="fp32", lora_dtype="fp32")
    lora, _, total = train_mod.train(patcher, [latents], [conditioning], config, "half.safetensors", None, "loralab/test")
    alphas = {k: float(v) for k, v in lora.items() if k.endswith(".alpha")}
    assert len(alphas) == len(layers) and set(alphas.values()) == {ALPHA}
    assert lora.metadata["ss_network_alpha"] == lora.metadata["loralab.alpha"] == "2" and total == 4
