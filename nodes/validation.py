"""A held-out set whose denoising loss the trainer measures while it trains.

``LoraLab_ValidationSet`` takes latents and their conditioning that are not trained on; its output
goes into the ``validation`` input of Training Options. Before the first step, every
``every_n_steps`` and after the last step the trainer computes their mean denoising loss at fixed
noise levels and noise (the Denoising Loss node's measure, with the adapter as it is at that step),
under no_grad and outside the training's random streams: training goes on exactly as without it.
The values go into the trainer's LOSS_MAP as ``validation_loss`` / ``validation_step`` (``loss`` is
unchanged for stock nodes), into the progress events and the live curve, and into Plot Loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from comfy_api.latest import io

VALIDATION_TYPE = "LORALAB_VALIDATION"


@dataclass(frozen=True)
class ValidationSettings:
    latents: dict
    positive: list
    every_n_steps: int
    seed: int
    levels: int


class LoraLab_ValidationSet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLab_ValidationSet",
            display_name="Validation Set (LoRA Lab)",
            category="LoRA Lab",
            description=(
                "Held-out latents and their conditioning: the trainer measures their denoising loss at fixed noise "
                "while it trains (validation_loss in the loss output and the live curve). Connect to the validation "
                "input of Training Options (LoRA Lab)."
            ),
            inputs=[
                io.Latent.Input("latents", tooltip="Latents not in the training set (VAE Encode)."),
                io.Conditioning.Input(
                    "positive", tooltip="Their conditioning: one entry per latent, or one for all."
                ),
                io.Int.Input(
                    "every_n_steps",
                    default=50,
                    min=1,
                    max=100000,
                    tooltip="Measure every N optimizer steps, plus before the first and after the last step.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the fixed noise."
                ),
                io.Int.Input(
                    "levels",
                    default=8,
                    min=1,
                    max=64,
                    tooltip="Noise levels per latent, evenly spaced over the schedule.",
                ),
            ],
            outputs=[
                io.Custom(VALIDATION_TYPE).Output(
                    display_name="validation", tooltip="Connect to Training Options' validation input."
                )
            ],
        )

    @classmethod
    def execute(cls, latents, positive, every_n_steps, seed, levels) -> io.NodeOutput:
        return io.NodeOutput(ValidationSettings(latents, positive, every_n_steps, seed, levels))


@dataclass
class Validator:
    """Runs the measure for one training run and keeps its history."""

    settings: ValidationSettings
    measure: object  # () -> float: the denoising loss of the held-out set with the adapter as it is
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    unsent: list[list] = field(default_factory=list)  # [step, loss] not yet in a progress event

    def due(self, step: int, total: int) -> bool:
        return step not in self.steps and (step == total or step % self.settings.every_n_steps == 0)

    def run(self, step: int) -> float:
        t0 = time.perf_counter()
        value = float(self.measure())
        self.seconds += time.perf_counter() - t0
        self.steps.append(step)
        self.losses.append(value)
        self.unsent.append([step, value])
        return value

    def take_unsent(self) -> list[list]:
        out, self.unsent = self.unsent, []
        return out


NODES: list[type[io.ComfyNode]] = [LoraLab_ValidationSet]
