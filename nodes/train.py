"""LoraLab_TrainLoraNode: the contract's 16 inputs and 4 outputs, as a thin V3 node over training/ and lora/."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from .. import __version__
from ..lora import ALGORITHMS, detect_algorithm, get_algorithm
from ..lora.inject import (
    AdapterSet,
    find_targets,
    frozen,
    group_file_keys,
    normalize_file_keys,
    target_excludes,
    target_patterns,
)
from ..training.autograd_safe import autograd_safe, copy_on_write
from ..training.checkpoint import CheckpointSeries, bound_training_state, state_path_for, write_checkpoint
from ..training.config import OPTION, TrainConfig, node_options
from ..training.cpu_heap import retained_heap
from ..training.data import collate
from ..training.file_names import earlier_steps, prefix_location
from ..training.gradient_checkpointing import gradient_checkpointing, repeated_blocks
from ..training.loop import (
    ResumeState,
    StepInfo,
    TrainingOutOfMemory,
    derive_seed,
    evaluate_denoise_loss,
    run_training,
)
from ..training.lora_metadata import build_metadata, peft_alphas
from ..training.lorafile import LoraStateDict, read_lora_file
from ..training.memory_plan import (
    MIB,
    Fit,
    check_fit,
    module_bytes,
    optimizer_state_values,
    profile_activations,
)
from ..training.offload import BlockOffload, offload_bytes
from . import lora_keys
from .attention import use_fast_attention
from .events import send_progress
from .files import loras_root
from .graph_inputs import build_samples, pixel_resolution
from .model_forward import in_place_writes, make_predict_x0, objective_for, prediction_type
from .options import OPTIONS_TYPE, TrainingOptionsValue, widget
from .preview import Previewer, PreviewSettings, grid_batch
from .trainable import compute_dtype, materialize_inference_tensors, set_compute_dtype, training_mode
from .validation import ValidationSettings, Validator

log = logging.getLogger("loralab")

NO_LORA = "[None]"
DEFAULT_CHECKPOINT_PREFIX = OPTION["checkpoint_prefix"].default
# Settings that must match for a training state's optimizer moments to be reused.
RESUME_KEYS = ("algorithm", "rank", "alpha", "optimizer", "targets", "include", "exclude")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class TrainLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_TrainLoraNode",
            display_name="Train LoRA (LoRA Lab)",
            category="LoRA Lab",
            description="Train a LoRA, LoHa, LoKr, OFT or DoRA adapter on a diffusion model from latents and conditioning.",
            is_input_list=True,
            inputs=[
                io.Model.Input(
                    "model", tooltip="The diffusion model to train the adapter on. It is not changed."
                ),
                io.Latent.Input(
                    "latents",
                    tooltip="Training images as latents: one batch, or several LATENT inputs (sizes may differ).",
                ),
                io.Conditioning.Input(
                    "positive", tooltip="One conditioning per latent image, or one used for all of them."
                ),
                *(widget(option) for option in node_options("train")),
                io.Combo.Input(
                    "existing_lora",
                    options=[NO_LORA, *folder_paths.get_filename_list("loras")],
                    default=NO_LORA,
                    tooltip="Continue training a LoRA file from the loras folder; [None] starts a new one.",
                ),
                io.Custom(OPTIONS_TYPE).Input(
                    "options",
                    optional=True,
                    tooltip="Optional: schedules, targets, noise sampling, checkpoints (Training Options (LoRA Lab)).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model_with_lora",
                    tooltip="The input model with the trained adapter applied.",
                ),
                io.Custom("LORA_MODEL").Output(
                    display_name="lora", tooltip="The adapter weights (save them with a Save LoRA node)."
                ),
                io.Custom("LOSS_MAP").Output(
                    display_name="loss", tooltip="{'loss': [one value per optimizer step]}"
                ),
                io.Int.Output(display_name="steps", tooltip="Total steps, including those of existing_lora."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, existing_lora=None) -> bool | str:
        # Only existing_lora is named: with **kwargs ComfyUI would skip the schema's min / max checks of
        # every other input and report a failure here once per input.
        names = [existing_lora] if isinstance(existing_lora, str) else existing_lora or []
        for name in names:
            if name != NO_LORA and folder_paths.get_full_path("loras", name) is None:
                return f"existing_lora: {name!r} is not in the loras folder; pick another file or [None]"
        return True

    @classmethod
    def execute(cls, model, latents, positive, options=None, **widgets) -> io.NodeOutput:
        args = {k: v[0] for k, v in widgets.items()}  # is_input_list: every widget arrives as a list
        existing = args.pop("existing_lora")
        opts = options[0] if options else TrainingOptionsValue(TrainConfig(), DEFAULT_CHECKPOINT_PREFIX)
        config = opts.config.replace(**args)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        prompt = getattr(cls.hidden, "prompt", None) if cls.hidden is not None else None
        extra: dict = {}  # LOSS_MAP entries beside "loss"
        lora_sd, losses, total = train(model[0], latents, positive, config, existing, node_id, opts.checkpoint_prefix,
                                       preview=opts.preview, prompt=prompt, validation=opts.validation,
                                       loss_map=extra)  # fmt: skip
        model_with_lora = comfy.sd.load_lora_for_models(model[0], None, lora_sd, 1.0, 0)[0]
        return io.NodeOutput(model_with_lora, lora_sd, {"loss": losses, **extra}, total)


def train(
    model, latents, positive, config: TrainConfig, existing: str, node_id, checkpoint_prefix: str,
    preview: PreviewSettings | None = None, prompt=None, validation: ValidationSettings | None = None,
    loss_map: dict | None = None,
) -> tuple[LoraStateDict, list[float], int]:  # fmt: skip
    """Clone the model, attach adapters to the clone's layers for the run only, train, return the
    weights, the loss per step and the total step count (earlier steps of existing_lora included).
    preview: sample previews before the first step, every N steps and after the last (nodes/preview.py);
    validation: measure a held-out set's loss at those points (nodes/validation.py), written into
    loss_map (the LOSS_MAP beside "loss") gets {"validation_loss": [...], "validation_step": [...]} and
    {"preview_step": [...], "preview_images": uint8 [steps, H, W, 3]}, one grid per preview step."""
    loras_folder = loras_root()
    # a bad prefix fails before any training work
    prefix_location(loras_folder, checkpoint_prefix, "checkpoint_prefix")
    patcher = model.clone()
    # training_mode: tensors read here must be normal ones, as autograd and the optimizer use them;
    # cleanup: what the run changes on the shared model (offloaded weights) is put back however it ends
    with training_mode(), contextlib.ExitStack() as cleanup:
        family = type(patcher.model.model_config).__name__
        keys = lora_keys.key_targets(patcher)  # ComfyUI's LoRA key map, read once
        key_names = lora_keys.lora_key_names(patcher, keys)  # every LoRA naming ComfyUI maps onto this model
        start = (_Start.read(existing, config, key_names, lora_keys.lora_split_names(patcher, keys))
                 if existing and existing != NO_LORA else _Start())  # fmt: skip
        config = start.agree_alpha(config)
        diffusion = patcher.model.diffusion_model
        targets = find_targets(
            diffusion,
            target_patterns(config.targets, config.include),
            target_excludes(config.targets, config.include, config.exclude),
        )
        if not targets:
            raise ValueError(
                "options: the targets / include / exclude patterns match no Linear or Conv layer of this model"
            )
        device = patcher.load_device
        gen = torch.Generator().manual_seed(derive_seed(config.seed, "init"))
        adapters = AdapterSet.create(targets, config.algorithm, config.rank, config.alpha, gen, device=device)
        carried = start.load_into(adapters, targets, config, device)
        if carried:  # what we do not train still shapes what the adapter learns
            patcher = comfy.sd.load_lora_for_models(patcher, None, carried, 1.0, 0)[0]
        _prepare_clone(patcher, config, device)
        adapters.init_from_base(diffusion)  # DoRA's magnitude, from the weights as loaded (patches applied)
        samples = build_samples(patcher, latents, positive, device)
        in_place = in_place_writes(patcher, samples[0], device)
        if in_place:
            log.warning("LoRA Lab: this %s model's code writes in place into tensors it already used (%s); "
                        "training keeps copies of what backward needs%s", family,
                        in_place, ", without gradient checkpointing" if config.gradient_checkpointing else "")  # fmt: skip
        predict, objective = make_predict_x0(patcher), objective_for(patcher, config)
        blocks = repeated_blocks(diffusion)
        offload = (
            _offload(blocks[: config.offload_blocks], patcher, config, cleanup)
            if config.offload_blocks > 0
            else None
        )
        # on a CPU (offload device = load device) offloading frees nothing
        frees = torch.device(patcher.offload_device) != torch.device(device)
        auto = config.offload_blocks == -1 and frees
        fit = _memory_fit(diffusion, predict, objective, adapters, samples, config, device, bool(in_place),
                          offload_bytes(blocks) if auto else ())  # fmt: skip
        if not fit.fits and auto and fit.offload_needed:
            offload = _offload(blocks[: fit.offload_needed], patcher, config, cleanup)
            fit = _memory_fit(
                diffusion, predict, objective, adapters, samples, config, device, bool(in_place)
            )
        log.info(
            "LoRA Lab: memory plan: %s; %s has %d MiB free for it",
            fit.plan.describe(),
            fit.where,
            fit.available // MIB,
        )
        if not fit.fits:
            raise _over_budget(fit)
        writer = _Writer(adapters, carried, config, family, len(samples),
                         loras_folder, checkpoint_prefix,
                         {"kohya": lora_keys.kohya_names(patcher, targets, key_names),
                          "diffusers": lora_keys.diffusers_names(patcher, targets, keys)},
                         {"prediction_type": prediction_type(patcher.get_model_object("model_sampling")),
                          "resolution": pixel_resolution(patcher, samples)})  # fmt: skip
        bar = _Progress(config.steps, node_id, {**fit.plan.as_dict(), "available": fit.available})
        total_steps = start.step + config.steps
        previewer = Previewer(preview, model, node_id, prompt, show=bar.show) if preview is not None else None

        def preview_at(step: int, loss: float, running: bool) -> None:
            lora = writer.lora(step, loss)
            with adapters.paused(diffusion) if running else contextlib.nullcontext():
                previewer.render(step, lora)
            _load(patcher)
            if offload is not None and offload.active:  # loading the preview's clone brought them back
                offload.apply()

        if previewer is not None:
            preview_at(start.step, float("nan"), running=False)
        outside = previewer.seconds if previewer is not None else 0.0
        validator = None
        if validation is not None:
            held_out = build_samples(patcher, [validation.latents], [validation.positive], device)
            validator = Validator(validation, lambda: evaluate_denoise_loss(predict, objective, held_out, device,
                                                                            validation.seed, validation.levels))  # fmt: skip

        def on_step(info: StepInfo) -> None:
            step = start.step + info.step
            if validator is not None and validator.due(step, total_steps):
                validator.run(step)
            away = (previewer.seconds - outside if previewer is not None else 0.0) + (
                validator.seconds if validator else 0.0
            )
            # previews / validation are not training time
            info = dataclasses.replace(info, elapsed=info.elapsed - away)
            bar.update(info, validator.take_unsent() if validator is not None else None)
            if previewer is not None and previewer.due(step, total_steps):
                preview_at(step, info.loss, running=True)

        try:
            with (
                frozen(diffusion),
                adapters.attached(diffusion),
                gradient_checkpointing(diffusion, config.gradient_checkpointing and not in_place),
                autograd_safe(),
                copy_on_write(bool(in_place)),
                retained_heap(device.type == "cpu"),
            ):
                if validator is not None:  # before the first step, with the adapter as it starts
                    validator.run(start.step)
                result = run_training(
                    params=adapters.trainable_parameters(),
                    samples=samples,
                    predict_x0=predict,
                    objective=objective,
                    config=config,
                    device=device,
                    resume=ResumeState(start.step, start.step + config.steps, start.optimizer_state),
                    on_step=on_step,
                    on_checkpoint=writer.save_checkpoint,
                    check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                )
        except TrainingOutOfMemory as e:
            raise _out_of_memory(e, config, device, samples) from None
        except RuntimeError as e:
            raise _untrainable(e, writer.family) from e
        finally:
            bar.close()
    total = start.step + config.steps
    if validator is not None and loss_map is not None:
        loss_map.update(validation_loss=list(validator.losses), validation_step=list(validator.steps))
    # the last step's previews, where the loop did not get to it
    if previewer is not None and previewer.due(total, total):
        with training_mode():
            preview_at(total, result.losses[-1], running=False)
    if previewer is not None and loss_map is not None and previewer.grids:
        steps = sorted(previewer.grids)
        loss_map.update(preview_step=steps, preview_images=grid_batch([previewer.grids[s] for s in steps]))
    return writer.lora(total, result.losses[-1]), result.losses, total


# What PyTorch says when a model's code cannot run under autograd, whatever the family.
_AUTOGRAD_REFUSALS = {
    "modified by an inplace operation": "writes in place into activations that backward needs (an explicit "
    "in-place operation in the model code, which the trainer can only avoid for a += b)",
    "no autograd formula": "runs an operation that PyTorch cannot differentiate (a fused inference kernel)",
}


def _untrainable(error: RuntimeError, family: str) -> RuntimeError:
    """PyTorch's refusal to differentiate a model's code, said in terms a user can act on; other
    errors unchanged."""
    for marker, what in _AUTOGRAD_REFUSALS.items():
        if marker in str(error):
            return RuntimeError(
                f"model: this {family} model's code on this ComfyUI release {what}, so it cannot be trained "
                f"here; a newer ComfyUI may train it (PyTorch: {str(error).splitlines()[0][:300]})"
            )
    return error


def _offload(blocks: list, patcher, config: TrainConfig, cleanup: contextlib.ExitStack) -> BlockOffload:
    """The weights of these blocks in the offload device's memory (training.offload) until the run ends."""
    offload = BlockOffload(blocks, patcher.offload_device)
    cleanup.callback(offload.restore)
    offload.apply()
    log.info("LoRA Lab: the weights of %d repeated blocks (%d MiB) stay in %s memory and come to %s layer by layer",
             len(blocks), offload.bytes // MIB, offload.offload_device, patcher.load_device)  # fmt: skip
    if not config.gradient_checkpointing:
        log.warning("LoRA Lab: offload_blocks without gradient_checkpointing saves no memory: autograd keeps every "
                    "block's weights until backward; turn gradient_checkpointing on")  # fmt: skip
    return offload


def _memory_fit(diffusion, predict, objective, adapters: AdapterSet, samples, config: TrainConfig,
                device: torch.device, in_place: bool, block_weights=()) -> Fit:  # fmt: skip
    """The run's memory plan (training.memory_plan) against what the device has free now, the model
    loaded: one probe forward of the largest sample with the adapters attached, as training runs it.
    LORALAB_TRAINING_MEMORY_MIB caps what a run may add (default: the device's free memory)."""
    largest = max(range(len(samples)), key=lambda i: samples[i].latent.numel())
    probe = min(config.batch_size, 2)  # see ActivationProfile: batch 1 under-counts larger batches
    x, cond = collate(samples, [largest] * probe, device)
    sigma = objective.sigmas_from_percents(torch.tensor([0.5] * probe)).to(device)
    params = adapters.trainable_parameters()
    with frozen(diffusion), adapters.attached(diffusion), autograd_safe(), copy_on_write(in_place):
        profile = profile_activations(lambda: predict(x, sigma, cond), repeated_blocks(diffusion),
                                      skip=[*diffusion.parameters(), *diffusion.buffers(), *params], samples=probe)  # fmt: skip
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], "the GPU"
    else:
        import psutil

        available, where = psutil.virtual_memory().available, "this machine"
    cap = os.environ.get("LORALAB_TRAINING_MEMORY_MIB", "").strip()
    if cap:
        try:
            available, where = min(available, int(float(cap) * MIB)), "LORALAB_TRAINING_MEMORY_MIB"
        except ValueError:
            log.warning("LoRA Lab: LORALAB_TRAINING_MEMORY_MIB=%r is not a number; ignoring it", cap)
    linears = [
        m.weight for m in diffusion.modules() if isinstance(m, torch.nn.Linear) and m.weight is not None
    ]
    fp8_savings = sum(w.numel() * (w.element_size() - 1) for w in linears if w.element_size() > 1)
    return check_fit(module_bytes(diffusion), sum(p.numel() for p in params), config.optimizer, profile,
                     config.batch_size, config.gradient_checkpointing and not in_place, available, where,
                     fp8_savings, config.training_dtype, optimizer_state_values(config.optimizer, [p.shape for p in params]),
                     block_weights)  # fmt: skip


def _over_budget(fit: Fit) -> MemoryError:
    """Refusal before the first step: the plan's numbers and the changes that would fit."""
    changes = "; ".join(f"{what} (~{p.added / MIB:.0f} MiB)" for what, p in fit.alternatives)
    return MemoryError(
        f"model: this run needs {fit.plan.describe()}, but {fit.where} has {fit.available / MIB:.0f} MiB free for it; "
        "training did not start and nothing changed. "
        + (
            f"Settings that fit: {changes}."
            if changes
            else "No single change of batch_size, gradient_checkpointing, "
            "training_dtype, offload_blocks or an fp8 base fits: train on smaller images or free memory first."
        )  # fmt: skip
    )


def _memory_in_use(device: torch.device) -> str:
    """What holds memory on the device, in words: PyTorch's share and the device's total (CUDA), or this
    process's resident memory and the machine's (CPU)."""
    gib = 2.0**30
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        return f"{(total - free) / gib:.1f} of {total / gib:.1f} GiB in use, {held / gib:.1f} GiB of it held by PyTorch"
    try:
        import psutil

        rss, vm = psutil.Process().memory_info().rss, psutil.virtual_memory()
        return f"this process holds {rss / gib:.1f} GiB; {vm.available / gib:.1f} of {vm.total / gib:.1f} GiB free"
    except Exception:  # psutil is ComfyUI's dependency; the message does without it
        return "memory in use unknown"


def _out_of_memory(
    error: TrainingOutOfMemory, config: TrainConfig, device: torch.device, samples
) -> TrainingOutOfMemory:
    """The allocator's refusal as a message that says where it happened, what holds the memory and
    the settings that lower the peak, cheapest first; the step's memory is handed back first."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tips = []
    if config.batch_size > 1:
        tips.append(
            f"lower batch_size (now {config.batch_size}) and raise grad_accumulation_steps to keep the effective batch"
        )
    if not config.gradient_checkpointing:
        tips.append("turn gradient_checkpointing on")
    if device.type == "cuda" and config.offload_blocks != -1:
        tips.append(f"offload more blocks' weights to CPU memory (offload_blocks in Training Options, now "
                    f"{config.offload_blocks}; -1 picks the number from the memory plan)")  # fmt: skip
    if config.training_dtype == "fp32":
        tips.append("set training_dtype to bf16")
    tips.append("load the model with weight_dtype fp8_e4m3fn (Load Diffusion Model)")
    shape = tuple(samples[0].latent.shape[-2:]) if samples else None
    tips.append("train on smaller images" + (f" (latents now {shape[1]}x{shape[0]})" if shape else ""))
    if config.rank > 16:
        tips.append(f"lower rank (now {config.rank})")
    tips.append("free memory other programs or loaded models hold")
    message = (f"model: out of memory at step {error.step} of {error.total} on {device.type} ({_memory_in_use(device)}). "
               "The model you connected is unchanged and checkpoints written so far are complete. "
               f"To fit: {'; '.join(tips)}. ({error.detail})")  # fmt: skip
    log.error("LoRA Lab: %s", message)
    return TrainingOutOfMemory(message, error.step, error.total, error.detail)


def _load(patcher) -> None:
    """The training clone loaded on its device with autograd-ready weights: at the start, and again
    after another clone of its model (a preview's) was loaded."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    materialize_inference_tensors(patcher.model)


def _prepare_clone(patcher, config: TrainConfig, device: torch.device) -> None:
    """The training clone's compute dtype and attention, loaded on the device with autograd-ready weights."""
    set_compute_dtype(patcher, compute_dtype(config.training_dtype, device))
    replaced = use_fast_attention(patcher)
    if replaced:
        log.info("LoRA Lab: training attention runs on PyTorch SDPA instead of ComfyUI's %s", replaced)
    _load(patcher)


class _Writer:
    """The run's LoRA as a LORA_MODEL (adapters + carried keys + metadata), and its checkpoints:
    a LoRA file plus its training-state sidecar, never one without the other."""

    def __init__(self, adapters: AdapterSet, carried: dict, config: TrainConfig, family: str, dataset_size: int,
                 loras_folder: Path, checkpoint_prefix: str, file_names: dict[str, dict] | None = None,
                 model_info: dict | None = None):  # fmt: skip
        self.adapters, self.carried, self.config = adapters, carried, config
        self.file_names = file_names or {}  # key format -> path -> names (LoraStateDict.file_names)
        self.model_info = model_info or {}  # prediction_type, resolution: file metadata
        self.family, self.dataset_size = family, dataset_size
        self.loras_folder, self.checkpoint_prefix = loras_folder, checkpoint_prefix
        self.series = CheckpointSeries(config.keep_checkpoints)  # this run's checkpoints only

    def lora(self, step: int, loss: float) -> LoraStateDict:
        config = self.config
        sd = LoraStateDict(
            self.adapters.state_dict_for_file(dtype=DTYPES[config.lora_dtype]), file_names=self.file_names
        )
        sd.update(self.carried)
        sd.metadata = build_metadata(
            steps=step, algorithm=config.algorithm, rank=config.rank,
            alpha=_alpha(config), seed=config.seed,
            optimizer=config.optimizer, learning_rate=config.learning_rate, loss=loss,
            training_dtype=config.training_dtype, lora_dtype=config.lora_dtype, model_family=self.family,
            dataset_size=self.dataset_size, pack_version=__version__, **self.model_info,
        )  # fmt: skip
        return sd

    def save_checkpoint(self, step: int, total: int, optimizer: torch.optim.Optimizer, loss: float) -> None:
        prefix = self.checkpoint_prefix
        folder, stem = prefix_location(self.loras_folder, prefix, "checkpoint_prefix")
        lora = self.lora(step, loss)
        path, _ = write_checkpoint(folder, stem, step, lora, lora.metadata,
                                   self.adapters.state_dict_for_file(dtype=torch.float32), optimizer.state_dict(),
                                   total, self.config.as_dict(), what=f"checkpoint_prefix {prefix!r}")  # fmt: skip
        log.info("LoRA Lab: checkpoint at step %d: %s", step, path)
        for old in self.series.add(path, state_path_for(path)):
            log.info(
                "LoRA Lab: removed the older checkpoint file %s (keep_checkpoints %d)", old, self.series.keep
            )


class _Start:
    """Where training starts: nothing, or an existing LoRA file (weights, alpha, earlier steps), plus
    its training-state sidecar when there is one (fp32 master weights, optimizer state: exact resume)."""

    def __init__(
        self, name: str = "", weights: dict | None = None, step: int = 0, optimizer_state: dict | None = None
    ):
        self.name, self.weights, self.step, self.optimizer_state = name, weights or {}, step, optimizer_state

    @classmethod
    def read(cls, name: str, config: TrainConfig, key_names: dict[str, str] | None = None,
             split_names: dict | None = None) -> _Start:  # fmt: skip
        """key_names: file stem -> module path in every naming ComfyUI's loader reads for this model
        (kohya, diffusers / peft, LyCORIS ...), so a LoRA made by another tool continues too;
        split_names: names of parts of fused layers (lora_keys.lora_split_names), merged into one
        LoRA of the layer."""
        path = folder_paths.get_full_path("loras", name)
        if path is None:
            raise ValueError(
                f"existing_lora: {name!r} is not in the loras folder; pick another file or [None]"
            )
        try:
            sd, meta = read_lora_file(path)
            alphas = peft_alphas(meta)
            sd = normalize_file_keys(sd, key_names or {}, alphas, parts=split_names)
            found = detect_algorithm(sd.keys())
        except ValueError as e:
            raise ValueError(f"existing_lora: {e}") from e
        if found is None:
            raise ValueError(
                f"existing_lora: {name!r} holds no {', '.join(ALGORITHMS)} weights; pick another file or [None]"
            )
        if found != config.algorithm:
            raise ValueError(f"existing_lora: {name!r} is a {found} file but algorithm is {config.algorithm}; "
                             f"set algorithm to {found} or pick another file")  # fmt: skip
        step, source = earlier_steps(meta, os.path.basename(path))
        if source == "none":
            log.warning(
                "LoRA Lab: %s carries no step count (metadata or '_<N>_steps_' name); counting from 0", name
            )
        state, problem = bound_training_state(path)
        if problem:
            log.warning(
                "LoRA Lab: %s: ignoring its training state: %s; resuming from the weights only", name, problem
            )
        if state is None:
            return cls(name, sd, step)
        master, optimizer_state, info = state
        now = json.loads(json.dumps(config.as_dict()))  # as the state file recorded it (tuples -> lists)
        differ = [k for k in RESUME_KEYS if info["config"].get(k) != now[k]]
        if differ:
            log.warning("LoRA Lab: %s has a training state made with other settings (%s); resuming from the weights only",
                        name, ", ".join(f"{k}: {info['config'].get(k)!r} there, {now[k]!r} now" for k in differ))  # fmt: skip
            return cls(name, sd, step)
        rest = {k: v for k, v in sd.items() if k not in master}
        return cls(name, {**master, **rest}, info["step"], optimizer_state)

    def file_alpha(self) -> float | None:
        """The alpha every adapter layer of the file has, or None (no layers, or several alphas)."""
        alphas = {
            round(float(v), 6) for k, v in self.weights.items() if k.endswith(".alpha") and v.numel() == 1
        }
        return alphas.pop() if len(alphas) == 1 else None

    def agree_alpha(self, config: TrainConfig) -> TrainConfig:
        """Continuing with alpha left at its default (rank) takes the file's own alpha, so layers the
        file lacks get the same scale and the metadata tells the alpha the tensors hold. An explicit
        alpha that differs is kept for new layers; the file's layers keep theirs (said in the log)."""
        alpha = self.file_alpha()
        if alpha is None or alpha == _alpha(config):
            return config
        if config.alpha is None:
            log.info(
                "LoRA Lab: %s has alpha %g: training continues with it (the default would be %g)",
                self.name,
                alpha,
                _alpha(config),
            )
            return config.replace(alpha=alpha)
        log.warning("LoRA Lab: %s has alpha %g and alpha is set to %g: the file's layers keep %g, new layers get %g",
                    self.name, alpha, config.alpha, alpha, config.alpha)  # fmt: skip
        return config

    def load_into(self, adapters: AdapterSet, targets: dict, config: TrainConfig, device) -> dict:
        return (
            _load_existing(adapters, self.weights, targets, self.name, config, device) if self.weights else {}
        )


def _alpha(config: TrainConfig) -> float:
    """The run's alpha: the one set, else the algorithm's default (rank; OFT: 0, no constraint)."""
    return (
        float(config.alpha)
        if config.alpha is not None
        else get_algorithm(config.algorithm).default_alpha(config.rank)
    )


def _load_existing(
    adapters: AdapterSet, file_sd: dict, targets: dict, name: str, config: TrainConfig, device
) -> dict:
    """Adapters of the file replace the fresh ones layer by layer. Returns the keys that are not
    adapters of our target layers (norm/bias deltas of ComfyUI's built-in trainer, layers we do not
    target): they are applied during training and written back unchanged."""
    groups, rest = group_file_keys(file_sd, targets)
    if not groups:
        example = next(iter(file_sd), "?")
        expected = f"diffusion_model.{next(iter(targets), '?')}.lora_up.weight"
        raise ValueError(f"existing_lora: none of the layers of {name!r} is in this model (0 matched; a file key: "
                         f"{example!r}, a key this model expects: {expected!r}); it was trained for another model "
                         "or in a naming ComfyUI does not map onto it")  # fmt: skip
    cls = get_algorithm(config.algorithm)
    for path, group in groups.items():
        shape, conv = targets[path]
        try:
            adapters[path] = cls.from_adapter_state_dict(
                {k: v.float() for k, v in group.items()}, shape, conv=conv, device=device
            )
        except ValueError as e:
            raise ValueError(f"existing_lora: {name!r}, layer {path}: {e}") from e
    return rest


class _Progress:
    """One tick per optimizer step: ComfyUI's progress bar, a console tqdm bar with the loss, and the
    pack's own websocket event for the live view (the first one with the memory plan)."""

    def __init__(self, total: int, node_id, memory: dict | None = None):
        self.node_id, self.memory, self.total, self.done = node_id, memory, total, 0
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.tqdm = tqdm(total=total, desc="LoRA Lab", unit="step", dynamic_ncols=True)

    def update(self, info: StepInfo, validation: list | None = None) -> None:
        self.done = info.step
        self.bar.update(1)
        self.tqdm.update(1)
        self.tqdm.set_postfix(loss=f"{info.loss:.4f}", refresh=False)
        send_progress(self.node_id, info, self.memory, validation)
        self.memory = None

    def show(self, image) -> None:
        """An image on the node (ComfyUI's progress preview), the bar where it is."""
        self.bar.update_absolute(self.done, self.total, ("PNG", image, 512))

    def close(self) -> None:
        self.tqdm.close()
