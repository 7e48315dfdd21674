"""LoraLab_TrainingOptions: the optional knobs of the trainer, fed into its `options` input so the
16-input contract of the train node stays as it is."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..training.config import Option, TrainConfig, node_options
from ..training.file_names import safe_prefix
from .preview import PREVIEW_TYPE
from .validation import VALIDATION_TYPE

OPTIONS_TYPE = "LORALAB_TRAINING_OPTIONS"


def widget(option: Option) -> io.Input:
    """A node input for one row of the option table (training.config.OPTIONS)."""
    common = {"default": option.widget_default, "tooltip": option.tooltip}
    if option.kind == "int":
        return io.Int.Input(option.name, min=int(option.lo), max=int(option.hi), **common)
    if option.kind == "float":
        return io.Float.Input(option.name, min=option.lo, max=option.hi, step=option.step, **common)
    if option.kind == "bool":
        return io.Boolean.Input(option.name, **common)
    if option.kind == "combo":
        return io.Combo.Input(option.name, options=list(option.choices), **common)
    if option.kind == "string":
        return io.String.Input(option.name, multiline=False, **common)
    raise ValueError(f"option {option.name}: unknown kind {option.kind!r}")


@dataclasses.dataclass(frozen=True)
class TrainingOptionsValue:
    """What Training Options hands the trainer: a validated config holding the options node's settings
    (the trainer's own widgets at their defaults, replaced by the trainer), plus what is not config."""

    config: TrainConfig
    checkpoint_prefix: str
    preview: object = None
    validation: object = None


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
                *(widget(option) for option in node_options("options")),
                io.Custom(PREVIEW_TYPE).Input(
                    "preview",
                    optional=True,
                    tooltip="Optional: sample previews during training (Preview Settings (LoRA Lab)).",
                ),
                io.Custom(VALIDATION_TYPE).Input(
                    "validation",
                    optional=True,
                    tooltip="Optional: a held-out set whose loss is measured while training (Validation Set (LoRA Lab)).",
                ),
            ],
            outputs=[
                io.Custom(OPTIONS_TYPE).Output(
                    display_name="options", tooltip="Connect to the options input of Train LoRA (LoRA Lab)."
                )
            ],
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
    def execute(
        cls, alpha: float, include: str, exclude: str, preview=None, validation=None, **kwargs
    ) -> io.NodeOutput:
        # 0 means alpha = rank; anything else (NaN included, which "alpha > 0" would turn into None) goes to
        # TrainConfig, which refuses what is not a positive finite number, naming alpha.
        options = dict(
            kwargs,
            alpha=None if alpha == 0 else alpha,
            include=_patterns(include),
            exclude=_patterns(exclude),
        )
        prefix = options.pop("checkpoint_prefix")
        safe_prefix(prefix, "checkpoint_prefix")  # a linked prefix was not checked at queue time
        # Built here, so a bad value or combination fails at the options node.
        return io.NodeOutput(TrainingOptionsValue(TrainConfig(**options), prefix, preview, validation))
