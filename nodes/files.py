"""LoRA Lab file nodes: save a LoRA into the loras folder, load one back, plot a loss history.

ComfyUI V3 nodes.  Only ComfyUI imports this module; the file handling itself lives in
``training/lorafile.py`` and the chart in ``training/plotting.py`` (both ComfyUI-free).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL.PngImagePlugin import PngInfo

from ..lora.inject import KEY_FORMATS, convert_key_format, normalize_file_keys
from ..training.lorafile import (
    LORA_SUFFIX,
    LoraStateDict,
    earlier_steps,
    next_free_path,
    peft_alphas,
    prefix_location,
    read_lora_file,
    safe_prefix,
    save_lora_file,
)
from ..training.plotting import render_loss_plot

log = logging.getLogger("loralab")

CATEGORY = "LoRA Lab"
LORA_MODEL = io.Custom("LORA_MODEL")
LOSS_MAP = io.Custom("LOSS_MAP")

_PREFIX_HELP = (
    "File name prefix; may contain sub-folders separated by '/'. Characters other than letters, digits, "
    "'.', '_', '-' and spaces become '_'. Absolute paths and '..' are refused."
)


def check_prefix(filename_prefix) -> bool | str:
    """validate_inputs helper: a bad prefix fails when the prompt is queued, not after training."""
    if not isinstance(filename_prefix, str):  # linked from another node: checked when it runs
        return True
    try:
        safe_prefix(filename_prefix)
    except ValueError as exc:
        return str(exc)
    return True


def write_new_png(img, target: Path, pnginfo: PngInfo | None) -> bool:
    """img as a PNG at target, created exclusively (never overwriting): False when the name is taken.
    A write that fails leaves nothing behind."""
    try:
        with open(target, "xb") as f:
            try:
                img.save(f, format="PNG", pnginfo=pnginfo, compress_level=4)
            except BaseException:
                f.close()
                with contextlib.suppress(OSError):
                    target.unlink()
                raise
    except FileExistsError:
        return False
    return True


def loras_root() -> Path:
    folders = folder_paths.get_folder_paths("loras")
    if not folders:
        raise RuntimeError(
            "ComfyUI has no 'loras' model folder configured; add one in extra_model_paths.yaml"
        )
    return Path(folders[0]).absolute()


class LoraLab_SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_SaveLora",
            display_name="Save LoRA (LoRA Lab)",
            category=CATEGORY,
            description=(
                "Saves a LoRA/LoHa/LoKr as .safetensors into ComfyUI's loras folder (models/loras), where "
                "LoRA loaders and 'existing LoRA' inputs find it at once. Never overwrites a file; training "
                "metadata travels with it."
            ),
            is_output_node=True,
            inputs=[
                LORA_MODEL.Input("lora", tooltip="The trained adapter weights (LORA_MODEL) to save."),
                io.String.Input(
                    "filename_prefix",
                    default="loralab/my_lora",
                    tooltip=_PREFIX_HELP + " Relative to the loras folder; the file becomes "
                    "<prefix>_<steps>_steps_<counter>.safetensors.",
                ),
                io.Int.Input(
                    "steps",
                    optional=True,
                    force_input=True,
                    min=0,
                    tooltip="Optional: total training steps of this LoRA, written into the file name and "
                    "metadata. Without it, the step count stored in the LoRA's metadata is used.",
                ),
                io.Combo.Input(
                    "key_format",
                    options=list(KEY_FORMATS),
                    default="comfyui",
                    optional=True,
                    tooltip="comfyui: diffusion_model.<module> keys (ComfyUI's own trainer and loaders). "
                    "kohya: lora_unet_ keys as kohya sd-scripts / musubi-tuner write them for the model (SD1.x / SD2: "
                    "diffusers module names, which A1111 / Forge / LyCORIS / diffusers read; SDXL, SD3, Flux, Wan, "
                    "HunyuanVideo, Qwen-Image and the rest: the model's own module names). diffusers: peft names "
                    "(lora_A / lora_B, alpha folded into lora_B) under unet. / transformer. where diffusers has names "
                    "for the model (SD1.x, SD2, SDXL, SD3, Flux with its q / k / v split, AuraFlow, Qwen-Image, "
                    "HiDream), else diffusion_model.<module> as ai-toolkit writes them; LoRA only. ComfyUI reads all "
                    "of them (SD UNet diffusers files through Apply LoRA (LoRA Lab) or existing_lora: stock loaders "
                    "skip their attention layers). A LoRA from Load LoRA file keeps the names it has unless "
                    "'model' is connected.",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Optional: the model the LoRA is for. Needed only to convert a LoRA from Load LoRA file "
                    "(any naming ComfyUI reads) to this model's kohya or diffusers names; a LoRA from the trainer "
                    "already knows them.",
                ),
            ],
            outputs=[
                io.String.Output(
                    "lora_name",
                    display_name="lora_name",
                    tooltip="The saved file's name relative to the loras folder, as LoRA loaders list it.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return check_prefix(filename_prefix)

    @classmethod
    def execute(cls, lora, filename_prefix: str, steps: int | None = None, key_format: str = "comfyui",
                model=None) -> io.NodeOutput:  # fmt: skip
        if not isinstance(lora, Mapping) or len(lora) == 0:
            raise ValueError("Save LoRA: the 'lora' input holds no weights; connect a trainer's lora output")
        if model is not None:
            lora = for_model(model, lora)
        try:
            tensors, format_metadata = convert_key_format(lora, key_format, getattr(lora, "file_names", None))
        except ValueError as exc:
            raise ValueError(f"Save LoRA: {exc}") from exc
        root = loras_root()
        folder, stem = prefix_location(root, filename_prefix)

        metadata = {str(k): str(v) for k, v in (getattr(lora, "metadata", None) or {}).items()}
        metadata.update(format_metadata)
        if key_format == "diffusers" and "ss_network_dim" in metadata:  # alpha is folded into the weights
            metadata["ss_network_alpha"] = metadata["loralab.alpha"] = metadata["ss_network_dim"]
        if steps is not None:
            steps = int(steps)
            metadata["loralab.steps"] = str(steps)
            metadata["ss_steps"] = str(steps)
        else:
            found, source = earlier_steps(metadata, None)
            steps = found if source == "metadata" else None

        path = None
        for _attempt in range(20):  # another save may take the same name between look-up and write
            candidate = next_free_path(folder, stem, steps, LORA_SUFFIX)
            try:
                path = save_lora_file(tensors, candidate, metadata=metadata, overwrite=False)
                break
            except FileExistsError:
                continue
        if path is None:
            raise FileExistsError(
                f"Save LoRA: could not find a free file name for prefix {filename_prefix!r} in {folder}"
            )

        rel = path.relative_to(root).as_posix()
        log.info("LoRA Lab: saved %s (%d tensors)", path, len(lora))
        # Only the name relative to the loras folder: the UI result goes to every websocket client and
        # into /history, which need not learn where the server keeps its files.
        return io.NodeOutput(rel, ui={"loras": [{"filename": rel, "type": "loras"}]})


class LoraLab_LoadLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(LORA_SUFFIX)]
        return io.Schema(
            node_id="LoraLab_LoadLora",
            display_name="Load LoRA file (LoRA Lab)",
            category=CATEGORY,
            description=(
                "Loads a .safetensors LoRA from the loras folder as LORA_MODEL weights with its metadata, and "
                "the number of steps it was trained for. Pickle files (.ckpt/.pt/.bin) are never opened."
            ),
            inputs=[
                io.Combo.Input(
                    "lora_name",
                    options=names,
                    tooltip="A .safetensors file in the loras folder. Keys are kept as stored: LoRA Lab and "
                    "ComfyUI's trainer write 'diffusion_model.<module>' keys; kohya 'lora_unet_' files load "
                    "as they are (ComfyUI's 'Load LoRA Model' applies both).",
                ),
            ],
            outputs=[
                LORA_MODEL.Output(
                    "lora", display_name="lora", tooltip="The LoRA weights with the file's metadata."
                ),
                io.Int.Output(
                    "steps",
                    display_name="steps",
                    tooltip="Steps the LoRA was trained for: from its metadata, else from a '_<N>_steps' "
                    "part of its file name, else 0.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=None):
        # re-run when the file changes on disk under the same name
        path = folder_paths.get_full_path("loras", lora_name) if lora_name else None
        if not path:
            return ""
        try:
            st = os.stat(path)
        except OSError:
            return ""
        return f"{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise FileNotFoundError(
                f"Load LoRA file: {lora_name!r} is not in the loras folders "
                f"({', '.join(folder_paths.get_folder_paths('loras'))}); refresh the node or pick another file"
            )
        tensors, metadata = read_lora_file(path)
        steps, source = earlier_steps(metadata, lora_name)
        if source == "filename":
            log.warning(
                "LoRA Lab: %s has no step count in its metadata; took %d from its file name", lora_name, steps
            )
        elif source == "none":
            log.warning("LoRA Lab: %s records no step count; counting it as 0 steps", lora_name)
        return io.NodeOutput(LoraStateDict(tensors, metadata=metadata), steps)


class LoraLab_PlotLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_PlotLoss",
            display_name="Plot Loss (LoRA Lab)",
            category=CATEGORY,
            description=(
                "Draws the loss history of a training run (raw and smoothed, min and final values marked), "
                "saves it as PNG in the output folder and shows it on the node."
            ),
            is_output_node=True,
            inputs=[
                LOSS_MAP.Input(
                    "loss",
                    tooltip="Loss history (LOSS_MAP, {'loss': [one value per optimizer step]}) from LoRA Lab's "
                    "trainer or ComfyUI's own 'Train LoRA' node; a held-out loss (Validation Set) is drawn too.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="loralab/loss",
                    tooltip=_PREFIX_HELP + " Relative to the output folder.",
                ),
            ],
            outputs=[io.Image.Output("image", display_name="image", tooltip="The chart as an IMAGE.")],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return check_prefix(filename_prefix)

    @classmethod
    def execute(cls, loss, filename_prefix: str) -> io.NodeOutput:
        values = loss.get("loss", []) if isinstance(loss, Mapping) else loss
        if isinstance(values, torch.Tensor):
            values = values.detach().flatten().tolist()
        values = [float(v) for v in (values or [])]
        held_out = []
        if isinstance(loss, Mapping) and loss.get("validation_loss") is not None:  # LoRA Lab's Validation Set
            held_out = [(float(st), float(v)) for st, v in zip(loss.get("validation_step") or [], loss["validation_loss"], strict=False)]
        img = render_loss_plot(values, validation=held_out)

        prefix = safe_prefix(filename_prefix)
        out_dir = folder_paths.get_output_directory()
        full_folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, out_dir, img.width, img.height
        )
        pnginfo = cls._png_metadata(values)
        while True:
            name = f"{stem}_{counter:05}_.png"
            target = Path(full_folder) / name
            try:
                if write_new_png(img, target, pnginfo):
                    break
            except OSError as exc:
                raise OSError(
                    f"Plot Loss: could not write {target}: {exc.strerror or exc}; check that the output folder "
                    "is writable and has free space"
                ) from exc
            counter += 1

        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        image = torch.from_numpy(arr)[None]  # [1, H, W, 3]
        subfolder = subfolder.replace(os.sep, "/") if subfolder else ""
        return io.NodeOutput(
            image, ui={"images": [{"filename": name, "subfolder": subfolder, "type": "output"}]}
        )

    @classmethod
    def _png_metadata(cls, values: list[float]) -> PngInfo | None:
        try:
            from comfy.cli_args import args

            if getattr(args, "disable_metadata", False):
                return None
        except Exception:  # metadata is optional
            pass
        info = PngInfo()
        finite = [v for v in values if v == v and abs(v) != float("inf")]
        info.add_text("loralab.steps", str(len(values)))
        if finite:
            info.add_text("loralab.final_loss", repr(finite[-1]))
            info.add_text("loralab.min_loss", repr(min(finite)))
        hidden = getattr(cls, "hidden", None)
        if hidden is not None:
            if getattr(hidden, "prompt", None) is not None:
                info.add_text("prompt", json.dumps(hidden.prompt))
            extra = getattr(hidden, "extra_pnginfo", None)
            if isinstance(extra, Mapping):
                for key, value in extra.items():
                    info.add_text(str(key), json.dumps(value))
        return info


class LoraLab_ApplyLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_ApplyLora",
            display_name="Apply LoRA (LoRA Lab)",
            category=CATEGORY,
            description=(
                "Applies LORA_MODEL weights (from a trainer or Load LoRA file) to a model at a strength. Reads every "
                "naming ComfyUI's loader reads, plus the attention layers of diffusers / peft SD UNet files (which "
                "stock loaders skip) and the alpha peft keeps in a file's metadata."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the adapter to; it is not changed."),
                LORA_MODEL.Input("lora", tooltip="Adapter weights (LORA_MODEL)."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Multiplier of the adapter's effect; negative values invert it."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A copy of the model with the adapter applied.")],
        )

    @classmethod
    def execute(cls, model, lora, strength: float) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        import comfy.sd

        return io.NodeOutput(comfy.sd.load_lora_for_models(model, None, model_keys(model, lora), strength, 0)[0])


def for_model(model, lora: Mapping) -> LoraStateDict:
    """The LoRA in the model's "diffusion_model.<module>" keys (model_keys), knowing the model's kohya and
    diffusers names for its layers, as a LoRA from the trainer does; metadata kept."""
    from ..lora.inject import find_targets, group_file_keys
    from . import comfy_model as cm

    keys = cm.key_targets(model)
    tensors = model_keys(model, lora, keys)
    layers = find_targets(model.model.diffusion_model)
    groups, _ = group_file_keys(tensors, layers)
    targets = {p: layers[p] for p in groups}
    names = {"kohya": cm.kohya_names(model, targets, cm.lora_key_names(model, keys)),
             "diffusers": cm.diffusers_names(model, targets, keys)}  # fmt: skip
    return LoraStateDict(tensors, metadata=getattr(lora, "metadata", None), file_names=names)


def model_keys(model, lora: Mapping, keys: list | None = None) -> dict:
    """A LoRA in any naming the model's loader maps, in "diffusion_model.<module>" keys, with the alpha of
    a peft file's metadata on its layers; parts of a fused layer become one LoRA of it. Keys that map to
    no layer stay as they are (ComfyUI's loader still applies what it knows). keys: the model's
    comfy_model.key_targets, when the caller has it."""
    from . import comfy_model as cm

    keys = cm.key_targets(model) if keys is None else keys
    return normalize_file_keys(lora, cm.lora_key_names(model, keys), peft_alphas(getattr(lora, "metadata", None)),
                               parts=cm.lora_split_names(model, keys))  # fmt: skip


NODES: list[type[io.ComfyNode]] = [LoraLab_SaveLora, LoraLab_LoadLora, LoraLab_ApplyLora, LoraLab_PlotLoss]
