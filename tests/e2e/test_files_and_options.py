"""End-to-end tests of LoRA Lab's companion nodes and training options in a real ComfyUI server.

Save LoRA (names, counters, metadata, key formats, prefix safety), Load LoRA, Apply LoRA (strengths),
Plot Loss, and the Training Options node (target presets and patterns, alpha, learning-rate
schedules as the live ``loralab.progress`` events report them, checkpoints and exact resume).

One server for the session (``comfy_server``), the tiny SD3 model and the tiny 4-latent dataset. Every
file this module writes lies under ``models/loras/e2e_fo/`` (or ``output/e2e_fo/``), except the one
test of a prefix at the root of the loras folder. Trainings are short and fp32 (training and adapter
dtype), so LoRA files, LORA_MODEL links and ``model_with_lora`` hold the very same fp32 weights and the
sampler outputs of the different ways to apply them can be compared bit for bit.

ComfyUI caches node outputs between consecutive prompts: a prompt that rebuilds the same training
graph (same node ids and inputs) gets the trained adapter without training again; a node whose inputs
differ from every node of the previous prompt always runs.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import pathlib
import re
import shutil

import pytest
import torch
from PIL import Image

from harness.client import PromptRejected
from tests.e2e.graphs import (
    LOADED_LORA_OUT,
    LOADED_STEPS_OUT,
    LORA_OUT,
    LOSS_OUT,
    MODEL_OUT,
    STEPS_OUT,
    Graph,
    cached_nodes,
    executed_nodes,
    load_latent,
    lora_metadata,
    lora_tensors,
    loralab_progress,
    run_logged,
    run_ok,
    saved_lora,
    ui_image_paths,
)

pytestmark = pytest.mark.server

ALGOS = ["LoRA", "LoHa", "LoKr", "OFT", "DoRA"]
DIR = "e2e_fo"  # sub-folder of models/loras and output/ for this module's files
LORA_KEY_NOT_LOADED = "lora key not loaded"
STALE_STATE_WARNING = "training state made with other settings"
ROOT = pathlib.Path(__file__).resolve().parents[2]
PACK_VERSION = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)

# The per-algorithm run: short fp32 training, so every path that applies the adapter gets the same
# fp32 tensors. Sampler outputs are expected to agree bit for bit; EXACT_ATOL leaves room for fp32
# rounding should a path ever compute the patched weight in another order.
ALGO_STEPS, ALGO_LR, ALGO_SEED = 6, 3e-3, 31
EXACT_ATOL = 1e-5
MIN_EFFECT = 1e-3  # a trained adapter must move the sampled latents by more than this
SAMPLER_STEPS = 2  # KSampler steps per comparison sample (euler, 16x16 latent)

# Adapter key suffixes each algorithm may write (after "<prefix><module path>.").
SUFFIXES = {
    "LoRA": {"lora_up.weight", "lora_down.weight", "alpha"},
    "LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "LoKr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "OFT": {"oft_blocks", "alpha"},
    "DoRA": {"lora_up.weight", "lora_down.weight", "dora_scale", "alpha"},
}
ALL_SUFFIXES = set().union(*SUFFIXES.values())


# ---------------------------------------------------------------------- helpers


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def loras_root(comfy_server) -> pathlib.Path:
    return comfy_server.base_dir / "models" / "loras"


def steps_in_name(name: str) -> int:
    m = re.search(r"_(\d+)_steps_\d{5}\.safetensors$", name)
    assert m, f"no _<N>_steps_<counter>.safetensors in {name!r}"
    return int(m.group(1))


def counter_in_name(name: str) -> int:
    m = re.search(r"_(\d{5})\.safetensors$", name)
    assert m, name
    return int(m.group(1))


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def module_paths(keys, prefix: str = "diffusion_model.") -> set[str]:
    """Module paths of adapter keys ``<prefix><path>.<suffix>``."""
    out = set()
    for key in keys:
        assert key.startswith(prefix), key
        name = key[len(prefix) :]
        suffix = next((s for s in ALL_SUFFIXES if name.endswith("." + s)), None)
        assert suffix is not None, f"unknown adapter suffix in {key!r}"
        out.add(name[: -len(suffix) - 1])
    return out


def not_loaded_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if LORA_KEY_NOT_LOADED in line]


def combo_options(comfy, node_class: str, input_name: str) -> list[str]:
    """A combo input's current options from a fresh ``/object_info/<node>`` (V1 list or V3 COMBO)."""
    info = comfy.object_info(node_class)[node_class]["input"]
    spec = {**info.get("required", {}), **info.get("optional", {})}[input_name]
    if isinstance(spec[0], list):
        return list(spec[0])
    assert spec[0] == "COMBO", spec
    return list(spec[1]["options"])


def files_under(root: pathlib.Path) -> set[str]:
    """Every file and folder below root (symlinks listed, not followed), relative, posix."""
    out = set()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            out.add((pathlib.Path(folder) / name).relative_to(root).as_posix())
    return out


def expected_lr(step: int, total: int, base: float, schedule: str, warmup: int = 0) -> float:
    """The documented schedules: linear warm-up to ``base`` over ``warmup`` steps, then constant, or a
    linear / half-cosine decay that reaches 0 at the run's last step."""
    if warmup and step <= warmup:
        return base * step / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / (total - warmup)
    if schedule == "linear":
        return base * (1.0 - progress)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise AssertionError(schedule)


def check_lr_events(
    events: list[dict], total: int, base: float, schedule: str, warmup: int = 0, offset: int = 0
) -> list[float]:
    """Every step's lr, as the ``loralab.progress`` events carry them (``lrs``: the steps since the
    previous, throttled, message), is the schedule's value for that step (``offset`` earlier steps of
    a resumed run), and every step of the run is reported once. Returns the lr of each step."""
    assert events, "no loralab.progress events"
    steps = [e["first_step"] + i for e in events for i in range(len(e["lrs"]))]
    assert steps == list(range(1, total - offset + 1)), steps
    assert events[-1]["step"] == events[-1]["total"] == total - offset, events[-1]
    lrs = [lr for e in events for lr in e["lrs"]]
    assert all(e["lr"] == e["lrs"][-1] for e in events)
    for step, lr in zip(steps, lrs, strict=True):
        want = expected_lr(step + offset, total, base, schedule, warmup)
        assert lr == pytest.approx(want, rel=1e-9, abs=1e-15), (schedule, step + offset, lr, want)
    return lrs


# ---------------------------------------------------------------------- 1-3: save, load, apply (per algorithm)


def _algo_graph(algo: str):
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(
        model, latents, positive, steps=ALGO_STEPS, learning_rate=ALGO_LR, seed=ALGO_SEED,
        algorithm=algo, training_dtype="fp32", lora_dtype="fp32",
    )  # fmt: skip
    return g, model, positive, trainer


@pytest.fixture(scope="module", params=ALGOS)
def saved(request, comfy_server):
    """Prompt 1 trains and saves: twice under one prefix (steps linked / from the metadata), once in
    kohya key format, and plots the loss. Prompt 2 reuses the cached training, saves a third time under
    the same prefix, loads the first file with LoraLab_LoadLora (saving it again with the loaded step
    count) and samples one seed eight ways: base, model_with_lora, the file and the kohya file through
    stock LoraLoaderModelOnly, LoraLab_ApplyLora at +1 / -1 / 0, and the loaded file through ApplyLora."""
    algo = request.param
    comfy = comfy_server.client
    prefix = f"{DIR}/{algo}"

    g, model, positive, trainer = _algo_graph(algo)
    save_a = g.save_lora(trainer[LORA_OUT], prefix, steps=trainer[STEPS_OUT])
    save_b = g.save_lora(trainer[LORA_OUT], prefix)  # no steps link: the metadata's count
    kohya = g.save_lora_format(trainer[LORA_OUT], f"{prefix}_kohya", "kohya", steps=trainer[STEPS_OUT])
    plot = g.plot_loss(trainer[LOSS_OUT], f"{DIR}/loss_{algo}")
    first = run_ok(comfy, g.prompt)
    names = {saved_lora(first, s)[0]: saved_lora(first, s)[1] for s in (save_a, save_b)}
    name = min(names)  # counter 00001
    kohya_name, kohya_path = saved_lora(first, kohya)
    first_hash = sha256(names[name])
    listed = combo_options(comfy, "LoraLab_LoadLora", "lora_name")

    g2, model2, positive2, trainer2 = _algo_graph(algo)
    assert trainer2.id == trainer.id
    sample = {}

    def sample_with(label: str, m) -> None:
        _, sample[label] = g2.sample_and_save(m, positive2, f"{DIR}/{algo}_{label}", steps=SAMPLER_STEPS)

    sample_with("base", model2)
    sample_with("with_lora", trainer2[MODEL_OUT])
    sample_with("stock_file", g2.lora_loader(model2, name, 1.0))
    sample_with("stock_kohya", g2.lora_loader(model2, kohya_name, 1.0))
    for label, strength in (("apply_pos", 1.0), ("apply_neg", -1.0), ("apply_zero", 0.0)):
        sample_with(label, g2.apply_lora(model2, trainer2[LORA_OUT], strength))
    loaded = g2.load_lora(name)
    sample_with("loaded", g2.apply_lora(model2, loaded[LOADED_LORA_OUT], 1.0))
    resave = g2.save_lora(loaded[LOADED_LORA_OUT], f"{prefix}_reloaded", steps=loaded[LOADED_STEPS_OUT])
    save_c = g2.save_lora_format(trainer2[LORA_OUT], prefix, "comfyui", steps=trainer2[STEPS_OUT])
    second, log2 = run_logged(comfy_server, g2.prompt)
    assert second.status == "success", second.error_message
    assert trainer.id in cached_nodes(second), "prompt 2 should reuse the cached training"

    out = comfy_server.output_dir
    return {
        "algo": algo, "prefix": prefix, "first": first, "second": second, "log2": log2,
        "names": names, "name": name, "first_hash": first_hash, "listed": listed,
        "kohya_name": kohya_name, "kohya_path": kohya_path, "plot": plot,
        "third": saved_lora(second, save_c), "resaved": saved_lora(second, resave),
        "latents": {k: load_latent(second, node, out) for k, node in sample.items()},
    }  # fmt: skip


def test_save_lora_names_and_metadata(saved, comfy_server):
    algo, names = saved["algo"], saved["names"]
    folder = loras_root(comfy_server) / DIR
    stem = saved["prefix"].rsplit("/", 1)[1]
    # Both saves of prompt 1 (one with the steps link, one taking the count from the metadata) and the
    # one of prompt 2: one prefix, three files, counters 1 2 3, nothing overwritten.
    expected = {f"{DIR}/{stem}_{ALGO_STEPS}_steps_{c:05}.safetensors" for c in (1, 2)}
    assert set(names) == expected, sorted(names)
    for rel, path in names.items():
        assert path == folder / rel.rsplit("/", 1)[1] and path.is_file(), (rel, path)
    third_name, third_path = saved["third"]
    assert third_name == f"{DIR}/{stem}_{ALGO_STEPS}_steps_00003.safetensors", third_name
    assert sha256(names[saved["name"]]) == saved["first_hash"], "the first file was overwritten"
    a, c = lora_tensors(names[saved["name"]]), lora_tensors(third_path)
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)

    meta = lora_metadata(names[saved["name"]])
    print(f"{algo}: {len(a)} tensors, {len(meta)} metadata keys, final loss {meta['loralab.final_loss']}")
    want = {
        "loralab.steps": str(ALGO_STEPS),
        "loralab.algorithm": algo.lower(),
        "loralab.rank": "8",
        "loralab.alpha": "0" if algo == "OFT" else "8",  # OFT's alpha is a constraint, none by default
        "loralab.seed": str(ALGO_SEED),
        "loralab.optimizer": "AdamW",
        "loralab.learning_rate": "0.003",
        "loralab.training_dtype": "fp32",
        "loralab.lora_dtype": "fp32",
        "loralab.model_family": "SD3",
        "loralab.dataset_size": "4",
        "ss_network_module": "networks.lora" if algo == "LoRA" else "lycoris.kohya",
        "ss_network_dim": "8",
        "ss_network_alpha": "0" if algo == "OFT" else "8",
        "ss_steps": str(ALGO_STEPS),
        "ss_base_model_version": "sd3",
        "ss_seed": str(ALGO_SEED),
        "ss_num_train_images": "4",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"stable-diffusion-3/{algo.lower()}",
        "modelspec.prediction_type": "flow",
        "modelspec.resolution": "128x128",  # the tiny dataset's 16x16 latents
        "ss_v2": "False",
    }
    got = {k: meta.get(k) for k in want}
    assert got == want, {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert meta["loralab.version"] == PACK_VERSION
    loss = float(meta["loralab.final_loss"])
    assert math.isfinite(loss) and loss > 0
    assert meta["modelspec.title"] and meta["modelspec.implementation"].startswith("https://")
    datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert int(meta["ss_training_finished_at"]) > 1_600_000_000


def test_stock_loader_matches_apply_lora_and_model_with_lora(saved):
    lat = saved["latents"]
    bad = not_loaded_lines(saved["log2"])
    assert not bad, "\n".join(bad[:20])
    effect = max_abs(lat["stock_file"], lat["base"])
    diffs = {k: max_abs(lat[k], lat["stock_file"]) for k in ("with_lora", "apply_pos", "loaded")}
    print(f"{saved['algo']}: lora effect {effect:.4g}; max |x - stock file| {diffs}")
    assert effect > MIN_EFFECT, effect
    for k, d in diffs.items():
        assert d <= EXACT_ATOL, (k, d)


def test_kohya_format_file(saved):
    algo = saved["algo"]
    kohya = lora_tensors(saved["kohya_path"])
    comfy_keys = lora_tensors(saved["names"][saved["name"]])
    assert steps_in_name(saved["kohya_name"]) == ALGO_STEPS
    assert len(kohya) == len(comfy_keys)
    bad = [k for k in kohya if not k.startswith("lora_unet_")]
    assert not bad, bad[:5]
    suffixes = {k.split(".", 1)[1] for k in kohya}
    assert suffixes <= SUFFIXES[algo], suffixes - SUFFIXES[algo]
    stems = {k.split(".", 1)[0] for k in kohya}
    assert not any("." in s for s in stems)
    # Same tensors under the kohya names: lora_unet_<module path with '_'>.<suffix>.
    for key, value in comfy_keys.items():
        path, suffix = next(
            (key[len("diffusion_model.") : -len(s) - 1], s) for s in SUFFIXES[algo] if key.endswith("." + s)
        )
        twin = "lora_unet_" + path.replace(".", "_") + "." + suffix
        assert twin in kohya and torch.equal(kohya[twin], value), key
    assert lora_metadata(saved["kohya_path"])["loralab.steps"] == str(ALGO_STEPS)

    lat = saved["latents"]
    d = max_abs(lat["stock_kohya"], lat["stock_file"])
    print(f"{algo}: kohya file vs comfyui file through LoraLoaderModelOnly: max diff {d:.3g}")
    assert d <= EXACT_ATOL, d
    assert max_abs(lat["stock_kohya"], lat["base"]) > MIN_EFFECT  # the kohya keys were applied at all


def test_apply_lora_negative_and_zero_strength(saved):
    lat = saved["latents"]
    base, pos, neg, zero = lat["base"], lat["apply_pos"], lat["apply_neg"], lat["apply_zero"]
    assert torch.equal(zero, base), f"strength 0 changed the output: {max_abs(zero, base)}"
    if saved["algo"] == "OFT":
        # Stock ComfyUI applies OFT at strength s as s² (R - I) W (strength enters twice in its
        # calculate_weight, 0.3.75 and 0.33 alike): -1 is +1. Pinned so a fix upstream shows here.
        assert torch.equal(neg, pos) and max_abs(pos, base) > MIN_EFFECT
        return
    d_base, d_pos = max_abs(neg, base), max_abs(neg, pos)
    # -1 pushes the other way: the change it makes is anti-correlated with the change +1 makes.
    up, down = (pos - base).flatten().double(), (neg - base).flatten().double()
    corr = float(torch.dot(up, down) / (up.norm() * down.norm()))
    print(
        f"{saved['algo']}: |-1 - base| {d_base:.4g}, |-1 - (+1)| {d_pos:.4g}, corr(+1 change, -1 change) {corr:.3f}"
    )
    assert d_base > MIN_EFFECT and d_pos > MIN_EFFECT
    assert d_pos > d_base  # +1 and -1 lie on opposite sides of the base output
    assert corr < -0.5, corr


def test_load_lora_outputs_weights_and_steps(saved):
    assert saved["name"] in saved["listed"] and saved["kohya_name"] in saved["listed"], (
        "LoadLora lists no new file"
    )
    # Its LORA_MODEL through ApplyLora samples as the file through stock LoraLoaderModelOnly (checked in
    # test_stock_loader_matches_apply_lora_and_model_with_lora, key "loaded").
    resaved_name, resaved_path = saved["resaved"]
    # The steps INT of LoraLab_LoadLora, linked into SaveLora, named the copy; the copy is the file.
    assert steps_in_name(resaved_name) == ALGO_STEPS, resaved_name
    assert lora_metadata(resaved_path)["loralab.steps"] == str(ALGO_STEPS)
    original = lora_tensors(saved["names"][saved["name"]])
    copy = lora_tensors(resaved_path)
    assert set(copy) == set(original) and all(torch.equal(copy[k], original[k]) for k in original)
    assert all(v.dtype == torch.float32 for v in copy.values())


def test_plot_loss_normal_run(saved, comfy_server):
    paths = ui_image_paths(saved["first"], saved["plot"], comfy_server.output_dir)
    assert len(paths) == 1
    _check_png(paths[0], steps=ALGO_STEPS, folder=comfy_server.output_dir / DIR)


def _check_png(path: pathlib.Path, steps: int, folder: pathlib.Path) -> None:
    assert path.is_file() and path.parent == folder, path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 2_000 < len(data) < 5_000_000, len(data)
    with Image.open(path) as im:
        im.load()
        print(f"{path.name}: {im.width}x{im.height} {im.mode}, {len(data)} bytes")
        assert im.width >= 200 and im.height >= 150, im.size
        assert im.text["loralab.steps"] == str(steps)
        colours = len(im.convert("RGB").getcolors(maxcolors=1 << 24) or [])
    assert colours > 10, "the chart is (almost) blank"


# ---------------------------------------------------------------------- 4-5: prefix safety, 1-step plot


@pytest.fixture(scope="module")
def one_step(comfy_server):
    """A 1-step training, saved under a prefix full of odd characters at the loras root, and plotted."""
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, seed=61)
    saver = g.save_lora(trainer[LORA_OUT], "my lora*?<>|:", steps=trainer[STEPS_OUT])
    plot = g.plot_loss(trainer[LOSS_OUT], f"{DIR}/loss_one_step")
    result = run_ok(comfy_server.client, g.prompt)
    return {"graph": g, "trainer": trainer, "saver": saver, "plot": plot, "result": result}


def test_plot_loss_one_step(one_step, comfy_server):
    paths = ui_image_paths(one_step["result"], one_step["plot"], comfy_server.output_dir)
    assert len(paths) == 1
    _check_png(paths[0], steps=1, folder=comfy_server.output_dir / DIR)


def test_odd_prefix_characters_are_sanitised(one_step, comfy_server):
    name, path = saved_lora(one_step["result"], one_step["saver"])
    root = loras_root(comfy_server)
    print(f"'my lora*?<>|:' -> {name!r}")
    assert path.parent == root, path
    assert not set("*?<>|:") & set(name), name
    assert re.fullmatch(r"my lora_+_1_steps_00001\.safetensors", name), name


EVIL_PREFIXES = ["../evil", "/abs/path", "a/../../b"]


@pytest.mark.parametrize("prefix", EVIL_PREFIXES)
def test_escaping_prefix_is_refused_when_queued(comfy_server, prefix):
    """Refused by /prompt validation (the node's validate_inputs): the prompt never runs."""
    top = comfy_server.base_dir.parent
    before = files_under(top)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, seed=62)
    saver = g.save_lora(trainer[LORA_OUT], prefix, steps=trainer[STEPS_OUT])
    with pytest.raises(PromptRejected) as caught:
        comfy_server.client.run(g.prompt, timeout=60)
    errors = caught.value.node_errors[saver.id]["errors"]
    print(f"{prefix!r}: {errors[0]['details']}")
    assert [e["extra_info"]["input_name"] for e in errors] == ["filename_prefix"], errors
    assert "filename_prefix" in errors[0]["details"] and prefix in errors[0]["details"]
    assert set(caught.value.node_errors) == {saver.id}
    assert files_under(top) == before
    assert not pathlib.Path("/abs").exists()


def test_escaping_prefix_from_a_link_fails_at_execution(one_step, comfy_server):
    """A prefix that comes from another node is checked when SaveLora runs: execution_error naming
    filename_prefix, nothing written. The training is served from the cache of the previous prompt."""
    top = comfy_server.base_dir.parent
    before = files_under(top)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, seed=61)
    prefix = g.add("PrimitiveString", value="../evil_linked")[0]
    saver = g.add(
        "LoraLab_SaveLora", lora=trainer[LORA_OUT], filename_prefix=prefix, steps=trainer[STEPS_OUT]
    )
    result = comfy_server.client.run(g.prompt, timeout=120)
    assert result.status == "error", result.status
    assert str(result.error["node_id"]) == saver.id, result.error_message
    message = result.error["exception_message"]
    print(f"linked '../evil_linked': {message}")
    assert "filename_prefix" in message and ".." in message, message
    after = files_under(top)
    assert after == before, sorted(after - before)


# ---------------------------------------------------------------------- 6: options change what they say

SCHEDULE_STEPS, SCHEDULE_LR = 6, 1e-3
TARGET_RUNS = {
    "all": {},
    "attention": {"targets": "attention"},
    "attention_mlp": {"targets": "attention_mlp"},
    "block0": {"include": "*joint_blocks.0.*"},
    "no_mlp_embedders": {"exclude": "*mlp*, *embedder*"},
    "alpha4": {"alpha": 4.0},
}


@pytest.fixture(scope="module")
def options_run(comfy_server):
    """One prompt, one trainer per option set: 1-step runs for targets / patterns / alpha, and
    SCHEDULE_STEPS-step runs for the constant and linear schedules (batch_size 2: a step takes long
    enough on CPU for the ~10/s progress events to carry most steps)."""
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainers, savers = {}, {}
    for label, opts in TARGET_RUNS.items():
        options = g.training_options(**opts)
        trainers[label] = g.train_with_options(model, latents, positive, options, steps=1, seed=71)
        savers[label] = g.save_lora(
            trainers[label][LORA_OUT], f"{DIR}/opt_{label}", steps=trainers[label][STEPS_OUT]
        )
    for schedule in ("constant", "linear"):
        options = g.training_options(lr_schedule=schedule)
        trainers[schedule] = g.train_with_options(
            model,
            latents,
            positive,
            options,
            steps=SCHEDULE_STEPS,
            learning_rate=SCHEDULE_LR,
            batch_size=2,
            seed=72,
        )
        g.save_lora(
            trainers[schedule][LORA_OUT], f"{DIR}/opt_{schedule}", steps=trainers[schedule][STEPS_OUT]
        )
    result = run_ok(comfy_server.client, g.prompt)
    files = {label: saved_lora(result, s)[1] for label, s in savers.items()}
    modules = {label: module_paths(lora_tensors(p)) for label, p in files.items()}
    return {"result": result, "trainers": trainers, "modules": modules, "files": files}


def test_target_presets_and_patterns_choose_the_layers(options_run):
    mods = options_run["modules"]
    everything = mods["all"]
    print({label: len(m) for label, m in mods.items()})
    assert len(everything) > 20
    attention = mods["attention"]
    assert attention and all(re.search(r"\.attn\.(qkv|proj)$", m) for m in attention), sorted(attention)
    assert attention == {m for m in everything if ".attn." in m}
    assert not [m for m in attention if re.search("mlp|adaLN|embedder|final_layer", m)]

    with_mlp = mods["attention_mlp"]
    block_mlps = {m for m in everything if re.search(r"joint_blocks\.\d+\.\w+\.mlp\.fc[12]$", m)}
    # attention_mlp = attention + the blocks' MLPs, not the timestep / pooled-text embedder MLPs.
    assert block_mlps and with_mlp == attention | block_mlps, sorted(with_mlp ^ (attention | block_mlps))
    assert not [m for m in with_mlp if re.search("adaLN|final_layer|x_embedder|context_embedder", m)]

    assert mods["block0"] == {m for m in everything if m.startswith("joint_blocks.0.")}
    assert mods["block0"]
    narrowed = mods["no_mlp_embedders"]
    assert narrowed == {m for m in everything if "mlp" not in m and "embedder" not in m}
    assert narrowed and narrowed < everything


def test_alpha_option_is_stored(options_run):
    tensors = lora_tensors(options_run["files"]["alpha4"])
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {4.0}, set(alphas.values())
    assert len(alphas) == len(options_run["modules"]["alpha4"])
    meta = lora_metadata(options_run["files"]["alpha4"])
    assert (meta["loralab.alpha"], meta["ss_network_alpha"], meta["loralab.rank"]) == ("4", "4", "8")
    default = lora_tensors(options_run["files"]["all"])  # alpha 0 in the options: alpha = rank
    assert {float(v) for k, v in default.items() if k.endswith(".alpha")} == {8.0}


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_lr_schedule_in_progress_events(options_run, schedule):
    events = loralab_progress(options_run["result"], options_run["trainers"][schedule])
    lrs = check_lr_events(events, SCHEDULE_STEPS, SCHEDULE_LR, schedule)
    print(f"{schedule}: lr per step: {lrs}")
    assert lrs[-1] == (0.0 if schedule == "linear" else SCHEDULE_LR), lrs
    if schedule == "constant":
        assert set(lrs) == {SCHEDULE_LR}
    else:
        assert lrs[0] > 0 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False)), lrs  # decays every step


# ---------------------------------------------------------------------- 6-7: checkpoints and exact resume

N = 5  # save_every; the first run trains 2N steps, the resumed one N more from the step-N checkpoint
RESUME_LR, RESUME_WARMUP = 2e-3, 2
RESUME_TRAIN = {
    "learning_rate": RESUME_LR, "seed": 81, "batch_size": 2,
    "training_dtype": "fp32", "lora_dtype": "fp32",
}  # fmt: skip


def _resume_options(g: Graph, ck_prefix: str):
    return g.training_options(
        lr_schedule="cosine", warmup_steps=RESUME_WARMUP, save_every=N, checkpoint_prefix=ck_prefix
    )


@pytest.fixture(scope="module")
def resumed(comfy_server):
    """Prompt 1: 2N cosine steps with warm-up, a checkpoint every N steps -> final file A. Prompt 2:
    from the step-N checkpoint, N more steps with the same settings -> file B; and 2 steps with SGD
    instead of AdamW from the same checkpoint (its training state does not fit)."""
    comfy = comfy_server.client
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    full = g.train_with_options(
        model, latents, positive, _resume_options(g, f"{DIR}/ck/run"), steps=2 * N, **RESUME_TRAIN
    )
    save_a = g.save_lora(full[LORA_OUT], f"{DIR}/resume_a", steps=full[STEPS_OUT])
    first = run_ok(comfy, g.prompt)
    ck_folder = loras_root(comfy_server) / DIR / "ck"
    ck_files = sorted(p.name for p in ck_folder.iterdir())
    listings = {
        "LoraLoaderModelOnly": combo_options(comfy, "LoraLoaderModelOnly", "lora_name"),
        "LoraLab_LoadLora": combo_options(comfy, "LoraLab_LoadLora", "lora_name"),
        "LoraLab_TrainLoraNode": combo_options(comfy, "LoraLab_TrainLoraNode", "existing_lora"),
    }
    checkpoint = f"{DIR}/ck/run_{N}_steps_00001.safetensors"
    # Control: the same checkpoint without its .lorastate sidecar can only resume from the weights.
    bare = loras_root(comfy_server) / DIR / "ck_bare" / f"run_{N}_steps_00001.safetensors"
    bare.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ck_folder / f"run_{N}_steps_00001.safetensors", bare)

    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = _resume_options(g, f"{DIR}/ck2/run")
    cont = g.train_with_options(
        model, latents, positive, options, steps=N, existing_lora=checkpoint, **RESUME_TRAIN
    )
    save_b = g.save_lora(cont[LORA_OUT], f"{DIR}/resume_b", steps=cont[STEPS_OUT])
    sgd = g.train_with_options(
        model,
        latents,
        positive,
        options,
        steps=2,
        existing_lora=checkpoint,
        **{**RESUME_TRAIN, "optimizer": "SGD"},
    )
    save_sgd = g.save_lora(sgd[LORA_OUT], f"{DIR}/resume_sgd", steps=sgd[STEPS_OUT])
    weights_only = g.train_with_options(
        model,
        latents,
        positive,
        _resume_options(g, f"{DIR}/ck3/run"),
        steps=N,
        existing_lora=f"{DIR}/ck_bare/{bare.name}",
        **RESUME_TRAIN,
    )
    save_bare = g.save_lora(weights_only[LORA_OUT], f"{DIR}/resume_bare", steps=weights_only[STEPS_OUT])
    second, log = run_logged(comfy_server, g.prompt)
    assert second.status == "success", second.error_message
    return {
        "first": first, "second": second, "log": log, "full": full, "cont": cont, "sgd": sgd,
        "a": saved_lora(first, save_a), "b": saved_lora(second, save_b), "sgd_file": saved_lora(second, save_sgd),
        "bare": saved_lora(second, save_bare),
        "ck_folder": ck_folder, "ck_files": ck_files, "listings": listings, "checkpoint": checkpoint,
    }  # fmt: skip


def test_save_every_writes_checkpoints_with_state(resumed):
    files = resumed["ck_files"]
    assert files == sorted([
        f"run_{N}_steps_00001.lorastate", f"run_{N}_steps_00001.safetensors",
        f"run_{2 * N}_steps_00002.lorastate", f"run_{2 * N}_steps_00002.safetensors",
    ]), files  # fmt: skip
    folder = resumed["ck_folder"]
    assert lora_metadata(folder / f"run_{N}_steps_00001.safetensors")["loralab.steps"] == str(N)
    # The last checkpoint is the run's final adapter.
    last = lora_tensors(folder / f"run_{2 * N}_steps_00002.safetensors")
    final = lora_tensors(resumed["a"][1])
    assert set(last) == set(final) and all(torch.equal(last[k], final[k]) for k in final)
    for node, names in resumed["listings"].items():
        ours = sorted(n for n in names if n.startswith(f"{DIR}/ck/"))
        assert ours == [f"{DIR}/ck/{f}" for f in files if f.endswith(".safetensors")], (node, ours)
        assert not [n for n in names if n.endswith(".lorastate")], node


def test_cosine_warmup_lr_in_progress_events(resumed):
    events = loralab_progress(resumed["first"], resumed["full"])
    lrs = check_lr_events(events, 2 * N, RESUME_LR, "cosine", RESUME_WARMUP)
    print(f"cosine: lr per step: {[round(lr, 8) for lr in lrs]}")
    assert lrs[-1] == 0.0 and lrs[RESUME_WARMUP - 1] == RESUME_LR, lrs  # ends at 0, peaks after warm-up
    # The resumed run reports its own steps 1..N with the learning rates of steps N+1..2N.
    cont = loralab_progress(resumed["second"], resumed["cont"])
    check_lr_events(cont, 2 * N, RESUME_LR, "cosine", RESUME_WARMUP, offset=N)


def test_resume_from_checkpoint_is_exact(resumed):
    (name_a, path_a), (name_b, path_b) = resumed["a"], resumed["b"]
    assert steps_in_name(name_a) == 2 * N
    assert steps_in_name(name_b) == 2 * N and lora_metadata(path_b)["loralab.steps"] == str(2 * N)
    a, b = lora_tensors(path_a), lora_tensors(path_b)
    assert set(a) == set(b) and a
    assert all(v.dtype == torch.float32 for v in a.values())
    worst = max(max_abs(a[k], b[k]) for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"exact resume: {len(a)} tensors, {len(differ)} differ, max |A - B| = {worst:.3g}")
    assert not differ, f"{len(differ)} of {len(a)} tensors differ (max {worst:.3g}), e.g. {differ[:3]}"
    # The resumed run's own step-2N checkpoint is the same adapter too.
    ck2 = lora_tensors(path_b.parent / "ck2" / f"run_{2 * N}_steps_00001.safetensors")
    assert all(torch.equal(ck2[k], a[k]) for k in a)
    # Controls: the checkpoint it started from is not already the final adapter, and without the
    # .lorastate sidecar (fresh optimizer moments) the same N steps end elsewhere.
    start = lora_tensors(resumed["ck_folder"] / f"run_{N}_steps_00001.safetensors")
    assert max(max_abs(start[k], a[k]) for k in a) > 1e-6
    bare_name, bare_path = resumed["bare"]
    assert steps_in_name(bare_name) == 2 * N
    bare = lora_tensors(bare_path)
    bare_diff = max(max_abs(bare[k], a[k]) for k in a)
    print(f"weights-only resume: max |A - bare| = {bare_diff:.3g}")
    assert bare_diff > 1e-6


def test_resume_with_other_optimizer_warns_and_trains(resumed):
    warned = [line for line in resumed["log"].splitlines() if STALE_STATE_WARNING in line]
    print("\n".join(warned))
    assert len(warned) == 1, warned
    assert "optimizer" in warned[0] and "SGD" in warned[0] and "AdamW" in warned[0], warned[0]
    assert resumed["checkpoint"] in warned[0]
    name, path = resumed["sgd_file"]
    assert steps_in_name(name) == N + 2 and lora_metadata(path)["loralab.optimizer"] == "SGD"
    start = lora_tensors(resumed["ck_folder"] / f"run_{N}_steps_00001.safetensors")
    trained = lora_tensors(path)
    assert set(trained) == set(start)
    assert max(max_abs(trained[k], start[k]) for k in start) > 0, "SGD steps did not change the weights"
    events = loralab_progress(resumed["second"], resumed["sgd"])
    assert events and events[-1]["step"] == 2


# ---------------------------------------------------------------------- 8: bad option values


@pytest.mark.parametrize("field,value", [("include", "no_such_layer*"), ("exclude", "*")])
def test_patterns_matching_no_layer_are_an_error(comfy_server, field, value):
    """Every value is inside the schema's ranges and the options node accepts them; the trainer fails
    before training, naming the patterns."""
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = g.training_options(**{field: value})
    trainer = g.train_with_options(model, latents, positive, options, steps=1, seed=91)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_{field}")
    result = comfy_server.client.run(g.prompt, timeout=120)
    assert result.status == "error"
    assert str(result.error["node_id"]) == trainer.id, result.error_message
    assert options.id in executed_nodes(result)
    message = result.error["exception_message"]
    assert field in message and "match no" in message, message
    assert not list((loras_root(comfy_server) / DIR).glob(f"never_{field}*"))


@pytest.mark.parametrize(
    "field,value,kind", [("warmup_steps", -1, "smaller"), ("noise_offset", 1.5, "bigger")]
)
def test_out_of_range_option_is_refused_when_queued(comfy_server, field, value, kind):
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = g.training_options(**{field: value})
    trainer = g.train_with_options(model, latents, positive, options, steps=1)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never")
    with pytest.raises(PromptRejected) as caught:
        comfy_server.client.run(g.prompt, timeout=60)
    errors = caught.value.node_errors[options.id]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == [field], errors
    assert errors[0]["type"] == f"value_{kind}_than_{'min' if kind == 'smaller' else 'max'}", errors


@pytest.fixture(scope="module", params=["OFT", "DoRA"])
def resumed_algo(request, comfy_server):
    """OFT and DoRA, whose state goes beyond a ΔW (a rotation's blocks; DoRA's magnitude, which starts
    from the base weight): prompt 1 trains 2N steps with a checkpoint every N -> file A; prompt 2
    resumes the step-N checkpoint for N more -> B, and continues A for one step at a learning rate
    of 1e-7 -> C."""
    algo, comfy = request.param, comfy_server.client
    train = {**RESUME_TRAIN, "algorithm": algo}
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    full = g.train_with_options(
        model, latents, positive, _resume_options(g, f"{DIR}/ck_{algo}/run"), steps=2 * N, **train
    )
    save_a = g.save_lora(full[LORA_OUT], f"{DIR}/resume_{algo}_a", steps=full[STEPS_OUT])
    first = run_ok(comfy, g.prompt)
    name_a, path_a = saved_lora(first, save_a)

    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    cont = g.train_with_options(model, latents, positive, _resume_options(g, f"{DIR}/ck_{algo}2/run"), steps=N,
                                existing_lora=f"{DIR}/ck_{algo}/run_{N}_steps_00001.safetensors", **train)  # fmt: skip
    save_b = g.save_lora(cont[LORA_OUT], f"{DIR}/resume_{algo}_b", steps=cont[STEPS_OUT])
    still = g.train(
        model, latents, positive, steps=1, existing_lora=name_a, **{**train, "learning_rate": 1e-7}
    )
    save_c = g.save_lora(still[LORA_OUT], f"{DIR}/resume_{algo}_c", steps=still[STEPS_OUT])
    second = run_ok(comfy, g.prompt)
    return {"algo": algo, "a": lora_tensors(path_a), "b": lora_tensors(saved_lora(second, save_b)[1]),
            "c": lora_tensors(saved_lora(second, save_c)[1]), "steps_c": steps_in_name(saved_lora(second, save_c)[0])}  # fmt: skip


def test_oft_and_dora_resume_exactly_and_continue(resumed_algo):
    a, b, c = resumed_algo["a"], resumed_algo["b"], resumed_algo["c"]
    algo = resumed_algo["algo"]
    assert {k.rsplit(".", 1)[-1] if "weight" not in k else k.split(".")[-2] for k in a} >= (
        {"oft_blocks"} if algo == "OFT" else {"lora_up", "lora_down", "dora_scale"}
    )
    assert set(a) == set(b) == set(c)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"{algo}: exact resume: {len(a)} tensors, {len(differ)} differ")
    assert not differ, differ[:3]
    assert resumed_algo["steps_c"] == 2 * N + 1
    worst = max(max_abs(a[k], c[k]) for k in a)
    print(f"{algo}: continued one step at lr 1e-7: max |C - A| = {worst:.3g}")
    assert worst < 1e-5
