"""Previews during training through a real server: Preview Settings -> Training Options -> Train LoRA on
the test kit's tiny SD1.5 UNet. Every preview is a PNG in the output folder and a ``loralab.preview``
event naming it, with the step and the workflow in the PNG; the run's LoRA equals that of the same run
without previews."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.e2e.graphs import LORA_OUT, Graph, lora_tensors, run_ok, saved_lora

pytestmark = pytest.mark.server

DIR = "e2e_pv"
TINY = "LoraLabTest_TinyFamily"


def _graph(with_preview: bool, prefix: str):
    g = Graph()
    tiny = g.add(TINY, family="sd15", weight_dtype="default", seed=0, count=2)
    overrides = {"checkpoint_prefix": f"{DIR}/ck"}
    options = g.training_options(**overrides)
    if with_preview:
        preview = g.add("LoraLab_PreviewSettings", positive=tiny[2], every_n_steps=2, seed=3, steps=3, cfg=1.0,
                        sampler_name="euler", scheduler="simple", width=128, height=128, lora_strength=1.0,
                        filename_prefix=f"{DIR}/previews")  # fmt: skip
        g.prompt[options.id]["inputs"]["preview"] = preview[0]
    trainer = g.train_with_options(tiny[0], tiny[1], tiny[2], options, steps=4, rank=4, learning_rate=0.01,
                                   training_dtype="fp32", lora_dtype="fp32")  # fmt: skip
    save = g.save_lora(trainer[LORA_OUT], f"{DIR}/{prefix}")
    return g, trainer, save


def test_previews_are_files_and_events_and_leave_the_lora_as_without(comfy_server):
    g, trainer, save = _graph(True, "with")
    result = run_ok(comfy_server.client, g.prompt, timeout=300)
    events = [e for e in result.events_of("loralab.preview") if str(e.get("node")) == trainer.id]
    assert [e["step"] for e in events] == [0, 2, 4], events
    folder = comfy_server.output_dir / DIR / "previews"
    for e in events:
        (image,) = e["images"]
        assert image["type"] == "output" and image["subfolder"] == f"{DIR}/previews"
        with Image.open(folder / image["filename"]) as png:
            assert png.text["loralab.step"] == str(e["step"]) and "prompt" in png.text
    assert sorted(p.name for p in folder.iterdir()) == ["step_0_0.png", "step_2_0.png", "step_4_0.png"]

    g2, _, save2 = _graph(False, "without")
    plain = run_ok(comfy_server.client, g2.prompt, timeout=300)
    a, b = lora_tensors(saved_lora(result, save)[1]), lora_tensors(saved_lora(plain, save2)[1])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_interrupt_during_a_preview_stops_within_a_sampling_step_and_writes_nothing(comfy_server):
    """A preview of 5000 sampling steps before the first training step: the interrupt button stops it at
    once (the sampler checks it every step), no preview file is left, and the next prompt trains."""
    import time

    comfy = comfy_server.client
    g = Graph()
    tiny = g.add(TINY, family="sd15", weight_dtype="default", seed=1, count=2)
    preview = g.add("LoraLab_PreviewSettings", positive=tiny[2], every_n_steps=0, seed=3, steps=5000, cfg=1.0,
                    sampler_name="euler", scheduler="simple", width=128, height=128, lora_strength=1.0,
                    filename_prefix=f"{DIR}/interrupted")  # fmt: skip
    options = g.training_options(checkpoint_prefix=f"{DIR}/ck")
    g.prompt[options.id]["inputs"]["preview"] = preview[0]
    trainer = g.train_with_options(tiny[0], tiny[1], tiny[2], options, steps=3, rank=4)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/interrupted")
    seen: dict[str, float] = {}

    def on_event(etype: str, data: dict) -> None:
        if etype == "progress" and data.get("max") == 5000 and "asked" not in seen:
            seen["asked"] = time.monotonic()
            comfy.interrupt()
        elif (
            etype in ("execution_interrupted", "execution_error", "execution_success") and "ended" not in seen
        ):
            seen["ended"] = time.monotonic()

    result = comfy.run(g.prompt, timeout=240, on_event=on_event)
    assert "asked" in seen and result.status == "interrupted", result.error_message
    sampled = max(e["value"] for e in result.events_of("progress") if e.get("max") == 5000)
    print(
        f"preview interrupt: stopped {seen['ended'] - seen['asked']:.2f} s after the request, at sampling step {sampled}"
    )
    assert seen["ended"] - seen["asked"] < 10.0 and sampled < 5000
    assert not (comfy_server.output_dir / DIR / "interrupted").exists() or not any(
        (comfy_server.output_dir / DIR / "interrupted").iterdir()
    )
    assert not list((comfy_server.base_dir / "models" / "loras" / DIR).glob("interrupted_*"))

    g2, _, save2 = _graph(False, "after_interrupt")
    run_ok(comfy, g2.prompt, timeout=300)


def test_held_out_loss_reaches_the_events_and_equals_denoise_loss_of_the_result(comfy_server):
    """Validation Set -> Training Options: the progress events carry the held-out loss at steps 0, 2 and
    4; the last one is what Denoising Loss measures on model_with_lora with the same set, seed and
    levels; Plot Loss draws the LOSS_MAP with it."""
    import math

    from tests.e2e.graphs import LOSS_OUT, MODEL_OUT, denoise_value, loralab_progress

    g = Graph()
    tiny = g.add(TINY, family="sd15", weight_dtype="default", seed=0, count=2)
    held = g.add(TINY, family="sd15", weight_dtype="default", seed=5, count=2)  # same model, other data
    validation = g.add(
        "LoraLab_ValidationSet", latents=held[1], positive=held[2], every_n_steps=2, seed=3, levels=4
    )
    options = g.training_options(checkpoint_prefix=f"{DIR}/ck")
    g.prompt[options.id]["inputs"]["validation"] = validation[0]
    trainer = g.train_with_options(tiny[0], tiny[1], tiny[2], options, steps=4, rank=4, learning_rate=0.01,
                                   training_dtype="fp32", lora_dtype="fp32")  # fmt: skip
    after = g.add(
        "LoraLab_DenoiseLoss", model=trainer[MODEL_OUT], latents=held[1], positive=held[2], seed=3, levels=4
    )
    plot = g.plot_loss(trainer[LOSS_OUT], f"{DIR}/loss")
    result = run_ok(comfy_server.client, g.prompt, timeout=300)
    pairs = [pair for e in loralab_progress(result, trainer) for pair in e.get("validation", [])]
    assert [step for step, _ in pairs] == [0, 2, 4] and all(math.isfinite(v) for _, v in pairs), pairs
    assert pairs[-1][1] == pytest.approx(denoise_value(result, after), rel=1e-5)
    assert result.outputs[plot.id]["images"]
