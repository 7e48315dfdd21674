"""Per family, in-process on the checkout's ComfyUI (the tiny models of tests/comfy_testkit): the
objective is the family's own target, gradient checkpointing wraps the family's repeated blocks and
gives the same gradients with less saved-activation memory, and the layer presets pick the family's
attention (and MLP) layers."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from harness.server import TESTKIT_DIR

sys.path.insert(0, str(TESTKIT_DIR))
from families import FAMILIES  # noqa: E402

from lora.inject import AdapterSet, find_targets, frozen, target_excludes, target_patterns  # noqa: E402
from training.autograd_safe import autograd_safe, copy_on_write  # noqa: E402
from training.gradient_checkpointing import InPlaceError, gradient_checkpointing, repeated_blocks  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def glue(graph_inputs, model_forward, trainable):
    return graph_inputs, model_forward, trainable


def _build(families, name):
    if not families.available(name):
        pytest.skip(f"this ComfyUI has no {FAMILIES[name].model_class} model class")
    return families.build_model(name)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_objective_is_the_familys_own_target(glue, families, name):
    _, model_forward, _ = glue
    patcher = _build(families, name)
    assert (
        model_forward.prediction_type(patcher.get_model_object("model_sampling")) == FAMILIES[name].prediction
    )


def _setup(glue, families, name):
    graph_inputs, model_forward, _ = glue
    patcher = families.build_model(name)
    latents, conditioning = families.make_data(name, count=1)
    samples = graph_inputs.build_samples(patcher, [latents], [conditioning], CPU)
    net = patcher.model.diffusion_model
    adapters = AdapterSet.create(find_targets(net), "LoRA", 4, None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in adapters.trainable_parameters():  # both factors non-zero: every layer gets a gradient
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    x0 = samples[0].latent[None]
    x_t = x0 + 0.6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    predict = model_forward.make_predict_x0(patcher)
    return patcher, net, adapters, (lambda: predict(x_t, torch.tensor([0.6]), samples[0].cond)), samples


def _grads_and_saved_bytes(glue, families, name, checkpointing: bool, cow: bool = False):
    _, _, trainable = glue
    with trainable.training_mode():
        patcher, net, adapters, forward, _ = _setup(glue, families, name)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with (
            frozen(net),
            adapters.attached(net),
            gradient_checkpointing(net, checkpointing) as patched,
            autograd_safe(),
        ):
            # saved-tensor hooks turn off autograd's in-place checks: measure in a pass of its own
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward()
            with copy_on_write(cow):
                out = forward()
            out.square().mean().backward()
        grads = [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in adapters.trainable_parameters()
        ]
    return grads, saved[0], patched


@pytest.mark.parametrize("name", list(FAMILIES))
def test_in_place_writes_are_found_only_where_the_model_code_makes_them(glue, families, name):
    _, model_forward, trainable = glue
    _build(families, name)
    with trainable.training_mode():
        patcher, _, _, _, samples = _setup(glue, families, name)
        found = model_forward.in_place_writes(patcher, samples[0], CPU)
    assert bool(found) == FAMILIES[name].in_place_writes, found


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.in_place_writes])
def test_copy_on_write_gives_the_true_gradient_of_in_place_model_code(glue, families, name):
    """Checked against a central finite difference along a random direction of the adapter weights."""
    _, _, trainable = glue
    _build(families, name)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads_and_saved_bytes(glue, families, name, False)
    with pytest.raises(InPlaceError, match="set gradient_checkpointing off"):  # never silently wrong
        _grads_and_saved_bytes(glue, families, name, True)
    grads, _, _ = _grads_and_saved_bytes(glue, families, name, False, cow=True)
    with trainable.training_mode():
        _, net, adapters, forward, _ = _setup(glue, families, name)
        params = list(adapters.trainable_parameters())
        direction = [
            torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)
        ]
        eps = 1e-3

        def loss_at(t):
            with torch.no_grad():
                for p, d in zip(params, direction, strict=True):
                    p.add_(d, alpha=t)
                with frozen(net), adapters.attached(net):
                    value = forward().double().square().mean().item()
                for p, d in zip(params, direction, strict=True):
                    p.sub_(d, alpha=t)
            return value

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum((g.double() * d.double()).sum().item() for g, d in zip(grads, direction, strict=True))
    assert analytic == pytest.approx(numeric, rel=2e-2), (analytic, numeric)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if not f.in_place_writes])
def test_checkpointing_wraps_the_blocks_with_equal_gradients_and_less_saved_memory(glue, families, name):
    _build(families, name)
    plain, plain_bytes, _ = _grads_and_saved_bytes(glue, families, name, False)
    ckpt, ckpt_bytes, patched = _grads_and_saved_bytes(glue, families, name, True)
    assert patched >= 2, f"{name}: {patched} repeated blocks found"
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in plain)
    assert ckpt_bytes < plain_bytes, (name, ckpt_bytes, plain_bytes)


ATTENTION_PART = re.compile(r"(attn|attention)", re.IGNORECASE)
MLP_PART = re.compile(r"(mlp|ff\b|ff\.|ff_[a-z]\.|ffn|feed_forward|linear1|linear2)")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_layer_presets_pick_the_familys_attention_and_mlp_layers(families, name):
    net = _build(families, name).model.diffusion_model

    def pick(preset):
        return set(find_targets(net, target_patterns(preset), target_excludes(preset)))

    everything, attention, attention_mlp = pick("all"), pick("attention"), pick("attention_mlp")
    assert attention, f"{name}: the attention preset picks nothing"
    for path in attention:
        assert ATTENTION_PART.search(path) or re.search(r"single_blocks\.\d+\.linear[12]$", path), path
        assert "modulation" not in path and "embed" not in path, path
    assert attention < attention_mlp <= everything, name
    for path in attention_mlp - attention:
        assert MLP_PART.search(path), path
    # every repeated block that has attention contributes its attention layers
    blocks = {id(b) for b in repeated_blocks(net)}
    with_attention = {path.rsplit(".", 1)[0] for path in attention}
    assert with_attention and blocks


@pytest.mark.parametrize("name", ["wan21_t2v", "hunyuan_video"])
def test_video_latents_of_different_frame_counts_train_in_one_run(comfy_glue, families, name):
    """Clips of 1, 2 and 3 latent frames in one run: each micro-batch holds one shape."""
    train_mod = comfy_glue("train")
    from training.config import TrainConfig

    patcher = _build(families, name)
    latents, positive = [], []
    for frames in (1, 2, 3):
        lat, cond = families.make_data(name, count=2, seed=frames)
        lat["samples"] = lat["samples"][:, :, :1].expand(-1, -1, frames, -1, -1).clone()
        latents.append(lat)
        positive.append(cond)
    config = TrainConfig(
        steps=4, batch_size=2, learning_rate=0.002, rank=4, training_dtype="fp32", lora_dtype="fp32"
    )
    _, losses, total = train_mod.train(patcher, latents, positive, config, "[None]", None, "loralab/test")
    assert total == 4 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
