"""LoraLab_TrainingOptions: the optional knobs of the trainer, fed into its `options` input so the
16-input contract of the train node stays as it is."""

from __future__ import annotations

from comfy_api.latest import io

from ..training.config import SCHEDULE_NAMES, TARGET_PRESETS, TIMESTEP_SAMPLINGS, TrainConfig
from ..training.lorafile import safe_prefix
from .preview import PREVIEW_TYPE
from .validation import VALIDATION_TYPE

OPTIONS_TYPE = "LORALAB_TRAINING_OPTIONS"
DEFAULTS = TrainConfig()


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.replace("\n", ",").split(",") if p.strip())


class TrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_TrainingOptions",
            display_name="Training Options (LoRA Lab)",
            category="LoRA Lab",
            description="Schedules, regularisation, target layers, noise sampling and checkpoints for Train LoRA (LoRA Lab).",
            inputs=[
                io.Combo.Input("lr_schedule", options=list(SCHEDULE_NAMES), default="constant", tooltip="Learning-rate schedule over the run's steps."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, tooltip="Linear warm-up steps before the schedule."),
                io.Int.Input("lr_cycles", default=1, min=1, max=1000, tooltip="Restarts of cosine_with_restarts."),
                io.Float.Input("weight_decay", default=0.0, min=0.0, max=1.0, step=0.0001, tooltip="Decoupled weight decay (AdamW) / L2 (others)."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.01, tooltip="Clip the gradient norm; 0 turns clipping off."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.5, tooltip="LoRA alpha (scale = alpha / rank); 0 means alpha = rank. OFT: the constraint, a cap on the size of the rotation (0: none)."),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="all",
                               tooltip="Layers that get adapters: all Linear/Conv, attention only, or attention + MLP. Norms and biases are never trained."),
                io.String.Input("include", default="", multiline=False, tooltip="Comma-separated glob patterns on module paths (e.g. *joint_blocks.1*); when set they replace the preset."),
                io.String.Input("exclude", default="", multiline=False, tooltip="Comma-separated glob patterns of module paths to leave out."),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLINGS), default="uniform", tooltip="How noise levels are drawn over the model's schedule."),
                io.Float.Input("logit_mean", default=0.0, min=-5.0, max=5.0, step=0.1, tooltip="logit_normal: mean."),
                io.Float.Input("logit_std", default=1.0, min=0.01, max=5.0, step=0.1, tooltip="logit_normal: standard deviation."),
                io.Float.Input("flow_shift", default=1.0, min=0.01, max=100.0, step=0.1, tooltip="Flow models: extra shift of the noise levels (1 = none; >1 = noisier)."),
                io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=100.0, step=0.5, tooltip="Min-SNR-gamma loss weighting for eps / v models; 0 = off (5 is common)."),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Offset noise strength (helps very dark / bright images); 0 = off."),
                io.Int.Input("save_every", default=0, min=0, max=100000, tooltip="Save a checkpoint (LoRA + exact-resume state) every N steps; 0 = never."),
                io.String.Input("checkpoint_prefix", default="loralab/checkpoints/lora", tooltip="File-name prefix of checkpoints, inside the loras folder."),
                # Last: saved UI workflows list widget values by position, so new widgets go at the end.
                io.Int.Input("keep_checkpoints", default=DEFAULTS.keep_checkpoints, min=0, max=100000,
                             tooltip="Checkpoints of this run kept on disk: after each new one, the oldest beyond this number "
                             "(its LoRA file and .lorastate) is deleted. Files of other runs are never touched; 0 = keep all."),
                io.Custom(PREVIEW_TYPE).Input("preview", optional=True,
                                              tooltip="Optional: sample previews during training (Preview Settings (LoRA Lab))."),
                io.Custom(VALIDATION_TYPE).Input("validation", optional=True,
                                                 tooltip="Optional: a held-out set whose loss is measured while training (Validation Set (LoRA Lab))."),
            ],
            outputs=[io.Custom(OPTIONS_TYPE).Output(display_name="options", tooltip="Connect to the options input of Train LoRA (LoRA Lab).")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_prefix=None) -> bool | str:
        """A prefix that would leave the loras folder is refused when the prompt is queued."""
        if not isinstance(checkpoint_prefix, str):  # linked from another node: checked when it runs
            return True
        try:
            safe_prefix(checkpoint_prefix, "checkpoint_prefix")
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, alpha: float, include: str, exclude: str, preview=None, validation=None, **kwargs) -> io.NodeOutput:
        # 0 means alpha = rank; anything else (NaN included, which "alpha > 0" would turn into None) goes to
        # TrainConfig, which refuses what is not a positive finite number, naming alpha.
        options = dict(kwargs, alpha=None if alpha == 0 else alpha, include=_patterns(include), exclude=_patterns(exclude))
        prefix = options.pop("checkpoint_prefix")
        safe_prefix(prefix, "checkpoint_prefix")  # a linked prefix was not checked at queue time
        TrainConfig(**options)  # fail here, at the options node, on a bad combination
        return io.NodeOutput({"config": options, "checkpoint_prefix": prefix, "preview": preview, "validation": validation})
