"""Previews during training (nodes/preview.py), in-process on the tiny SD1.5 UNet: a preview at step N is
bit-identical to ComfyUI's KSampler on the checkpoint file saved at step N, a run with previews ends
with the same LoRA as one without, and every preview is a PNG in the output folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

RANK = 4


@pytest.fixture(scope="module")
def glue(comfy_glue, families):
    return comfy_glue("train"), comfy_glue("preview"), families


@pytest.fixture
def output_dir(tmp_path, comfy_glue):
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(before)


def _settings(preview_mod, positive, negative=None, every=2, cfg=1.0):
    return preview_mod.PreviewSettings(positive=positive, negative=negative, vae=None, every_n_steps=every, seed=7,
                                       steps=3, cfg=cfg, sampler_name="euler", scheduler="simple", width=128,
                                       height=128, lora_strength=1.0, filename_prefix="loralab/previews")  # fmt: skip


def _train(glue, monkeypatch, settings, steps=4, save_every=0):
    """(LORA_MODEL, the run's Previewer or None, input model)."""
    train_mod, _, families = glue
    from training.config import TrainConfig

    model = families.build_model("sd15")
    latents, conditioning = families.make_data("sd15")
    made = []

    class Spy(train_mod.Previewer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(train_mod, "Previewer", Spy)
    config = TrainConfig(steps=steps, rank=RANK, learning_rate=0.01, training_dtype="fp32", lora_dtype="fp32",
                         save_every=save_every)  # fmt: skip
    lora, losses, _ = train_mod.train(model, [latents], [conditioning], config, "[None]", None, "loralab/pv/ck",
                                      preview=settings)  # fmt: skip
    return lora, (made[0] if made else None), model, conditioning


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_preview_at_step_n_is_ksampler_on_the_checkpoint_saved_at_step_n(
    glue, loras_dir, output_dir, monkeypatch, cfg
):
    import comfy.sd

    from training.lorafile import read_lora_file

    _, preview_mod, families = glue
    _, conditioning = families.make_data("sd15")
    positive = [conditioning[0]]
    negative = [conditioning[1]] if cfg != 1.0 else None
    _, previewer, model, _ = _train(
        glue, monkeypatch, _settings(preview_mod, positive, negative, cfg=cfg), save_every=2
    )
    assert sorted(previewer.last) == [0, 2, 4]
    checkpoint = next((loras_dir / "loralab" / "pv").glob("ck_2_steps_*.safetensors"))
    file_sd, _ = read_lora_file(checkpoint)
    nodes_mod = preview_mod.comfy_nodes()
    with torch.inference_mode():
        patched = comfy.sd.load_lora_for_models(model, None, file_sd, 1.0, 0)[0]
        latent = nodes_mod.EmptyLatentImage().generate(128, 128, 1)[0]
        neg = negative if negative is not None else preview_mod._zero_out(positive)
        expected = nodes_mod.common_ksampler(patched, 7, 3, cfg, "euler", "simple", positive, neg, latent)[0][
            "samples"
        ]
        base = nodes_mod.common_ksampler(model, 7, 3, cfg, "euler", "simple", positive, neg, latent)[0][
            "samples"
        ]
    assert torch.equal(previewer.last[2], expected)
    assert not torch.equal(previewer.last[4], expected) and torch.equal(
        previewer.last[0], base
    )  # step 0: no LoRA effect


def test_a_run_with_previews_ends_with_the_same_lora_as_one_without(glue, loras_dir, output_dir, monkeypatch):
    _, preview_mod, families = glue
    _, conditioning = families.make_data("sd15")
    with_previews, previewer, _, _ = _train(
        glue, monkeypatch, _settings(preview_mod, [conditioning[0]], every=1)
    )
    without, none, _, _ = _train(glue, monkeypatch, None)
    assert none is None and sorted(previewer.last) == [0, 1, 2, 3, 4]
    assert with_previews.keys() == without.keys()
    for key, value in without.items():
        assert torch.equal(with_previews[key], value), key


def test_every_preview_is_a_png_with_its_step(glue, loras_dir, output_dir, monkeypatch):
    _, preview_mod, families = glue
    _, conditioning = families.make_data("sd15")
    _, previewer, _, _ = _train(
        glue, monkeypatch, _settings(preview_mod, [conditioning[0]], every=3), steps=4
    )
    files = sorted(p.name for p in (output_dir / "loralab" / "previews").iterdir())
    assert files == ["step_0_0.png", "step_3_0.png", "step_4_0.png"], files
    with Image.open(output_dir / "loralab" / "previews" / "step_3_0.png") as img:
        assert (
            img.size == (16, 16) and img.text["loralab.step"] == "3"
        )  # latent-to-RGB: one pixel per latent pixel
    assert previewer.seconds > 0


def test_the_run_previews_reach_the_graph_as_one_grid_per_step(glue, loras_dir, output_dir):
    """LOSS_MAP carries the grids (preview_step / preview_images), pixel for pixel the saved PNGs; Preview
    Images turns them into an IMAGE batch in step order; a LOSS_MAP without previews is refused by name."""
    train_mod, preview_mod, families = glue
    from training.config import TrainConfig

    model = families.build_model("sd15")
    latents, conditioning = families.make_data("sd15")
    context, opts = conditioning[0]
    two = [
        [torch.cat([context[:1], context[:1] * 0.5]), opts]
    ]  # a positive of batch 2: two prompts, a grid of two
    settings = preview_mod.PreviewSettings(positive=two, negative=None, vae=None, every_n_steps=2, seed=7, steps=2,
                                           cfg=1.0, sampler_name="euler", scheduler="simple", width=128, height=128,
                                           lora_strength=1.0, filename_prefix="loralab/grid")  # fmt: skip
    config = TrainConfig(steps=3, rank=RANK, learning_rate=0.01, training_dtype="fp32", lora_dtype="fp32")
    loss_map: dict = {}
    train_mod.train(model, [latents], [conditioning], config, "[None]", None, "loralab/pv/ck", preview=settings,
                    loss_map=loss_map)  # fmt: skip
    assert loss_map["preview_step"] == [0, 2, 3]
    images = loss_map["preview_images"]
    assert images.dtype == torch.uint8 and images.shape[0] == 3 and images.shape[-1] == 3
    folder = output_dir / "loralab" / "grid"
    for i, step in enumerate(loss_map["preview_step"]):
        parts = sorted(folder.glob(f"step_{step}_*.png"))
        assert len(parts) == 2, parts
        row = torch.cat([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in parts], 1)
        assert torch.equal(images[i], row), step
    out = preview_mod.LoraLab_PreviewImages.execute({"loss": [1.0], **loss_map})
    batch, steps = out.result
    assert batch.shape == images.shape and batch.dtype == torch.float32 and steps == "0, 2, 3"
    torch.testing.assert_close(batch, images.float() / 255)
    with pytest.raises(ValueError, match="^loss: this LOSS_MAP holds no previews"):
        preview_mod.LoraLab_PreviewImages.execute({"loss": [1.0]})


def test_a_video_model_previews_its_frames_from_the_latent_it_is_given(glue, loras_dir, output_dir):
    """Preview Settings' latent input (a video model's empty latent, 3 latent frames): each preview is an
    animated WEBP of those frames, the sampled latent keeps them, and the grid holds each video's first
    frame."""
    train_mod, preview_mod, families = glue
    from training.config import TrainConfig

    model = families.build_model("wan21_t2v")
    latents, conditioning = families.make_data("wan21_t2v")
    frames = latents["samples"].shape[2] if isinstance(latents, dict) else latents.shape[2]
    empty = {"samples": torch.zeros(1, 16, 3, 8, 8)}
    settings = preview_mod.PreviewSettings(positive=[conditioning[0]], negative=None, vae=None, every_n_steps=0,
                                           seed=3, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                                           width=64, height=64, lora_strength=1.0, filename_prefix="loralab/video",
                                           latent=empty)  # fmt: skip
    made = []

    class Spy(train_mod.Previewer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    train_mod.Previewer, real = Spy, train_mod.Previewer
    try:
        config = TrainConfig(steps=2, rank=RANK, learning_rate=0.01, training_dtype="fp32", lora_dtype="fp32")
        loss_map: dict = {}
        train_mod.train(model, [latents], [conditioning], config, "[None]", None, "loralab/pv/ck", preview=settings,
                        loss_map=loss_map)  # fmt: skip
    finally:
        train_mod.Previewer = real
    assert frames >= 1
    files = sorted(p.name for p in (output_dir / "loralab" / "video").iterdir())
    assert files == ["step_0_0.webp", "step_2_0.webp"], files
    with Image.open(output_dir / "loralab" / "video" / "step_2_0.webp") as video:
        assert video.n_frames == 3 and video.size == (8, 8)
        video.seek(0)
        first = np.asarray(video.convert("RGB"))
    assert made[0].last[2].shape == (1, 16, 3, 8, 8)
    assert loss_map["preview_step"] == [0, 2]
    assert torch.equal(loss_map["preview_images"][1], torch.from_numpy(first.copy()))
