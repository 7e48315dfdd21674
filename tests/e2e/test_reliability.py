"""Reliability and security of LoRA Lab in a real ComfyUI server: bad inputs, bad files, hostile files,
diverging runs, interrupts, many prompts, a full or read-only disk.

Every bad input must end in an ``execution_error`` (or a ``/prompt`` validation error, ``PromptRejected``)
whose message names the input and says what to change; nothing on disk may change except intended
outputs (the base directory is snapshotted before and after), and afterwards the server still answers
and a normal tiny training still succeeds (checked once at the end of each group).

Covered elsewhere and not repeated here:
  * 4 latents with 3 positives -> error naming ``positive`` and both counts:
    ``test_train_node.py::test_positive_count_must_match_latents``
  * latents of mixed sizes train: ``test_train_node.py::test_mixed_size_latent_list_trains``
  * existing_lora of another algorithm: ``test_train_node.py::test_existing_lora_algorithm_mismatch_is_an_error``
  * SaveLora prefixes with ``..`` / absolute paths / odd characters:
    ``test_files_and_options.py::test_escaping_prefix_is_refused_when_queued``,
    ``::test_escaping_prefix_from_a_link_fails_at_execution``, ``::test_odd_prefix_characters_are_sanitised``
  * interrupt: stops quickly, nothing saved, base model's sampler output bit-identical afterwards:
    ``test_train_node.py::test_interrupt_stops_training_and_leaves_the_model_clean``
  * LoKr on layers with prime dimensions (the tiny model has none): ``tests/lora/test_lora_api.py``
    (prime dims: w1 1x1) and the ``lokr-*-prime`` cases of ``tests/lora/test_lora_comfy_parity.py`` /
    ``test_lora_lycoris_parity.py``
  * atomic writes when the write fails (unit level, also where mounting a tmpfs is not allowed):
    ``tests/training/test_lorafile.py::test_failed_write_leaves_nothing_behind``,
    ``::test_safetensors_io_error_names_the_file``

All files this module writes lie under ``models/loras/e2e_rel*`` and ``input/e2e_rel-*``.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.client import PromptRejected
from tests.e2e.graphs import (
    LORA_OUT,
    LOSS_OUT,
    MODEL_OUT,
    STEPS_OUT,
    Graph,
    assert_progress_bar,
    cached_nodes,
    denoise_value,
    executed_nodes,
    lora_metadata,
    lora_tensors,
    run_logged,
    run_ok,
    saved_lora,
    snapshot_diff,
    tree_snapshot,
    write_latent_dataset,
)
from training.tinydata import make_latent_dataset

pytestmark = pytest.mark.server

DIR = "e2e_rel"  # sub-folder of models/loras for this module's files
LORA_KEY_NOT_LOADED = "lora key not loaded"
# Geometry of the tiny dataset (scripts/make_tiny_models.py): SD3 latents, 8 context tokens of width 64.
CHANNELS, CONTEXT_DIM, TOKENS, POOLED_DIM = 16, 64, 8, 64
SNAPSHOT_SKIP = ("user",)  # ComfyUI's sqlite database lives there and changes with every prompt

_health_seed = iter(range(9000, 10000))


# ---------------------------------------------------------------------- helpers


def node_error(result, node) -> str:
    """The exception message of an execution_error raised by ``node``."""
    assert result.status == "error", f"expected an execution error, got {result.status}"
    assert result.error is not None
    assert str(result.error.get("node_id")) == node.id, result.error_message
    return str(result.error.get("exception_message", ""))


def loras_root(comfy_server) -> pathlib.Path:
    return comfy_server.base_dir / "models" / "loras"


def snapshot(comfy_server) -> dict:
    return tree_snapshot(comfy_server.base_dir, skip=SNAPSHOT_SKIP)


def assert_unchanged(comfy_server, before: dict) -> None:
    diff = snapshot_diff(before, snapshot(comfy_server))
    assert diff == {"added": [], "removed": [], "changed": []}, diff


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors.values() if t.is_floating_point())


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def tiny_training(g: Graph, seed: int, prefix: str, steps: int = 1):
    """A normal tiny training of the fixture's model on the fixture's dataset, saved: (trainer, saver)."""
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=steps, seed=seed)
    return trainer, g.save_lora(trainer[LORA_OUT], prefix, steps=trainer[STEPS_OUT])


def assert_server_healthy(comfy_server) -> None:
    """The server answers, and a normal tiny training (a seed no other prompt used) trains and saves a
    finite LoRA."""
    comfy = comfy_server.client
    assert comfy.system_stats()["system"], "no /system_stats answer"
    assert comfy_server.server.is_running()
    g = Graph()
    trainer, saver = tiny_training(g, next(_health_seed), f"{DIR}/health", steps=2)
    result = run_ok(comfy, g.prompt)
    assert trainer.id in executed_nodes(result) and trainer.id not in cached_nodes(result)
    name, path = saved_lora(result, saver)
    assert name.startswith(f"{DIR}/health_2_steps_"), name
    assert all_finite(lora_tensors(path))


def dataset(n: int = 4, seed: int = 300, height: int = 16, width: int = 16) -> dict[str, torch.Tensor]:
    return make_latent_dataset(n, CHANNELS, height, width, CONTEXT_DIM, TOKENS, POOLED_DIM, seed=seed)


# ---------------------------------------------------------------------- 1: bad data


def _empty() -> dict:
    return {k: v[:0].clone() for k, v in dataset().items()}


def _poisoned(key: str, value: float) -> dict:
    data = dataset()
    data[key][2].view(-1)[5] = value  # one value of the third image / conditioning
    return data


# case -> (dataset tensors, words the trainer's message must contain)
BAD_DATA = {
    "empty_batch": (_empty, ["latents", "empty"]),
    "nan_latents": (lambda: _poisoned("latents", math.nan), ["latents", "NaN"]),
    "inf_latents": (lambda: _poisoned("latents", math.inf), ["latents", "inf"]),
    "nan_context": (lambda: _poisoned("context", math.nan), ["positive", "context", "NaN"]),
    "inf_context": (lambda: _poisoned("context", -math.inf), ["positive", "context", "inf"]),
    "nan_pooled": (lambda: _poisoned("pooled", math.nan), ["positive", "pooled", "NaN"]),
    "inf_pooled": (lambda: _poisoned("pooled", math.inf), ["positive", "pooled", "inf"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_dataset_is_an_error_naming_the_input(comfy_server, case):
    make, words = BAD_DATA[case]
    name = write_latent_dataset(comfy_server.base_dir, f"e2e_rel-{case}.safetensors", make())
    before = snapshot(comfy_server)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset(name)
    trainer = g.train(model, latents, positive, steps=2, seed=1)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_{case}")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, trainer)
    print(f"{case}: {message}")
    for word in words:
        assert word in message, (word, message)
    assert "image 3" in message or "conditioning 3" in message or case == "empty_batch", message
    assert_unchanged(comfy_server, before)


def test_server_healthy_after_bad_data(comfy_server):
    assert_server_healthy(comfy_server)


# ---------------------------------------------------------------------- 2: odd but valid shapes


SHAPE_RUNS = {
    "batch64": {"batch_size": 64},
    "lora_rank128": {"algorithm": "LoRA", "rank": 128},
    "loha_rank128": {"algorithm": "LoHa", "rank": 128},
    "lokr_rank128": {"algorithm": "LoKr", "rank": 128},
    "lokr_rank1": {"algorithm": "LoKr", "rank": 1},
}
SHAPE_STEPS = 3


def _shape_graph():
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainers = {
        label: g.train(model, latents, positive, steps=SHAPE_STEPS, seed=17, **widgets)
        for label, widgets in SHAPE_RUNS.items()
    }
    return g, model, latents, positive, trainers


@pytest.fixture(scope="module")
def shapes(comfy_server):
    """Prompt 1: batch_size 64 on 4 latents, rank 128 (above the 64-wide layers of the tiny model) for
    LoRA / LoHa / LoKr, LoKr at rank 1; each saved, the batch-64 loss plotted. Prompt 2 (trainings
    cached): the denoising loss of the base model, of each model_with_lora and of each saved file
    through stock LoraLoaderModelOnly."""
    g, _, _, _, trainers = _shape_graph()
    savers = {
        label: g.save_lora(t[LORA_OUT], f"{DIR}/shape_{label}", steps=t[STEPS_OUT])
        for label, t in trainers.items()
    }
    plot = g.plot_loss(trainers["batch64"][LOSS_OUT], f"{DIR}/loss_batch64")
    first = run_ok(comfy_server.client, g.prompt)
    files = {label: saved_lora(first, s) for label, s in savers.items()}

    g2, model2, latents2, positive2, trainers2 = _shape_graph()
    base = g2.denoise_loss(model2, latents2, positive2, levels=2)
    live = {
        label: g2.denoise_loss(t[MODEL_OUT], latents2, positive2, levels=2) for label, t in trainers2.items()
    }
    from_file = {
        label: g2.denoise_loss(g2.lora_loader(model2, name), latents2, positive2, levels=2)
        for label, (name, _) in files.items()
    }
    second, log = run_logged(comfy_server, g2.prompt)
    assert second.status == "success", second.error_message
    assert all(t.id in cached_nodes(second) for t in trainers2.values()), (
        "prompt 2 should reuse the trainings"
    )
    return {
        "first": first, "second": second, "log": log, "files": files, "plot": plot, "trainers": trainers,
        "base": denoise_value(second, base),
        "live": {k: denoise_value(second, v) for k, v in live.items()},
        "from_file": {k: denoise_value(second, v) for k, v in from_file.items()},
    }  # fmt: skip


def test_batch_larger_than_dataset_trains(shapes, comfy_server):
    from PIL import Image

    name, path = shapes["files"]["batch64"]
    meta = lora_metadata(path)
    assert meta["loralab.steps"] == str(SHAPE_STEPS) and meta["loralab.dataset_size"] == "4"
    assert math.isfinite(float(meta["loralab.final_loss"]))
    assert_progress_bar(shapes["first"], shapes["trainers"]["batch64"], SHAPE_STEPS)
    # The LOSS_MAP holds one value per step (PlotLoss writes how many it got into its PNG).
    image = shapes["first"].outputs[shapes["plot"].id]["images"][0]
    with Image.open(comfy_server.output_dir / image["subfolder"] / image["filename"]) as im:
        assert im.text["loralab.steps"] == str(SHAPE_STEPS)
        assert float(im.text["loralab.final_loss"]) == pytest.approx(
            float(meta["loralab.final_loss"]), rel=1e-6
        )


@pytest.mark.parametrize("label", ["lora_rank128", "loha_rank128"])
def test_rank_above_layer_size_is_clamped_per_layer(shapes, label):
    tensors = lora_tensors(shapes["files"][label][1])
    assert lora_metadata(shapes["files"][label][1])["loralab.rank"] == "128"
    first, second = (
        ("lora_down.weight", "lora_up.weight") if label.startswith("lora") else ("hada_w1_b", "hada_w1_a")
    )
    ranks = {}
    for key, down in tensors.items():
        if not key.endswith("." + first):
            continue
        module = key[: -len(first) - 1]
        up = tensors[f"{module}.{second}"]
        rank, fan_in, fan_out = down.shape[0], math.prod(down.shape[1:]), up.shape[0]
        assert rank == min(128, fan_in, fan_out), (key, tuple(down.shape), tuple(up.shape))
        assert float(tensors[f"{module}.alpha"]) == pytest.approx(rank), key  # alpha = rank: scale 1
        ranks[module] = rank
    print(f"{label}: ranks used {sorted(set(ranks.values()))} over {len(ranks)} layers")
    assert 64 in ranks.values() and 128 in ranks.values(), "expected clamped (64) and full (128) layers"


@pytest.mark.parametrize("label", list(SHAPE_RUNS))
def test_odd_shape_files_load_with_stock_loader(shapes, label):
    bad = [line for line in shapes["log"].splitlines() if LORA_KEY_NOT_LOADED in line]
    assert not bad, "\n".join(bad[:20])
    assert all_finite(lora_tensors(shapes["files"][label][1]))
    base, live, from_file = shapes["base"], shapes["live"][label], shapes["from_file"][label]
    print(
        f"{label}: denoise loss base {base:.5f}, model_with_lora {live:.5f}, file via stock loader {from_file:.5f}"
    )
    assert from_file == pytest.approx(live, rel=1e-4), (label, live, from_file)
    assert abs(from_file - base) > 1e-5, "the file changed nothing"


def test_server_healthy_after_odd_shapes(comfy_server):
    assert_server_healthy(comfy_server)


# ---------------------------------------------------------------------- 3: a diverging run

# SGD (momentum 0.9) at the largest learning rate, no gradient clipping: on the tiny model the loss
# blows up to NaN/inf within 10-13 steps for every seed tried (1-8, fp32 and bf16 alike), so a
# checkpoint every 2 steps leaves several finite ones behind.
DIVERGE = {
    "optimizer": "SGD",
    "learning_rate": 1.0,
    "seed": 5,
    "training_dtype": "fp32",
    "lora_dtype": "fp32",
}
DIVERGE_STEPS, DIVERGE_SAVE_EVERY = 60, 2


def test_diverging_run_stops_naming_learning_rate_and_keeps_finite_checkpoints(comfy_server):
    comfy = comfy_server.client
    ck_folder = loras_root(comfy_server) / DIR / "diverge"
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = g.training_options(
        max_grad_norm=0.0,
        save_every=DIVERGE_SAVE_EVERY,
        keep_checkpoints=0,
        checkpoint_prefix=f"{DIR}/diverge/ck",
    )
    trainer = g.train_with_options(model, latents, positive, options, steps=DIVERGE_STEPS, **DIVERGE)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/diverge/final", steps=trainer[STEPS_OUT])
    result = comfy.run(g.prompt, timeout=300)
    message = node_error(result, trainer)
    print(f"diverging run: {message}")
    assert "learning_rate" in message and "diverged" in message, message
    step = int(re.search(r"at step (\d+)", message).group(1))
    assert DIVERGE_SAVE_EVERY < step < DIVERGE_STEPS, step

    names = sorted(p.name for p in ck_folder.iterdir())
    assert not [n for n in names if "final" in n], names  # SaveLora never ran
    assert not [n for n in names if ".tmp" in n], names  # no temporary files left
    loras = [n for n in names if n.endswith(".safetensors")]
    saved_steps = sorted(int(re.match(r"ck_(\d+)_steps_\d{5}\.safetensors$", n).group(1)) for n in loras)
    expected = list(range(DIVERGE_SAVE_EVERY, step, DIVERGE_SAVE_EVERY))
    assert saved_steps == expected, (saved_steps, step)
    assert sorted(names) == sorted(loras + [n.replace(".safetensors", ".lorastate") for n in loras]), names
    for n in names:  # LoRA files and their training states are safetensors: every value finite
        assert all_finite(load_file(str(ck_folder / n))), n
    last = next(n for n in loras if n.startswith(f"ck_{expected[-1]}_steps_"))
    meta = lora_metadata(ck_folder / last)
    assert meta["loralab.steps"] == str(expected[-1]) and math.isfinite(float(meta["loralab.final_loss"]))

    # The last finite checkpoint loads with stock LoraLoaderModelOnly and gives a finite loss.
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    loss = g.denoise_loss(g.lora_loader(model, f"{DIR}/diverge/{last}"), latents, positive, levels=2)
    checked, log = run_logged(comfy_server, g.prompt)
    assert checked.status == "success", checked.error_message
    assert math.isfinite(denoise_value(checked, loss))
    assert not [line for line in log.splitlines() if LORA_KEY_NOT_LOADED in line]


# ---------------------------------------------------------------------- 3b: out of memory

OOM_STEPS = 6


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_out_of_memory_is_an_error_saying_what_to_change_and_the_next_prompt_trains(comfy_server, kind):
    """The allocator's refusal injected into a training forward (the test kit's OutOfMemoryAt on the tiny
    SD1.5 UNet, at its 30th self-attention run with gradients on: a step or two in): an error naming the step,
    the memory in use and settings to change; the checkpoints before it are complete and a next
    prompt continues from the last of them on the unpatched model."""
    comfy = comfy_server.client
    ck_folder = loras_root(comfy_server) / DIR / f"oom_{kind}"
    g = Graph()
    tiny = g.add("LoraLabTest_TinyFamily", family="sd15", weight_dtype="default", seed=0, count=2)
    failing = g.add("LoraLabTest_OutOfMemoryAt", model=tiny[0], call=30, kind=kind)
    options = g.training_options(save_every=1, keep_checkpoints=0, checkpoint_prefix=f"{DIR}/oom_{kind}/ck")
    trainer = g.train_with_options(failing[0], tiny[1], tiny[2], options, steps=OOM_STEPS, rank=4,
                                   training_dtype="fp32", lora_dtype="fp32")  # fmt: skip
    g.save_lora(trainer[LORA_OUT], f"{DIR}/oom_{kind}/final")
    result = comfy.run(g.prompt, timeout=300)
    message = node_error(result, trainer)
    print(f"out of memory ({kind}): {message}")
    found = re.search(
        rf"out of memory at step (\d+) of {OOM_STEPS} on cpu \(this process holds [\d.]+ GiB", message
    )
    assert found and 1 < int(found.group(1)) < OOM_STEPS, message
    step = int(found.group(1))
    assert (
        "To fit:" in message and "weight_dtype fp8_e4m3fn" in message and "training_dtype to bf16" in message
    )
    assert "injected by the test kit" in message  # what the allocator said

    names = sorted(p.name for p in ck_folder.iterdir())
    loras = [n for n in names if n.endswith(".safetensors")]
    assert [int(re.match(r"ck_(\d+)_steps_", n).group(1)) for n in loras] == list(range(1, step)), (
        names
    )  # no final
    assert not [n for n in names if ".tmp" in n], names

    g = Graph()
    tiny = g.add("LoraLabTest_TinyFamily", family="sd15", weight_dtype="default", seed=0, count=2)
    trainer = g.train(tiny[0], tiny[1], tiny[2], steps=1, rank=4, training_dtype="fp32", lora_dtype="fp32",
                      existing_lora=f"{DIR}/oom_{kind}/{loras[-1]}")  # fmt: skip
    save = g.save_lora(trainer[LORA_OUT], f"{DIR}/oom_{kind}/continued", steps=trainer[STEPS_OUT])
    after = run_ok(comfy, g.prompt)
    assert lora_metadata(saved_lora(after, save)[1])["loralab.steps"] == str(step)  # the checkpoint's + 1


# ---------------------------------------------------------------------- 4: bad existing_lora files


def _real_lora() -> dict[str, torch.Tensor]:
    """A valid LoRA for two layers of the tiny SD3 model (ComfyUI key names)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer, (fan_out, fan_in) in {
        "joint_blocks.0.x_block.attn.qkv": (384, 128),
        "context_embedder": (128, 64),
    }.items():
        out[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(4, fan_in, generator=gen) * 0.01
        out[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(fan_out, 4, generator=gen) * 0.01
        out[f"diffusion_model.{layer}.alpha"] = torch.tensor(4.0)
    return out


class _Trap:
    """Unpickling this creates ``marker`` (what any code in a hostile pickle could do)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def bad_loras(comfy_server, tmp_path_factory):
    """Broken, foreign and hostile files in models/loras/e2e_rel/bad/. The pickles' __reduce__ creates a
    marker file when they are unpickled; a twin with its own marker proves that the trap works."""
    folder = loras_root(comfy_server) / DIR / "bad"
    folder.mkdir(parents=True, exist_ok=True)
    real = folder / "real.safetensors"
    save_file(_real_lora(), str(real))
    data = real.read_bytes()
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "random.safetensors").write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )
    # SD1.5 UNet layer names (this SD3 model has no input_blocks), in ComfyUI and in kohya spelling.
    foreign = {
        "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(320, 4),
        "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(4, 320),
        "diffusion_model.input_blocks.1.1.proj_in.alpha": torch.tensor(4.0),
    }
    save_file(foreign, str(folder / "sd15.safetensors"))
    kohya = {k.replace("diffusion_model.input_blocks.1.1.proj_in", "lora_unet_input_blocks_1_1_proj_in"): v
             for k, v in foreign.items()}  # fmt: skip
    save_file(kohya, str(folder / "sd15_kohya.safetensors"))

    markers = tmp_path_factory.mktemp("pickle_markers")
    marker = markers / "UNPICKLED"
    for suffix in (".ckpt", ".pt"):
        torch.save({"state_dict": {"x": torch.zeros(1)}, "trap": _Trap(marker)}, folder / f"evil{suffix}")
    control = markers / "control.pt"
    control_marker = markers / "CONTROL_UNPICKLED"
    torch.save({"trap": _Trap(control_marker)}, control)
    with open(control, "rb") as f:
        torch.load(f, weights_only=False)["trap"].close()  # our own file, unpickled on purpose
    assert control_marker.exists(), "control: the trap pickle did not fire when unpickled"
    return {"folder": folder, "marker": marker}


BAD_LORA_FILES = {
    "empty.safetensors": ["empty", "0 bytes"],
    "truncated.safetensors": ["truncated"],
    "random.safetensors": ["not a safetensors file"],
    "sd15.safetensors": ["another model", "input_blocks"],
    "sd15_kohya.safetensors": ["another model", "lora_unet_input_blocks"],
    "evil.ckpt": ["pickle", "never unpickles", ".safetensors"],
    "evil.pt": ["pickle", "never unpickles", ".safetensors"],
}


@pytest.mark.parametrize("file", list(BAD_LORA_FILES))
def test_bad_existing_lora_is_an_error_naming_input_and_file(comfy_server, bad_loras, file):
    before = snapshot(comfy_server)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, seed=2, existing_lora=f"{DIR}/bad/{file}")
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_existing")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, trainer)
    print(f"{file}: {message}")
    assert message.startswith("existing_lora:"), message
    assert file in message, message
    for word in BAD_LORA_FILES[file]:
        assert word in message, (word, message)
    assert not bad_loras["marker"].exists(), "a pickle file was unpickled"
    assert_unchanged(comfy_server, before)


def test_missing_existing_lora_is_refused_when_queued(comfy_server, bad_loras):
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, existing_lora=f"{DIR}/bad/no_such_file.safetensors")
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_missing")
    with pytest.raises(PromptRejected) as caught:
        comfy_server.client.run(g.prompt, timeout=60)
    errors = caught.value.node_errors[trainer.id]["errors"]
    print(f"missing file: {errors}")
    assert [e["extra_info"]["input_name"] for e in errors] == ["existing_lora"], errors
    assert "no_such_file.safetensors" in errors[0]["details"] and "[None]" in errors[0]["details"]


@pytest.mark.parametrize("field,value,kind", [("rank", 0, "smaller"), ("steps", 100_001, "bigger")])
def test_out_of_range_trainer_input_is_refused_when_queued(comfy_server, field, value, kind):
    """The trainer's validate_inputs names only existing_lora, so ComfyUI still applies the schema's
    min / max to every other input (with **kwargs it would skip them all)."""
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, **{field: value})
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_range")
    with pytest.raises(PromptRejected) as caught:
        comfy_server.client.run(g.prompt, timeout=60)
    errors = caught.value.node_errors[trainer.id]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == [field], errors
    assert errors[0]["type"] == f"value_{kind}_than_{'min' if kind == 'smaller' else 'max'}", errors


@pytest.mark.parametrize("file", ["evil.ckpt", "evil.pt"])
def test_load_lora_refuses_pickle_files_without_unpickling(comfy_server, bad_loras, file):
    """LoraLab_LoadLora lists only .safetensors files; a pickle's name sent anyway is refused, either by
    /prompt validation or when the node runs, and never unpickled."""
    g = Graph()
    loaded = g.load_lora(f"{DIR}/bad/{file}")
    g.save_lora(loaded[0], f"{DIR}/never_loaded")
    try:
        result = comfy_server.client.run(g.prompt, timeout=60)
    except PromptRejected as rejected:
        message = str(rejected)
    else:
        message = node_error(result, loaded)
    print(f"LoadLora {file}: {message}")
    # Our refusal names the pickle risk; a ComfyUI whose loras list leaves such files out refuses the
    # name first, as not in the list.
    assert file in message and ("pickle" in message or "not in" in message), message
    assert not bad_loras["marker"].exists(), "a pickle file was unpickled"


def test_server_healthy_after_bad_existing_lora(comfy_server, bad_loras):
    assert_server_healthy(comfy_server)
    assert not bad_loras["marker"].exists()


# ---------------------------------------------------------------------- 5: checkpoint_prefix outside the loras folder

EVIL_CHECKPOINT_PREFIXES = ["../evil_ck", "/abs/evil_ck", "a/../../evil_ck"]


@pytest.mark.parametrize("prefix", EVIL_CHECKPOINT_PREFIXES)
def test_escaping_checkpoint_prefix_is_refused_when_queued(comfy_server, prefix):
    """Refused by the options node's /prompt validation, before any training work."""
    top = comfy_server.base_dir.parent
    outside = set(tree_snapshot(top, skip=(comfy_server.base_dir.name,)))  # names only: the server log grows
    before = snapshot(comfy_server)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = g.training_options(save_every=1, checkpoint_prefix=prefix)
    trainer = g.train_with_options(model, latents, positive, options, steps=2, seed=3)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_ck")
    with pytest.raises(PromptRejected) as caught:
        comfy_server.client.run(g.prompt, timeout=60)
    assert set(caught.value.node_errors) == {options.id}, caught.value.node_errors
    errors = caught.value.node_errors[options.id]["errors"]
    print(f"{prefix!r}: {errors[0]['details']}")
    assert [e["extra_info"]["input_name"] for e in errors] == ["checkpoint_prefix"], errors
    assert errors[0]["details"].count("checkpoint_prefix") >= 2 and prefix in errors[0]["details"]
    assert_unchanged(comfy_server, before)
    assert set(tree_snapshot(top, skip=(comfy_server.base_dir.name,))) == outside
    assert not pathlib.Path("/abs").exists()


def test_escaping_checkpoint_prefix_from_a_link_fails_before_training(comfy_server):
    before = snapshot(comfy_server)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    prefix = g.add("PrimitiveString", value="../evil_linked_ck")[0]
    options = g.training_options(save_every=1)
    g.prompt[options.id]["inputs"]["checkpoint_prefix"] = prefix
    trainer = g.train_with_options(model, latents, positive, options, steps=2, seed=4)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_ck_linked")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, options)
    print(f"linked '../evil_linked_ck': {message}")
    assert "checkpoint_prefix" in message and ".." in message, message
    assert trainer.id not in executed_nodes(result)
    assert_unchanged(comfy_server, before)


def test_server_healthy_after_bad_prefixes(comfy_server):
    assert_server_healthy(comfy_server)


# ---------------------------------------------------------------------- 6: interrupt leaves nothing attached


def _fp32_training(prefix: str, steps: int):
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    # The checkpoint prefix (no checkpoint is written: save_every 0) makes each run's trainer inputs
    # unique, so ComfyUI re-executes it instead of answering from its cache (newer ComfyUI keeps
    # outputs of earlier prompts whose inputs match), without changing what is trained.
    options = g.training_options(checkpoint_prefix=f"{prefix}/ckpt")
    trainer = g.train_with_options(
        model,
        latents,
        positive,
        options,
        steps=steps,
        learning_rate=3e-3,
        seed=444,
        training_dtype="fp32",
        lora_dtype="fp32",
    )
    return g, trainer, g.save_lora(trainer[LORA_OUT], prefix, steps=trainer[STEPS_OUT])


def test_training_after_an_interrupt_is_bit_identical(comfy_server):
    """Training is deterministic (test_train_node::test_same_seed_same_inputs_give_identical_weights);
    an adapter hook left on the model's modules by an interrupted run would change the next run's
    weights. The same 3-step fp32 training before and after an interrupt gives identical tensors.
    (A leftover gradient-checkpointing wrapper computes the same values and cannot be seen from outside.)"""
    comfy = comfy_server.client
    g, trainer, saver = _fp32_training(f"{DIR}/intr_before", 3)
    before = run_ok(comfy, g.prompt)

    g, long_run, _ = _fp32_training(f"{DIR}/intr_never", 5000)
    asked: list[float] = []

    def on_event(etype: str, data: dict) -> None:
        if etype == "progress" and str(data.get("node")) == long_run.id and not asked:
            asked.append(time.monotonic())
            comfy.interrupt()

    interrupted = comfy.run(g.prompt, timeout=240, on_event=on_event)
    assert asked and interrupted.status == "interrupted", interrupted.error_message
    assert not list((loras_root(comfy_server) / DIR).glob("intr_never*"))

    g, trainer2, saver2 = _fp32_training(f"{DIR}/intr_after", 3)
    after = run_ok(comfy, g.prompt)
    assert trainer2.id in executed_nodes(after) and trainer2.id not in cached_nodes(after)
    a, b = lora_tensors(saved_lora(before, saver)[1]), lora_tensors(saved_lora(after, saver2)[1])
    assert set(a) == set(b) and a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after the interrupt, e.g. {differ[:3]}"


# ---------------------------------------------------------------------- 7: many prompts

MANY, WARMUP, QUEUED = 20, 3, 5


def test_twenty_trainings_in_a_row_do_not_grow_memory(comfy_server):
    comfy = comfy_server.client
    pid = comfy_server.server.pid
    rss = []
    started = time.monotonic()
    for i in range(MANY):
        g = Graph()
        trainer, _ = tiny_training(g, 5000 + i, f"{DIR}/many/run")
        result = run_ok(comfy, g.prompt, timeout=180)
        assert trainer.id not in cached_nodes(result)
        rss.append(vm_rss_kib(pid))
    took = time.monotonic() - started
    growth = rss[-1] / rss[WARMUP - 1] - 1
    print(f"{MANY} trainings in {took:.1f} s; VmRSS (MiB) {[round(r / 1024) for r in rss]}; "
          f"growth after warm-up {growth * 100:+.2f}%")  # fmt: skip
    assert growth < 0.05, rss
    assert len(list((loras_root(comfy_server) / DIR / "many").glob("run_1_steps_*.safetensors"))) == MANY


def _start_time(entry: dict, event: str) -> int:
    for name, data in entry["status"]["messages"]:
        if name == event:
            return int(data["timestamp"])
    raise AssertionError(f"no {event} in {entry['status']}")


def test_prompts_queued_at_once_all_complete_in_order(comfy_server):
    comfy = comfy_server.client
    ids, savers = [], []
    for i in range(QUEUED):
        g = Graph()
        _, saver = tiny_training(g, 6000 + i, f"{DIR}/queued/q{i}")
        ids.append(comfy.queue_prompt(g.prompt))
        savers.append(saver)
    entries = [comfy.wait_for_history(pid, timeout=300) for pid in ids]
    for pid, entry in zip(ids, entries, strict=True):
        assert entry["status"]["status_str"] == "success", (pid, entry["status"])
    numbers = [entry["prompt"][0] for entry in entries]
    assert numbers == sorted(numbers) and len(set(numbers)) == QUEUED, numbers
    starts = [_start_time(e, "execution_start") for e in entries]
    ends = [_start_time(e, "execution_success") for e in entries]
    print(f"queued {QUEUED}: starts (ms after the first) {[s - starts[0] for s in starts]}")
    for k in range(1, QUEUED):
        assert starts[k] >= ends[k - 1], ("prompt", k, "started before the one queued ahead of it ended")
    for i, (entry, saver) in enumerate(zip(entries, savers, strict=True)):
        files = entry["outputs"][saver.id]["loras"]
        assert len(files) == 1 and files[0]["filename"].startswith(f"{DIR}/queued/q{i}_1_steps_"), files


def test_server_healthy_after_many_prompts(comfy_server):
    assert_server_healthy(comfy_server)


# ---------------------------------------------------------------------- 8: full or read-only disk

# tmpfs sizes: "full" has 64 KiB with 40 000 bytes taken (a ~200 KB LoRA starts to write, then hits
# ENOSPC); "ro" is mounted read-only (EROFS, which root cannot override) and big enough (4 MiB) for the
# checkpoints' free-space check to pass, so the write itself fails; "state" holds a checkpoint's LoRA
# (~200 KB in bf16) but not its training state (fp32 weights and AdamW moments, ~1.2 MB).
FILESYSTEMS = {"full": "size=64k", "ro": "size=4m,ro", "state": "size=512k"}
FILLER = 40_000


@pytest.fixture(scope="module")
def small_disks(comfy_server, tmp_path_factory):
    """Tiny tmpfs mounts linked into the loras folder as e2e_rel_<label>/. Needs mount privileges (root
    with CAP_SYS_ADMIN); skipped where mounting is not allowed (see the unit tests named at the top)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; covered at unit level by tests/training/test_lorafile.py")
    root = tmp_path_factory.mktemp("small_disks")
    mounted: list[pathlib.Path] = []
    links: list[pathlib.Path] = []
    try:
        for label, opts in FILESYSTEMS.items():
            point = root / label
            point.mkdir()
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); covered at unit level by "
                            "tests/training/test_lorafile.py")  # fmt: skip
            mounted.append(point)
            link = loras_root(comfy_server) / f"{DIR}_{label}"
            link.symlink_to(point, target_is_directory=True)
            links.append(link)
        (root / "full" / "filler").write_bytes(b"\0" * FILLER)
        yield {label: root / label for label in FILESYSTEMS}
    finally:
        for link in links:
            link.unlink(missing_ok=True)
        for point in reversed(mounted):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    "label,cause", [("full", "No space left on device"), ("ro", "Read-only file system")]
)
def test_save_lora_on_full_or_read_only_disk(comfy_server, small_disks, label, cause):
    folder = small_disks[label]
    before = _listing(folder)
    g = Graph()
    trainer, saver = tiny_training(g, 70 + len(label), f"{DIR}_{label}/lora")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, saver)
    print(f"SaveLora on {label}: {message}")
    assert f"{DIR}_{label}/lora_1_steps_00001.safetensors" in message and cause in message, message
    assert "writable" in message, message
    assert _listing(folder) == before, "a partial or temporary file was left behind"


@pytest.mark.parametrize(
    "label,cause,failed",
    [
        ("full", "not enough free space", "ck_1_steps_00001.safetensors"),
        ("ro", "Read-only file system", "ck_1_steps_00001.lorastate"),
        ("state", "not enough free space", "ck_1_steps_00001.lorastate"),
    ],
)
def test_checkpoint_on_full_or_read_only_disk(comfy_server, small_disks, label, cause, failed):
    """A checkpoint that cannot be written stops training with an error naming checkpoint_prefix and the
    file. On "full" and "state" the free-space check refuses it before anything is written (on "state"
    the LoRA half would fit, its training state would not), naming save_every, keep_checkpoints and both
    files; on "ro" the training state, written first, fails. No LoRA file without its state is left."""
    folder = small_disks[label]
    before = _listing(folder)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = g.training_options(save_every=1, checkpoint_prefix=f"{DIR}_{label}/ck")
    trainer = g.train_with_options(model, latents, positive, options, steps=3, seed=80 + len(label))
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_ck_{label}")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, trainer)
    print(f"checkpoint on {label}: {message}")
    assert "checkpoint_prefix" in message and cause in message, message
    assert f"{DIR}_{label}/{failed}" in message, message
    if cause == "not enough free space":
        assert (
            "No space left on device" in message and "save_every" in message and "keep_checkpoints" in message
        )
        assert "ck_1_steps_00001.safetensors" in message and "ck_1_steps_00001.lorastate" in message
    assert _listing(folder) == before, "a partial checkpoint or temporary file was left behind"
    assert not list((loras_root(comfy_server) / DIR).glob(f"never_ck_{label}*"))


def test_server_healthy_after_disk_errors(comfy_server, small_disks):
    assert_server_healthy(comfy_server)
