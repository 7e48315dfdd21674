"""Every model family ComfyUI trains, through a real server: the tiny model of each family
(``tests/comfy_testkit``, ComfyUI's own model classes) trains with LoRA, LoHa and LoKr, in fp32 and
bf16 and on an fp8-stored base; 30 steps on learnable data lower the denoising loss at fixed noise;
and the saved file applied by stock ``LoraLoaderModelOnly`` gives exactly ``model_with_lora``'s
output, in ComfyUI's naming and in kohya's, with no "lora key not loaded" line. A family this ComfyUI lacks is skipped with its name."""

from __future__ import annotations

import sys

import pytest

from harness.server import TESTKIT_DIR
from tests.e2e.graphs import (
    LORA_OUT,
    MODEL_OUT,
    Graph,
    assert_loss_per_step,
    denoise_value,
    lora_metadata,
    run_logged,
    run_ok,
    saved_lora,
)

sys.path.insert(0, str(TESTKIT_DIR))
from families import FAMILIES  # noqa: E402

pytestmark = pytest.mark.server

TINY = "LoraLabTest_TinyFamily"
# (algorithm, training_dtype, weight_dtype of the base) of the short runs beside the 30-step LoRA
SHORT_RUNS = [
    ("LoHa", "fp32", "default"),
    ("LoKr", "fp32", "default"),
    ("LoRA", "bf16", "default"),
    ("LoHa", "bf16", "default"),
    ("LoKr", "bf16", "default"),
    ("LoRA", "bf16", "fp8_e4m3fn"),
    ("LoHa", "fp32", "fp8_e4m3fn"),
    ("LoKr", "bf16", "fp8_e4m3fn"),
]


# What A1111 / Forge / kohya read from the file's metadata (the tiny latents are 16x16 and 8x8)
EXPECTED_METADATA = {
    "sd15": {"ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec.prediction_type": "epsilon",
             "modelspec.resolution": "128x128", "modelspec.sai_model_spec": "1.0.1"},
    "sd2_v": {"ss_base_model_version": "sd_v2", "ss_v2": "True", "modelspec.prediction_type": "v",
              "modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.resolution": "128x128"},
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "modelspec.resolution": "128x128"},
    "flux_dev": {"modelspec.prediction_type": "flow", "modelspec.resolution": "64x64"},
}  # fmt: skip


def _tiny(g: Graph, family: str, weight_dtype: str = "default"):
    return g.add(TINY, family=family, weight_dtype=weight_dtype, seed=0, count=2)


def _require(comfy_server, family: str) -> None:
    """Skip a family this ComfyUI lacks."""
    options = comfy_server.object_info[TINY]["input"]["required"]["family"][0]
    if family not in options:
        pytest.skip(f"this ComfyUI has no {FAMILIES[family].model_class} model class ({family})")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_learns_and_its_file_applies_like_model_with_lora(comfy_server, family):
    _require(comfy_server, family)
    g = Graph()
    tiny = _tiny(g, family)
    before = g.denoise_loss(tiny[0], tiny[1], tiny[2])
    trainer = g.train(tiny[0], tiny[1], tiny[2], steps=30, learning_rate=0.002, rank=4, training_dtype="fp32",
                      lora_dtype="fp32")  # fmt: skip
    after = g.denoise_loss(trainer[MODEL_OUT], tiny[1], tiny[2])
    save = g.save_lora(trainer[LORA_OUT], f"families/{family}")
    save_kohya = g.save_lora_format(trainer[LORA_OUT], f"families/{family}_kohya", "kohya")
    save_diffusers = g.save_lora_format(trainer[LORA_OUT], f"families/{family}_diffusers", "diffusers")
    result, log = run_logged(comfy_server, g.prompt)
    assert result.status == "success", result.error_message
    # a model whose code writes in place into tensors it used trains with copy-on-write, unchecked
    assert ("keeps copies of what backward needs" in log) == FAMILIES[family].in_place_writes, log
    loss_before, loss_after = denoise_value(result, before), denoise_value(result, after)
    assert loss_after < loss_before, (family, loss_before, loss_after)

    metadata = lora_metadata(saved_lora(result, save)[1])
    for key, value in EXPECTED_METADATA.get(family, {}).items():
        assert metadata.get(key) == value, (key, metadata.get(key))

    g2 = Graph()
    tiny2 = _tiny(g2, family)
    applied = [g2.denoise_loss(g2.lora_loader(tiny2[0], saved_lora(result, node)[0]), tiny2[1], tiny2[2])
               for node in (save, save_kohya)]  # fmt: skip
    # the diffusers naming through the pack's loader (stock loaders skip the attention layers of SD UNet
    # diffusers files, which ComfyUI maps only in their old "processor" spelling) and, elsewhere, stock
    diffusers_name = saved_lora(result, save_diffusers)[0]
    applied.append(
        g2.denoise_loss(g2.apply_lora(tiny2[0], g2.load_lora(diffusers_name)[0]), tiny2[1], tiny2[2])
    )
    if not family.startswith(("sd15", "sd2", "sdxl")):
        applied.append(g2.denoise_loss(g2.lora_loader(tiny2[0], diffusers_name), tiny2[1], tiny2[2]))
    result2, log = run_logged(comfy_server, g2.prompt)
    assert result2.status == "success", result2.error_message
    assert "lora key not loaded" not in log.lower(), log
    for node in applied:  # ComfyUI's file naming, kohya's and diffusers' apply alike
        assert denoise_value(result2, node) == pytest.approx(loss_after, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_every_algorithm_in_fp32_bf16_and_on_an_fp8_base(comfy_server, family):
    _require(comfy_server, family)
    g = Graph()
    bases = {dtype: _tiny(g, family, dtype) for dtype in ("default", "fp8_e4m3fn")}
    trainers = []
    for algorithm, training_dtype, weight_dtype in SHORT_RUNS:
        tiny = bases[weight_dtype]
        trainer = g.train(tiny[0], tiny[1], tiny[2], steps=3, rank=4, algorithm=algorithm,
                          training_dtype=training_dtype, lora_dtype=training_dtype)  # fmt: skip
        g.denoise_loss(trainer[MODEL_OUT], tiny[1], tiny[2], levels=2)  # an output node, and the model runs
        trainers.append(trainer)
    result = run_ok(comfy_server.client, g.prompt, timeout=600)
    for run, trainer in zip(SHORT_RUNS, trainers, strict=True):
        try:
            assert_loss_per_step(result, trainer, 3)  # every step ran, every loss finite and positive
        except AssertionError as exc:
            raise AssertionError(f"{family} {run}: {exc}") from exc
