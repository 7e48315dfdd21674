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
def glue(comfy_glue, families):
    return comfy_glue("train"), comfy_glue("lora_keys"), families


def _trained(glue, family):
    """A rank-4, alpha-2 LoRA of the family's tiny model with non-zero factors (3 steps)."""
    train_mod, _, families = glue
    from training.config import TrainConfig

    patcher = families.build_model(family)
    latents, conditioning = families.make_data(family)
    config = TrainConfig(
        steps=3, rank=RANK, alpha=ALPHA, learning_rate=0.01, training_dtype="fp32", lora_dtype="fp32"
    )
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
    "kohya_sd_diffusers_names": (
        "sd15",
        lambda s, p: s.startswith("lora_unet_") and s != _ldm_kohya(p),
        False,
    ),
    "peft_unet": ("sd15", lambda s, p: s.startswith("unet."), True),
    "lycoris": ("sd15", lambda s, p: s.startswith("lycoris_"), False),
    "kohya_flux": ("flux_dev", lambda s, p: s == _ldm_kohya(p), False),
    "peft_wan": ("wan21_t2v", lambda s, p: s.startswith("diffusion_model."), True),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_foreign_naming_continues_with_the_same_weights_and_alpha(glue, loras_dir, style):
    train_mod, lora_keys, _ = glue
    family, test, peft = STYLES[style]
    patcher, ours = _trained(glue, family)
    names = lora_keys.lora_key_names(patcher)
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
    train_mod, lora_keys, families = glue
    from lora.inject import find_targets
    from training.config import TrainConfig

    _, sd15 = _trained(glue, "sd15")
    save_file({k: v.contiguous() for k, v in sd15.items()}, str(loras_dir / "sd15.safetensors"))
    flux = families.build_model("flux_dev")
    config = TrainConfig(rank=RANK, training_dtype="fp32", lora_dtype="fp32")
    start = train_mod._Start.read("sd15.safetensors", config, lora_keys.lora_key_names(flux))
    targets = find_targets(flux.model.diffusion_model)
    with pytest.raises(
        ValueError,
        match=r"0 matched; a file key: 'diffusion_model\.\S+', a key this model expects: "
        r"'diffusion_model\.\S+\.lora_up\.weight'",
    ):
        train_mod._load_existing(None, start.weights, targets, "sd15.safetensors", config, CPU)


@pytest.mark.parametrize(
    "family,diffusers_names", [("sd15", True), ("sd2_v", True), ("sdxl", False), ("flux_dev", False)]
)
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
    layers = sorted(
        {k.removeprefix("diffusion_model.")[: -len(".alpha")] for k in ours if k.endswith(".alpha")}
    )
    kept = set(layers[::2])
    half = {
        k: v.contiguous() for k, v in ours.items() if any(k.startswith(f"diffusion_model.{p}.") for p in kept)
    }
    save_file(half, str(loras_dir / "half.safetensors"), metadata={"ss_steps": "3"})
    latents, conditioning = families.make_data("sd3")
    config = TrainConfig(steps=1, rank=RANK, training_dtype="fp32", lora_dtype="fp32")
    lora, _, total = train_mod.train(
        patcher, [latents], [conditioning], config, "half.safetensors", None, "loralab/test"
    )
    alphas = {k: float(v) for k, v in lora.items() if k.endswith(".alpha")}
    assert len(alphas) == len(layers) and set(alphas.values()) == {ALPHA}
    assert lora.metadata["ss_network_alpha"] == lora.metadata["loralab.alpha"] == "2" and total == 4


def _delta(sd: dict, path: str) -> torch.Tensor:
    """ΔW of one LoRA layer of our keys: up @ down * alpha / rank."""
    down, up = (
        sd[f"diffusion_model.{path}.lora_down.weight"].float(),
        sd[f"diffusion_model.{path}.lora_up.weight"].float(),
    )
    alpha = float(sd.get(f"diffusion_model.{path}.alpha", down.shape[0]))
    return up @ down * (alpha / down.shape[0])


def test_flux_diffusers_file_continues_as_one_lora_per_fused_layer(glue, loras_dir):
    """key_format diffusers splits Flux's fused qkv / linear1 into diffusers' to_q / to_k / to_v (/ proj_mlp)
    with one shared A; existing_lora reads the parts back as one LoRA of the fused layer with the same ΔW
    (rank kept), so nothing of the file is left over as untrainable carried keys."""
    train_mod, lora_keys, _ = glue
    from lora.inject import convert_key_format
    from training.config import TrainConfig

    patcher, lora = _trained(glue, "flux_dev")
    gen = torch.Generator().manual_seed(3)
    for key in [k for k in lora if not k.endswith(".alpha")]:
        lora[key] = torch.randn(lora[key].shape, generator=gen)
    tensors, meta = convert_key_format(lora, "diffusers", lora.file_names)
    split = [
        k
        for k in tensors
        if k.startswith("transformer.single_transformer_blocks.0.attn.to_") and "lora_B" in k
    ]
    assert len(split) == 3 and not any(k.endswith(".alpha") for k in tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(loras_dir / "flux_diffusers.safetensors"),
        metadata=meta,
    )

    config = TrainConfig(rank=RANK, training_dtype="fp32", lora_dtype="fp32")
    start = train_mod._Start.read(
        "flux_diffusers.safetensors",
        config,
        lora_keys.lora_key_names(patcher),
        lora_keys.lora_split_names(patcher),
    )
    factors = {k for k in start.weights if not k.endswith(".alpha")}
    assert factors == {k for k in lora if not k.endswith(".alpha")}  # every layer, and nothing left over
    paths = {k.removeprefix("diffusion_model.")[: -len(".alpha")] for k in lora if k.endswith(".alpha")}
    for path in paths:
        assert start.weights[f"diffusion_model.{path}.lora_down.weight"].shape[0] == RANK, path
        torch.testing.assert_close(
            _delta(start.weights, path), _delta(lora, path), rtol=1e-5, atol=1e-5, msg=path
        )


def test_split_parts_with_their_own_factors_and_alphas_merge_exactly(glue):
    """Parts with different A's and alphas (a file trained on diffusers' Flux, which has separate q / k / v
    layers): A's stacked, B block-diagonal, each part's scale folded in; rows no part covers stay zero."""
    _, lora_keys, families = glue
    from lora.inject import merge_split_layers

    patcher = families.build_model("flux_dev")
    parts = {
        s: v
        for s, v in lora_keys.lora_split_names(patcher).items()
        if s.startswith("transformer.single_transformer_blocks.0.")
    }
    gen = torch.Generator().manual_seed(4)
    sd, expected = {}, None
    for i, stem in enumerate(sorted(parts)[:3]):  # three of the four parts: the fourth's rows stay zero
        path, (start, end), size = parts[stem]
        rank = 2 + i
        down, up = torch.randn(rank, 64, generator=gen), torch.randn(end - start, rank, generator=gen)
        sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(1.0 + i)
        expected = torch.zeros(size, 64) if expected is None else expected
        expected[start:end] += up @ down * ((1.0 + i) / rank)
    merged = merge_split_layers(sd, parts)
    assert set(merged) == {
        f"diffusion_model.{path}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert merged[f"diffusion_model.{path}.lora_down.weight"].shape[0] == 2 + 3 + 4
    torch.testing.assert_close(_delta(merged, path), expected, rtol=1e-5, atol=1e-5)
