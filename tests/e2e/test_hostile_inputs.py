"""Issue 17: hostile prompts and files through a real ComfyUI server.

Anyone who can queue a prompt or upload a file can drive these nodes, and LoRA files come from the
internet. Each test stages the case on the server's disk, queues it over HTTP and checks what the
server answers and leaves behind:

  1. LoadLatentDataset: names outside input/ (absolute, ``..``, a link out, a FIFO) are refused by
     ComfyUI's own list check, with the same answer whether the outside path exists or not, and no
     word of an outside file's contents; a FIFO never blocks the worker.
  2. Image folders: pixel, aspect-ratio, file-count and caption-size limits, symlinked captions.
  3. Checkpoints: keep_checkpoints prunes this run's older checkpoints only; a sidecar copied from
     another checkpoint is ignored with a warning (resume from weights only).
  4. Step counts from files: ss_steps="1e308", a sidecar step of 1e308.
  5. A LoRA with a deeply nested JSON header: the normal readable error.
  6. NaN for every float option: refused naming the option.
  7. Save LoRA's UI result (websocket, /history) carries no absolute path.

What needs no server (free-space check, publish order, fsync, O_EXCL fallback, execute-time path
checks of a linked dataset name, interrupt while loading) is tested on the functions:
``tests/training/test_checkpoint.py``, ``test_lorafile.py``, ``test_imagefolder.py``,
``tests/nodes/test_data_node.py``.

All files this module writes lie under ``models/loras/e2e_host*`` and ``input/e2e_host*``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pathlib
import shutil
import struct
import threading
import zlib

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from harness.client import PromptRejected
from tests.e2e.graphs import LORA_OUT, STEPS_OUT, Graph, run_logged, saved_lora

pytestmark = pytest.mark.server

DIR = "e2e_host"
SECRET_KEY = "private_model_weight_name"


def node_error(result, node) -> str:
    assert result.status == "error", f"expected an execution error, got {result.status}"
    assert str(result.error.get("node_id")) == node.id, result.error_message
    return str(result.error.get("exception_message", ""))


def loras_root(comfy_server) -> pathlib.Path:
    return comfy_server.base_dir / "models" / "loras"


def input_root(comfy_server) -> pathlib.Path:
    return comfy_server.base_dir / "input"


@contextlib.contextmanager
def fifo_unblocker(path: pathlib.Path):
    """While active, a reader blocked on the FIFO ``path`` is released (a writer opens and closes it),
    so a regression fails its test instead of blocking the server's only worker for good."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:  # ENXIO: nobody is reading
                if e.errno not in (errno.ENXIO, errno.ENOENT):
                    return
                continue
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


# ---------------------------------------------------------------------- 1: dataset names outside input/


@pytest.fixture(scope="module")
def outside(comfy_server, tmp_path_factory):
    """A private .safetensors outside input/, a link to it inside input/ and a FIFO inside input/."""
    folder = tmp_path_factory.mktemp("outside_input")
    secret = folder / "secret.safetensors"
    save_file({SECRET_KEY: torch.zeros(3)}, str(secret))
    inp = input_root(comfy_server)
    link = inp / f"{DIR}-link.safetensors"
    fifo = inp / f"{DIR}-fifo.safetensors"
    link.symlink_to(secret)
    os.mkfifo(fifo)
    try:
        yield {"secret": secret, "missing": folder / "missing.safetensors", "link": link, "fifo": fifo}
    finally:
        link.unlink(missing_ok=True)
        fifo.unlink(missing_ok=True)


def _dataset_names(comfy_server, outside) -> dict[str, str]:
    inp = input_root(comfy_server)
    return {
        "absolute_existing": str(outside["secret"]),
        "absolute_missing": str(outside["missing"]),
        "relative_existing": os.path.relpath(outside["secret"], inp),
        "relative_missing": os.path.relpath(outside["missing"], inp),
        "link_out": outside["link"].name,
        "fifo": outside["fifo"].name,
    }


def test_dataset_list_holds_only_regular_files_inside_input(comfy_server, outside):
    spec = comfy_server.client.object_info()["LoraLab_LoadLatentDataset"]["input"]["required"]["dataset"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # V1 list or V3 COMBO
    assert "loralab-tiny-dataset.safetensors" in options
    assert outside["link"].name not in options and outside["fifo"].name not in options, options


@pytest.mark.parametrize(
    "case",
    ["absolute_existing", "absolute_missing", "relative_existing", "relative_missing", "link_out", "fifo"],
)
def test_dataset_outside_input_is_refused_when_queued(comfy_server, outside, case):
    """Before issue 17 validate_inputs asked only whether the path existed: an existing outside file
    passed and was loaded (its tensor names came back in the error), a missing one was refused, and
    the FIFO blocked the worker for good. ComfyUI 0.3.75 does not check V3 combo values against the
    list, so the node's own validate_inputs is what refuses them."""
    name = _dataset_names(comfy_server, outside)[case]
    g = Graph()
    latents, positive = g.dataset(name)
    g.add("LoraLab_DenoiseLoss", model=g.unet(), latents=latents, positive=positive, seed=0, levels=1)
    loader_id = "1"  # the dataset node, added first
    with fifo_unblocker(outside["fifo"]), pytest.raises(PromptRejected) as caught:
        comfy_server.client.run(g.prompt, timeout=60)
    errors = caught.value.node_errors[loader_id]["errors"]
    print(f"{case}: {errors[0]['message']}: {errors[0]['details'][:160]}")
    assert [e["extra_info"]["input_name"] for e in errors] == ["dataset"], errors
    assert "not a regular .safetensors file inside ComfyUI's input folder" in errors[0]["details"], errors
    assert SECRET_KEY not in json.dumps(caught.value.body)


def test_dataset_refusal_is_the_same_for_existing_and_missing_outside_paths(comfy_server, outside):
    names = _dataset_names(comfy_server, outside)
    answers = {}
    for case in ("absolute_existing", "absolute_missing", "relative_existing", "relative_missing"):
        g = Graph()
        latents, positive = g.dataset(names[case])
        g.add("LoraLab_DenoiseLoss", model=g.unet(), latents=latents, positive=positive, seed=0, levels=1)
        with pytest.raises(PromptRejected) as caught:
            comfy_server.client.run(g.prompt, timeout=60)
        errors = caught.value.node_errors["1"]["errors"]
        answers[case] = json.dumps(errors).replace(names[case], "<NAME>")
    assert answers["absolute_existing"] == answers["absolute_missing"]
    assert answers["relative_existing"] == answers["relative_missing"]


# ---------------------------------------------------------------------- 2: image folders


def png_header_only(path: pathlib.Path, width: int, height: int) -> None:
    """A ~60-byte PNG whose header claims width x height (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _stage_folder(comfy_server, case: str, tmp_path) -> tuple[str, int, list[str]]:
    """input/e2e_host-img-<case>/ with a good image and one bad thing: (folder, resolution, words)."""
    folder = input_root(comfy_server) / f"{DIR}-img-{case}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (9, 99, 199)).save(folder / "a_good.png")
    if case == "tall":  # 1 x 20 000 at 512 (161 bytes): a 64 x 1 280 000 intermediate, ~406 MiB before
        Image.new("RGB", (1, 20_000), (200, 0, 0)).save(folder / "b_tall.png")
        return folder.name, 512, ["b_tall.png", "aspect ratio", "8:1"]
    if case == "huge":  # header says 10 000 x 10 000
        png_header_only(folder / "b_huge.png", 10_000, 10_000)
        return folder.name, 512, ["b_huge.png", "100,000,000 pixels", "limit of 67,108,864"]
    if case == "caption_link":  # an outside file's text must not become a caption
        secret = tmp_path / "secret_caption.txt"
        secret.write_text("PRIVATE TEXT FROM OUTSIDE")
        (folder / "a_good.txt").symlink_to(secret)
        return folder.name, 64, ["a_good.txt", "symbolic link"]
    if case == "caption_size":
        (folder / "a_good.txt").write_bytes(b"word " * 20_000)  # 100 000 bytes
        return folder.name, 64, ["a_good.txt", "100000 bytes", "limit of 65536"]
    if case == "too_many":  # 10 001 names of one tiny file (hard links: written in a blink)
        for i in range(10_001):
            os.link(folder / "a_good.png", folder / f"c_{i:05}.png")
        return folder.name, 64, ["more than 10000 images"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["tall", "huge", "caption_link", "caption_size", "too_many"])
def test_image_folder_limits(comfy_server, case, tmp_path):
    folder, resolution, words = _stage_folder(comfy_server, case, tmp_path)
    g = Graph()
    loader = g.add("LoraLab_LoadImageCaptionFolder", folder=folder, resolution=resolution, caption_extension=".txt",
                   default_caption="x")  # fmt: skip
    g.add("PreviewImage", images=loader[0])
    try:
        result = comfy_server.client.run(g.prompt, timeout=120)
        message = node_error(result, loader)
        print(f"{case} ({result.elapsed:.2f} s): {message}")
        assert message.startswith("folder:"), message
        for word in words:
            assert word in message, (word, message)
        assert "PRIVATE TEXT" not in json.dumps(result.history)
        assert result.elapsed < 30
    finally:
        shutil.rmtree(input_root(comfy_server) / folder, ignore_errors=True)


# ---------------------------------------------------------------------- 3-4: checkpoints and step counts


@pytest.fixture(scope="module")
def kept(comfy_server):
    """An earlier run's checkpoint, then 5 steps with save_every 1 and keep_checkpoints 2 (same prefix)."""
    folder = loras_root(comfy_server) / DIR / "keep"
    folder.mkdir(parents=True, exist_ok=True)
    earlier = [folder / "ck_1_steps_00001.safetensors", folder / "ck_1_steps_00001.lorastate"]
    for p in earlier:
        p.write_bytes(b"an earlier run's file")
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = g.training_options(save_every=1, keep_checkpoints=2, checkpoint_prefix=f"{DIR}/keep/ck")
    trainer = g.train_with_options(model, latents, positive, options, steps=5, seed=171, lora_dtype="fp32")
    g.save_lora(trainer[LORA_OUT], f"{DIR}/keep_final", steps=trainer[STEPS_OUT])
    result, log = run_logged(comfy_server, g.prompt)
    assert result.status == "success", result.error_message
    return {"folder": folder, "earlier": earlier, "log": log}


def test_keep_checkpoints_prunes_this_runs_older_checkpoints_only(kept):
    names = sorted(p.name for p in kept["folder"].iterdir())
    print(names)
    assert names == sorted([p.name for p in kept["earlier"]] + [
        "ck_4_steps_00005.safetensors", "ck_4_steps_00005.lorastate",
        "ck_5_steps_00006.safetensors", "ck_5_steps_00006.lorastate",
    ]), names  # fmt: skip
    assert all(p.read_bytes() == b"an earlier run's file" for p in kept["earlier"])
    assert (
        kept["log"].count("removed the older checkpoint file") == 6
    )  # steps 2 and 3 (step 1 is ck_1_..._00002)


def test_sidecar_records_its_loras_hash(kept):
    lora = kept["folder"] / "ck_5_steps_00006.safetensors"
    with safe_open(str(kept["folder"] / "ck_5_steps_00006.lorastate"), framework="pt") as f:
        meta = json.loads(f.metadata()["loralab.trainstate"])
    assert meta["lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest() and meta["step"] == 5


def _continue(comfy_server, existing: str, prefix: str, seed: int):
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, seed=seed, existing_lora=existing, lora_dtype="fp32")
    saver = g.save_lora(trainer[LORA_OUT], prefix, steps=trainer[STEPS_OUT])
    result, log = run_logged(comfy_server, g.prompt)
    assert result.status == "success", result.error_message
    return saved_lora(result, saver)[0], log


def test_foreign_sidecar_is_ignored_with_a_warning(comfy_server, kept):
    """The step-5 checkpoint's sidecar copied beside the step-4 one: before issue 17 it silently
    replaced the file's weights and step (5 + 1 = 6 steps); now the step-4 file resumes from its
    weights (4 + 1)."""
    src, dst = kept["folder"], loras_root(comfy_server) / DIR / "foreign"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "ck_4_steps_00005.safetensors", dst / "ck_4_steps_00005.safetensors")
    shutil.copyfile(src / "ck_5_steps_00006.lorastate", dst / "ck_4_steps_00005.lorastate")
    name, log = _continue(
        comfy_server, f"{DIR}/foreign/ck_4_steps_00005.safetensors", f"{DIR}/foreign_out", 172
    )
    warned = [line for line in log.splitlines() if "ignoring its training state" in line]
    print("\n".join(warned))
    assert len(warned) == 1 and "belongs to another LoRA file" in warned[0], log[-3000:]
    assert name.startswith(f"{DIR}/foreign_out_5_steps_"), name


def test_bogus_step_counts_in_files_are_ignored_with_a_warning(comfy_server, kept):
    # ss_steps = 1e308 (and nothing else) in a downloaded LoRA: a 309-digit step count and an OSError
    # at save before issue 17
    folder = loras_root(comfy_server) / DIR / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    src = kept["folder"] / "ck_5_steps_00006.safetensors"
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(folder / "downloaded.safetensors"), metadata={"ss_steps": "1e308"})
    name, log = _continue(comfy_server, f"{DIR}/steps/downloaded.safetensors", f"{DIR}/steps_out", 173)
    assert name.startswith(f"{DIR}/steps_out_1_steps_"), name
    assert "ignoring the step count ss_steps='1e308'" in log, log[-3000:]

    # A sidecar whose step is 1e308, still bound to its LoRA (the hash matches): refused for its value.
    shutil.copyfile(src, folder / "ck_5_steps_00006.safetensors")
    with safe_open(str(kept["folder"] / "ck_5_steps_00006.lorastate"), framework="pt") as f:
        meta = json.loads(f.metadata()["loralab.trainstate"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["step"] = 1e308
    save_file(
        state, str(folder / "ck_5_steps_00006.lorastate"), metadata={"loralab.trainstate": json.dumps(meta)}
    )
    name, log = _continue(
        comfy_server, f"{DIR}/steps/ck_5_steps_00006.safetensors", f"{DIR}/steps_state", 174
    )
    assert name.startswith(f"{DIR}/steps_state_6_steps_"), name
    warned = [line for line in log.splitlines() if "ignoring its training state" in line]
    assert len(warned) == 1 and "not a whole number" in warned[0], log[-3000:]


# ---------------------------------------------------------------------- 5: deeply nested header


def test_deeply_nested_lora_header_is_a_readable_error(comfy_server):
    folder = loras_root(comfy_server) / DIR / "deep"
    folder.mkdir(parents=True, exist_ok=True)
    depth = 200_000
    header = ('{"a": ' + "[" * depth + "]" * depth + "}").encode()
    (folder / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, existing_lora=f"{DIR}/deep/deep.safetensors")
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_deep")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, trainer)
    print(message)
    assert message.startswith("existing_lora:") and "deep.safetensors" in message, message
    assert "not a safetensors file" in message and "nested too deeply" in message, message


# ---------------------------------------------------------------------- 6: NaN options

FLOAT_OPTIONS = ["weight_decay", "max_grad_norm", "alpha", "logit_mean", "logit_std", "flow_shift", "min_snr_gamma",
                 "noise_offset"]  # fmt: skip


@pytest.mark.parametrize("field", FLOAT_OPTIONS)
def test_nan_option_is_refused_naming_it(comfy_server, field):
    """NaN passes ComfyUI's min / max checks (every comparison with NaN is false); before issue 17
    weight_decay / min_snr_gamma / alpha NaN trained and ended in "lower learning_rate" or NaN weights."""
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    options = g.training_options(**{field: math.nan})
    trainer = g.train_with_options(model, latents, positive, options, steps=1, seed=175)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_nan")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, options)
    print(f"{field}: {message}")
    assert message.startswith(field) and "nan" in message, message
    assert not list((loras_root(comfy_server) / DIR).glob("never_nan*"))


def test_nan_learning_rate_is_refused_naming_it(comfy_server):
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, learning_rate=math.nan)
    g.save_lora(trainer[LORA_OUT], f"{DIR}/never_nan_lr")
    result = comfy_server.client.run(g.prompt, timeout=120)
    message = node_error(result, trainer)
    assert "learning_rate" in message and "nan" in message, message


# ---------------------------------------------------------------------- 7: no absolute paths in UI results


def test_save_lora_ui_result_carries_no_absolute_path(comfy_server):
    g = Graph()
    model = g.unet()
    latents, positive = g.dataset()
    trainer = g.train(model, latents, positive, steps=1, seed=176)
    saver = g.save_lora(trainer[LORA_OUT], f"{DIR}/ui", steps=trainer[STEPS_OUT])
    result, _ = run_logged(comfy_server, g.prompt)
    assert result.status == "success", result.error_message
    entries = result.outputs[saver.id]["loras"]
    print(entries)
    assert entries == [{"filename": entries[0]["filename"], "type": "loras"}]
    assert (loras_root(comfy_server) / entries[0]["filename"]).is_file()
    seen = json.dumps([result.history, [data for _, data in result.events]])
    assert str(comfy_server.base_dir) not in seen and str(comfy_server.base_dir.resolve()) not in seen
