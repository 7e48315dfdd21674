"""LoRA Lab file nodes: save a LoRA into the loras folder (in any key format), load one back.

ComfyUI V3 nodes.  Only ComfyUI imports this module; the file handling itself lives in
``training/lorafile.py``, ``training/file_names.py`` and ``training/safe_write.py`` (ComfyUI-free).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import folder_paths
from comfy_api.latest import io
from PIL.PngImagePlugin import PngInfo

from ..lora.inject import KEY_FORMATS, convert_key_format
from ..training.file_names import earlier_steps, next_free_path, prefix_location, safe_prefix
from ..training.lorafile import LORA_SUFFIX, LoraStateDict, read_lora_file, save_lora_file
from ..training.safe_write import create_exclusive
from .apply_lora import for_model

log = logging.getLogger("loralab")

CATEGORY = "LoRA Lab"
LORA_MODEL = io.Custom("LORA_MODEL")
LOSS_MAP = io.Custom("LOSS_MAP")

PREFIX_HELP = (
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
    return create_exclusive(target, lambda f: img.save(f, format="PNG", pnginfo=pnginfo, compress_level=4))


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
                    tooltip=PREFIX_HELP + " Relative to the loras folder; the file becomes "
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


NODES: list[type[io.ComfyNode]] = [LoraLab_SaveLora, LoraLab_LoadLora]
