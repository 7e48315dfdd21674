"""Sample previews while training, rendered by ComfyUI's own KSampler path on the model with the
adapter applied the way the saved file is applied.

``LoraLab_PreviewSettings`` describes the previews (prompt, sampler, size, seed, how often); its output
goes into the ``preview`` input of Training Options. The trainer calls :class:`Previewer` before the
first step, every ``every_n_steps`` and after the last step. Each preview:

- builds the step's LORA_MODEL exactly as Save LoRA / a checkpoint would write it, and applies it to a
  clone of the MODEL the trainer was given with ComfyUI's loader (``load_lora_for_models``), not to the
  training clone (whose attention and compute dtype are set for training);
- samples with ComfyUI's ``common_ksampler`` (the KSampler node's own function) on an empty latent
  from ``EmptyLatentImage``, under inference mode as ComfyUI runs nodes: the same latent a KSampler on
  the checkpoint file renders;
- decodes with the VAE when one is given, else ComfyUI's latent-to-RGB preview of the model's latent
  format; saves ``<prefix>/step_<N>_<i>.png`` in the output folder (step and workflow in the PNG's
  text chunks), shows the image on the trainer node (ComfyUI's progress preview) and sends a
  ``loralab.preview`` websocket event with the file names.

Training state is not touched: the trainer pauses its adapter hooks around a preview and reloads its
clone afterwards; the sampler's own random state is seeded from the preview seed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import comfy.samplers
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..training.file_names import safe_prefix
from ..training.safe_write import create_exclusive
from .events import send_preview
from .files import check_prefix, write_new_png

log = logging.getLogger("loralab")

PREVIEW_TYPE = "LORALAB_PREVIEW"


@dataclass(frozen=True)
class PreviewSettings:
    positive: list
    negative: list | None
    vae: object | None
    every_n_steps: int
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    width: int
    height: int
    lora_strength: float
    filename_prefix: str
    # the empty latent to sample (a video model's, with frames); None: width x height
    latent: dict | None = None


class LoraLab_PreviewSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_PreviewSettings",
            display_name="Preview Settings (LoRA Lab)",
            category="LoRA Lab",
            description=(
                "Sample previews during training, rendered by ComfyUI's own KSampler on the model with the LoRA as it "
                "would be saved at that step: what you see is what the saved file renders. Connect to the preview "
                "input of Training Options (LoRA Lab)."
            ),
            inputs=[
                io.Conditioning.Input(
                    "positive",
                    tooltip="The preview prompt (CLIP Text Encode); a conditioning of batch N (N prompts, e.g. a dataset's) renders N images per preview.",
                ),
                io.Int.Input(
                    "every_n_steps",
                    default=50,
                    min=0,
                    max=100000,
                    tooltip="A preview every N optimizer steps, plus before the first and after the last step; 0: only those two.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Noise seed: the same for every preview, so they compare.",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Classifier-free guidance (1.0: the negative prompt is not used).",
                ),
                io.Combo.Input(
                    "sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"
                ),
                io.Combo.Input(
                    "scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple"
                ),
                io.Int.Input(
                    "width",
                    default=512,
                    min=16,
                    max=16384,
                    step=8,
                    tooltip="Image width in pixels (an empty latent of width / 8).",
                ),
                io.Int.Input(
                    "height", default=512, min=16, max=16384, step=8, tooltip="Image height in pixels."
                ),
                io.Float.Input(
                    "lora_strength",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Strength the LoRA is applied with.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="loralab/previews",
                    tooltip="Folder / prefix in the output folder: <prefix>/step_<N>_<i>.png.",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Optional negative prompt; without one, the positive zeroed out.",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="Optional VAE to decode previews; without one, ComfyUI's latent-to-RGB preview.",
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Optional empty latent to sample instead of width x height: a video model's, with its "
                    "frames (EmptyHunyuanLatentVideo, Wan22ImageToVideoLatent, EmptyLTXVLatentVideo ...). Videos are "
                    "saved as animated WEBP.",
                ),
            ],
            outputs=[
                io.Custom(PREVIEW_TYPE).Output(
                    display_name="preview", tooltip="Connect to Training Options' preview input."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return check_prefix(filename_prefix)

    @classmethod
    def execute(cls, positive, every_n_steps, seed, steps, cfg, sampler_name, scheduler, width, height, lora_strength,
                filename_prefix, negative=None, vae=None, latent=None) -> io.NodeOutput:  # fmt: skip
        safe_prefix(filename_prefix)
        return io.NodeOutput(PreviewSettings(positive, negative, vae, every_n_steps, seed, steps, cfg, sampler_name,
                                             scheduler, width, height, lora_strength, filename_prefix, latent))  # fmt: skip


def comfy_nodes():
    """ComfyUI's own nodes.py (KSampler's common_ksampler, EmptyLatentImage) of the ComfyUI whose comfy
    package is running: the module the server loaded, or loaded from that tree where a bare "nodes"
    is another package (tests)."""
    import comfy.sd

    root = Path(comfy.sd.__file__).resolve().parents[1]  # comfy is a namespace package: no __file__
    for name in ("nodes", "loralab_comfy_nodes"):
        mod = sys.modules.get(name)
        where = getattr(mod, "__file__", None)
        if hasattr(mod, "common_ksampler") and where and Path(where).resolve().parent == root:
            return mod
    spec = importlib.util.spec_from_file_location("loralab_comfy_nodes", root / "nodes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["loralab_comfy_nodes"] = mod
    spec.loader.exec_module(mod)
    return mod


def _zero_out(conditioning: list) -> list:
    """A negative of the positive's shape with zeros (what ConditioningZeroOut gives)."""
    out = []
    for tensor, opts in conditioning:
        opts = dict(opts)
        if opts.get("pooled_output") is not None:
            opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
        out.append([torch.zeros_like(tensor), opts])
    return out


def latent_to_rgb(model, samples: torch.Tensor) -> list[Image.Image]:
    """ComfyUI's latent-to-RGB preview of the model's latent format, one image per latent; a grey
    view of the first channels where the format has no RGB factors."""
    import latent_preview

    fmt = model.model.latent_format
    factors = getattr(fmt, "latent_rgb_factors", None)
    images = []
    for i in range(samples.shape[0]):
        x0 = samples[i : i + 1].float().cpu()
        if factors is not None:
            try:
                previewer = latent_preview.Latent2RGBPreviewer(factors, getattr(fmt, "latent_rgb_factors_bias", None),
                                                               getattr(fmt, "latent_rgb_factors_reshape", None))  # fmt: skip
            except TypeError:  # older signature
                previewer = latent_preview.Latent2RGBPreviewer(factors)
            images.append(previewer.decode_latent_to_preview(x0).convert("RGB"))
            continue
        grey = x0[0, :3] if x0.ndim == 4 else x0[0, :3, 0]
        grey = ((grey - grey.min()) / (grey.max() - grey.min() + 1e-8) * 255).byte().permute(1, 2, 0).numpy()
        images.append(Image.fromarray(np.ascontiguousarray(grey)).convert("RGB"))
    return images


def _write_webp(f, frames: list[Image.Image], step: int) -> None:
    """An animated WEBP of the frames (lossless, 16 fps as ComfyUI's video previews), the step in its XMP."""
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><loralab step="{step}"/></x:xmpmeta>'.encode()
    frames[0].save(f, format="WEBP", save_all=True, append_images=frames[1:], duration=1000 // 16, loop=0,
                   lossless=True, xmp=xmp)  # fmt: skip


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """The images in one row (one preview step's grid), on black where heights differ."""
    width, height = sum(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (width, height))
    x = 0
    for im in images:
        grid.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return grid


def grid_batch(grids: list[Image.Image]) -> torch.Tensor:
    """uint8 [steps, H, W, 3] of the steps' grids (what LOSS_MAP's preview_images holds; a smaller
    grid is padded with black to the largest)."""
    height, width = max(g.height for g in grids), max(g.width for g in grids)
    out = torch.zeros(len(grids), height, width, 3, dtype=torch.uint8)
    for i, g in enumerate(grids):
        out[i, : g.height, : g.width] = torch.from_numpy(np.asarray(g.convert("RGB")).copy())
    return out


class Previewer:
    """Renders the previews of one training run (see the module doc)."""

    def __init__(
        self, settings: PreviewSettings, model, node_id=None, prompt: Mapping | None = None, show=None
    ):
        self.settings, self.model, self.node_id, self.prompt = settings, model, node_id, prompt
        self.show = show  # show(PIL image): the image on the trainer node (its progress preview)
        self.seconds = 0.0  # time spent in previews (kept out of steps/s)
        self.rendered: set[int] = set()
        self.last: dict[int, torch.Tensor] = {}  # step -> sampled latent (tests compare it with KSampler)
        self.grids: dict[int, Image.Image] = {}  # step -> the step's images side by side

    def due(self, step: int, total: int) -> bool:
        every = self.settings.every_n_steps
        return step not in self.rendered and (step == 0 or step == total or (every > 0 and step % every == 0))

    def render(self, step: int, lora: Mapping[str, torch.Tensor], start_step: int = 0) -> list[str]:
        """One preview at `step` with `lora` (the LORA_MODEL as it would be saved); returns the saved
        files' names relative to the output folder."""
        t0 = time.perf_counter()
        s = self.settings
        try:
            import comfy.sd

            nodes_mod = comfy_nodes()
            with torch.inference_mode():
                model = (
                    comfy.sd.load_lora_for_models(self.model, None, lora, s.lora_strength, 0)[0]
                    if lora
                    else self.model
                )
                if s.latent is not None:  # the user's own empty latent (a video model's, with frames)
                    latent = s.latent
                else:  # one image per prompt: a positive of batch N (N prompts, as a dataset's conditioning is)
                    batch = max((int(c[0].shape[0]) for c in s.positive), default=1)
                    latent = nodes_mod.EmptyLatentImage().generate(s.width, s.height, batch)[0]
                negative = s.negative if s.negative is not None else _zero_out(s.positive)
                out = nodes_mod.common_ksampler(model, s.seed, s.steps, s.cfg, s.sampler_name, s.scheduler, s.positive,
                                                negative, latent)[0]["samples"]  # fmt: skip
                self.last[step] = out.detach().clone()
                videos = self._decode(model, out)  # per sample: its frames (one for an image)
            names = [self._save(frames, step, i) for i, frames in enumerate(videos)]
            pil = [frames[0] for frames in videos]
            self.grids[step] = side_by_side(pil)
        finally:
            self.seconds += time.perf_counter() - t0
        self.rendered.add(step)
        self._announce(step, names, pil[0] if pil else None)
        return names

    def _decode(self, model, out: torch.Tensor) -> list[list[Image.Image]]:
        """The sampled latents as pictures: per sample its frames (a video latent [B, C, T, H, W] has T
        frames' worth), through the VAE when there is one, else ComfyUI's latent-to-RGB preview."""
        if self.settings.vae is not None:
            decoded = self.settings.vae.decode(out)  # [B, H, W, C], or [B, T, H, W, C] for a video VAE
            if decoded.ndim == 4:
                decoded = decoded.unsqueeze(1)
            return [
                [
                    Image.fromarray(np.clip(255.0 * f.float().cpu().numpy(), 0, 255).astype(np.uint8))
                    for f in video
                ]
                for video in decoded
            ]
        if out.ndim == 5:  # latent frames, each previewed as an image latent
            return [latent_to_rgb(model, out[b].transpose(0, 1)) for b in range(out.shape[0])]
        return [[img] for img in latent_to_rgb(model, out)]

    def _save(self, frames: list[Image.Image], step: int, index: int) -> str:
        """<output>/<prefix>/step_<N>_<i>.png (an animated .webp for several frames), created exclusively
        (a free name with a counter if taken); a failed write leaves nothing behind."""
        prefix = safe_prefix(self.settings.filename_prefix)
        folder = Path(folder_paths.get_output_directory()) / prefix
        folder.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text("loralab.step", str(step))
        if self.prompt is not None:
            info.add_text("prompt", json.dumps(self.prompt))
        ext = ".png" if len(frames) == 1 else ".webp"
        for n in range(10_000):
            name = f"step_{step}_{index}{ext}" if n == 0 else f"step_{step}_{index}_{n}{ext}"
            if len(frames) == 1:
                written = write_new_png(frames[0], folder / name, info)
            else:
                written = create_exclusive(folder / name, lambda f: _write_webp(f, frames, step))
            if written:
                return f"{prefix}/{name}"
        raise FileExistsError(f"Preview Settings: no free file name for step {step} in {folder}")

    def _announce(self, step: int, names: list[str], first: Image.Image | None) -> None:
        """The preview on the trainer node (ComfyUI's progress preview) and a loralab.preview event."""
        if first is not None and self.show is not None:
            try:
                self.show(first)
            except Exception:  # the image on the node is a convenience; the file and the event are there
                log.debug("LoRA Lab: could not show the preview on the node", exc_info=True)
        send_preview(self.node_id, step, names)


class LoraLab_PreviewImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_PreviewImages",
            display_name="Preview Images (LoRA Lab)",
            category="LoRA Lab",
            description="The previews a training run rendered (Preview Settings), as an IMAGE batch to wire on: one "
            "grid per preview step, in step order, the step's images side by side.",
            inputs=[
                io.Custom("LOSS_MAP").Input("loss", tooltip="The loss output of Train LoRA (LoRA Lab) run with previews."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="One grid per preview step (before the first step, "
                                "every N steps, after the last)."),
                io.String.Output(display_name="steps", tooltip="The grids' steps, comma-separated."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, loss) -> io.NodeOutput:
        images = loss.get("preview_images") if isinstance(loss, Mapping) else None
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.shape[0]:
            raise ValueError(
                "loss: this LOSS_MAP holds no previews; give Train LoRA (LoRA Lab) a Training Options node "
                "with a Preview Settings node in its preview input"
            )
        steps = ", ".join(str(s) for s in loss.get("preview_step", []))
        return io.NodeOutput(images.float() / 255.0, steps)


NODES: list[type[io.ComfyNode]] = [LoraLab_PreviewSettings, LoraLab_PreviewImages]
