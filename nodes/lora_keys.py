"""ComfyUI's LoRA key map of a model, read once per run: which file names (kohya, diffusers / peft,
LyCORIS, ComfyUI's own) its loader maps onto which module, which fused layers other tools split into
parts, and the names the pack writes for kohya and diffusers files."""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("loralab")


def key_targets(patcher) -> list[tuple[str, str, tuple[int, int] | None]]:
    """ComfyUI's LoRA key map for this model, read once: (file stem, module path relative to the
    diffusion model, the rows of the layer's output the name covers, None for all of them) for every
    name that addresses a weight of the diffusion model, whole or as a part of a fused weight; empty on
    a ComfyUI without the map (feature-detected). The naming functions below take it, so a caller
    that needs several of them builds the map once."""
    try:
        import comfy.lora

        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    except (ImportError, AttributeError):
        return []
    prefix, suffix = "diffusion_model.", ".weight"
    out = []
    for stem, target in key_map.items():
        if isinstance(target, str):
            key, rows = target, None
        elif (isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str)
              and isinstance(target[1], tuple) and len(target[1]) == 3 and target[1][0] == 0):  # fmt: skip
            key, (_, offset, size) = target
            rows = (int(offset), int(offset) + int(size))
        else:  # a part along another dimension, or through a function: not a LoRA of ours
            continue
        if key.startswith(prefix) and key.endswith(suffix):
            out.append((stem, key[len(prefix) : -len(suffix)], rows))
    return out


def _unet_diffusers_paths(patcher) -> dict[str, list[str]]:
    """Module path -> diffusers' module path(s), for UNet models (SD1.x, SD2, SDXL), from ComfyUI's own
    UNet-to-diffusers table; empty for every other model. The one the writer uses comes first: the table
    names SDXL's label embedder both "add_embedding" (diffusers' SDXL) and "class_embedding" (SD2 unCLIP)."""
    config = getattr(patcher.model.model_config, "unet_config", None) or {}
    if "num_res_blocks" not in config:
        return {}
    try:
        import comfy.utils

        table = comfy.utils.unet_to_diffusers(config)
    except Exception:  # feature-detected: a ComfyUI without the table, or a UNet variant it does not know
        return {}
    import comfy.model_base as mb

    sdxl = isinstance(patcher.model, tuple(getattr(mb, n) for n in ("SDXL", "SDXLRefiner") if hasattr(mb, n)))
    first = "add_embedding." if sdxl else "class_embedding."
    w = ".weight"
    out: dict[str, list[str]] = {}
    for theirs, ours in table.items():
        if isinstance(ours, str) and theirs.endswith(w) and ours.endswith(w):
            names = out.setdefault(ours[: -len(w)], [])
            names.insert(0 if theirs.startswith(first) else len(names), theirs[: -len(w)])
    return out


def lora_key_names(patcher, keys: list | None = None) -> dict[str, str]:
    """File stem -> module path (relative to the diffusion model) for every LoRA naming ComfyUI's own
    loader maps onto this model (its key map: kohya names of both SD namings, diffusers / peft
    "unet." / "transformer.", LyCORIS "lycoris_", ...), plus the attention names diffusers and peft
    write today for UNets ("unet.<...>.attn1.to_q"; ComfyUI's map has only the old
    "attn1.processor.to_q"). Names that address a slice of a fused layer (diffusers' separate q / k / v
    of Flux's qkv) are left out: they cannot become one adapter (see lora_split_names).
    keys: key_targets(patcher), when the caller has it."""
    keys = key_targets(patcher) if keys is None else keys
    out = {stem: path for stem, path, rows in keys if rows is None}
    for path, names in _unet_diffusers_paths(patcher).items():
        for theirs in names:
            out.setdefault(theirs, path)
            out.setdefault("unet." + theirs, path)
    return out


def lora_split_names(patcher, keys: list | None = None) -> dict[str, tuple[str, tuple[int, int], int]]:
    """File stem -> (module path, its rows of the layer's output, the layer's output size) for the names
    ComfyUI's key map gives as a part of a fused layer (diffusers' / OneTrainer's / SimpleTuner's
    separate q / k / v / mlp of Flux's fused projections); see lora.inject.merge_split_layers.
    keys: key_targets(patcher), when the caller has it."""
    keys = key_targets(patcher) if keys is None else keys
    diffusion = patcher.model.diffusion_model
    out: dict[str, tuple[str, tuple[int, int], int]] = {}
    for stem, path, rows in keys:
        if rows is None:
            continue
        try:
            weight = diffusion.get_submodule(path).weight
        except AttributeError:
            continue
        out[stem] = (path, rows, int(weight.shape[0]))
    return out


def diffusers_names(
    patcher, targets: Mapping[str, tuple], keys: list | None = None
) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """Module path -> the peft / diffusers module names a diffusers-format file uses for it, each with
    the rows of the layer's output it covers (None: all of them). UNets: "unet." + diffusers' module
    path. Other models: ComfyUI's "transformer." names for the layer, and where diffusers splits a fused
    layer (Flux's qkv, single blocks' linear1), its parts when they cover the output exactly. Layers
    with no such name are left out (the writer keeps "diffusion_model.<path>" for them).
    targets: path -> (weight shape, conv spec); keys: key_targets(patcher), when the caller has it."""
    unet = _unet_diffusers_paths(patcher)
    if unet:
        return {p: [("unet." + unet[p][0], None)] for p in targets if p in unet}
    keys = key_targets(patcher) if keys is None else keys
    whole: dict[str, str] = {}
    parts: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    for stem, path, rows in keys:
        if not stem.startswith("transformer.") or path not in targets:
            continue
        if rows is None:
            whole.setdefault(path, stem)
        else:
            parts.setdefault(path, []).append((stem, rows))
    out: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
    for path in targets:
        split = sorted(parts.get(path, []), key=lambda item: item[1])
        ends = [0] + [end for _, (_, end) in split]
        if (
            split
            and all(start == ends[i] for i, (_, (start, _)) in enumerate(split))
            and ends[-1] == targets[path][0][0]
        ):
            out[path] = list(split)
        elif path in whole:
            out[path] = [(whole[path], None)]
    return out


def kohya_names(patcher, paths, key_names: dict[str, str]) -> dict[str, str]:
    """Module path -> the "lora_unet_" stem kohya sd-scripts writes for it, from ComfyUI's key map.
    sd-scripts names layers after the implementation it trains: diffusers' UNet for SD1.x / SD2
    ("lora_unet_down_blocks_0_attentions_0_proj_in", which A1111, LyCORIS and diffusers read too), its
    own copies of the original code for SDXL, SD3 and Flux (the names ComfyUI uses). Empty, so the
    original names, for every model that is not an SD1.x / SD2 UNet. key_names: lora_key_names(patcher)."""
    import comfy.supported_models as sm

    sd1_or_2 = tuple(getattr(sm, n) for n in ("SD15", "SD20") if hasattr(sm, n))
    if not isinstance(patcher.model.model_config, sd1_or_2):
        return {}
    wanted = set(paths)
    out: dict[str, str] = {}
    for stem, path in key_names.items():
        if path in wanted and stem.startswith("lora_unet_") and stem != "lora_unet_" + path.replace(".", "_"):
            out.setdefault(path, stem)
    return out
