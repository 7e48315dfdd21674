"""Every example workflow against a real ComfyUI: it converts, the tiny ones run, the big ones validate.

The API form of each example is derived from the UI file with ``harness.workflow.ui_to_api`` against
the live ``/object_info`` (no API twins are committed). Tiny examples (``loralab_tiny_*``) run to the
end on the tiny generated model; examples for real models (SD1.5, SDXL, SD3.5) cannot run here, so
they are queued and must be refused *only* because their model files are missing.

Also: LoraLab_LoadImageCaptionFolder through a small prompt (list outputs into PreviewImage).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import uuid
import warnings

import numpy as np
import pytest
from PIL import Image

from harness.client import PromptRejected
from harness.workflow import FRONTEND_ONLY_NODES, WorkflowMismatchWarning, ui_to_api

pytestmark = pytest.mark.server

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
TINY = [p for p in EXAMPLES if p.name.startswith("loralab_tiny_")]
BIG = [p for p in EXAMPLES if not p.name.startswith("loralab_tiny_")]
MODEL_LOADERS = {
    "CheckpointLoaderSimple",
    "UNETLoader",
    "CLIPLoader",
    "DualCLIPLoader",
    "TripleCLIPLoader",
    "VAELoader",
}
MODEL_FILE_INPUTS = {
    "ckpt_name",
    "unet_name",
    "clip_name",
    "clip_name1",
    "clip_name2",
    "clip_name3",
    "vae_name",
}
CONTINUE_FROM = "loralab/tiny_sd3_40_steps_00001.safetensors"  # what loralab_tiny_sd3_lora.json writes first
IMAGE_FOLDER = "loralab_images"  # the folder the image-folder examples read


def _ids(paths):
    return [p.stem for p in paths]


def _convert(path: pathlib.Path, object_info: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkflowMismatchWarning)
        return ui_to_api(json.loads(path.read_text()), object_info, strict=True)


def _write_png(path: pathlib.Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="session")
def image_folder(comfy_server) -> pathlib.Path:
    """input/loralab_images with two small images and captions (the image-folder examples validate)."""
    folder = comfy_server.base_dir / "input" / IMAGE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        _write_png(folder / f"img{i}.png", 96, 64, i)
        (folder / f"img{i}.txt").write_text(f"a photo of sks, image {i}")
    return folder


def test_there_are_tiny_and_big_examples():
    names = {p.name for p in EXAMPLES}
    assert {
        "loralab_tiny_sd3_lora.json",
        "loralab_tiny_sd3_continue.json",
        "loralab_tiny_sd3_loha_lokr.json",
        "loralab_sd15_image_folder.json",
        "loralab_sdxl_image_folder.json",
        "loralab_sd3_image_folder.json",
        "loralab_flux_dev_image_folder.json",
        "loralab_qwen_image_image_folder.json",
        "loralab_z_image_image_folder.json",
        "loralab_wan22_5b_image_folder.json",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_has_the_frontends_workflow_shape(path):
    """What the frontend's schema checks before it opens a template (a bad id put an alert over the
    template browser): a UUID id, integer node and link ids within last_node_id / last_link_id, and
    links as [id, from node, from slot, to node, to slot, type] between existing nodes."""
    wf = json.loads(path.read_text())
    uuid.UUID(wf["id"])
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert all(isinstance(i, int) for i in nodes) and len(nodes) == len(wf["nodes"])
    assert wf["last_node_id"] >= max(nodes)
    for link in wf["links"]:
        lid, src, src_slot, dst, dst_slot, typ = link
        assert all(isinstance(v, int) for v in (lid, src, src_slot, dst, dst_slot)) and isinstance(
            typ, str
        ), link
        assert lid <= wf["last_link_id"] and src in nodes and dst in nodes, link
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid, link
        assert lid in nodes[src]["outputs"][src_slot]["links"], link


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_converts_with_same_nodes_and_links(comfy_server, path):
    ui = json.loads(path.read_text())
    api = _convert(path, comfy_server.object_info)
    info = comfy_server.object_info
    ui_nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert any(n["type"] == "Note" for n in ui["nodes"]), f"{path.name} has no Note node"
    assert not {n["type"] for n in ui["nodes"]} & (FRONTEND_ONLY_NODES - {"Note"}), (
        "only Note is expected as frontend node"
    )
    # every UI node except the Note appears, with the same class
    expected = {k: n["type"] for k, n in ui_nodes.items() if n["type"] != "Note"}
    assert {k: v["class_type"] for k, v in api.items()} == expected
    for k, node in api.items():
        assert node["class_type"] in info, f"unknown node type {node['class_type']}"
        required = set((info[node["class_type"]]["input"].get("required") or {}).keys())
        assert not required - set(node["inputs"]), f"node {k} lacks {sorted(required - set(node['inputs']))}"
    # the link structure is the same: each UI link is one [source, slot] input in the API prompt
    api_links = {
        (v[0], v[1], k, name)
        for k, node in api.items()
        for name, v in node["inputs"].items()
        if isinstance(v, list)
    }
    ui_links = set()
    for lid, src, src_slot, dst, dst_slot, _type in ui["links"]:
        dst_node = ui_nodes[str(dst)]
        assert dst_node["inputs"][dst_slot]["link"] == lid
        assert lid in (ui_nodes[str(src)]["outputs"][src_slot]["links"] or [])
        ui_links.add((str(src), src_slot, str(dst), dst_node["inputs"][dst_slot]["name"]))
    assert api_links == ui_links
    # link types agree with the definitions (ComfyUI would refuse a mismatch)
    for _lid, src, src_slot, _dst, _dst_slot, typ in ui["links"]:
        assert info[ui_nodes[str(src)]["type"]]["output"][src_slot] == typ
    assert ui["extra"]["frontendVersion"] and ui["version"] == 0.4
    assert ui["last_node_id"] >= max(int(k) for k in ui_nodes)
    assert ui["last_link_id"] >= max((lk[0] for lk in ui["links"]), default=0)


def _ensure_continue_source(comfy_server) -> None:
    """models/loras/loralab/tiny_sd3_40_steps_00001.safetensors, as a first run of the tiny example writes it."""
    target = comfy_server.base_dir / "models" / "loras" / CONTINUE_FROM
    if target.is_file():
        return
    result = comfy_server.client.run(
        _convert(ROOT / "example_workflows" / "loralab_tiny_sd3_lora.json", comfy_server.object_info),
        timeout=600,
    )
    assert result.status == "success", result.error_message
    if not target.is_file():  # another test used the prefix and removed its files: copy this run's file
        made = sorted(target.parent.glob("tiny_sd3_40_steps_*.safetensors"))
        assert made, "the tiny example wrote no LoRA"
        shutil.copyfile(made[-1], target)


@pytest.mark.parametrize("path", TINY, ids=_ids(TINY))
def test_tiny_example_runs_to_completion(comfy_server, path):
    if path.name == "loralab_tiny_sd3_continue.json":
        _ensure_continue_source(comfy_server)
        info = comfy_server.client.object_info()  # fresh: the loras list now holds the file
    else:
        info = comfy_server.object_info
    api = _convert(path, info)
    result = comfy_server.client.run(api, timeout=600)
    assert result.status == "success", result.error_message
    savers = [k for k, v in api.items() if v["class_type"] == "LoraLab_SaveLora"]
    plots = [k for k, v in api.items() if v["class_type"] == "LoraLab_PlotLoss"]
    assert savers and plots
    loras = comfy_server.base_dir / "models" / "loras"
    for k in savers:
        prefix = api[k]["inputs"]["filename_prefix"]
        assert list(loras.glob(prefix + "_*_steps_*.safetensors")), f"no file for {prefix}"
    if path.name == "loralab_tiny_sd3_continue.json":
        assert list(loras.glob("loralab/tiny_sd3_continued_80_steps_*.safetensors")), "40 + 40 steps expected"


@pytest.mark.parametrize("path", BIG, ids=_ids(BIG))
def test_big_example_is_refused_only_for_missing_model_files(comfy_server, image_folder, path):
    api = _convert(path, comfy_server.object_info)
    with pytest.raises(PromptRejected) as info:
        comfy_server.client.queue_prompt(api)
    node_errors = info.value.node_errors
    assert info.value.status == 400 and node_errors, info.value
    for node_id, entry in node_errors.items():
        assert api[node_id]["class_type"] in MODEL_LOADERS, entry
        for err in entry["errors"]:
            assert err["type"] == "value_not_in_list", err
            assert err["extra_info"]["input_name"] in MODEL_FILE_INPUTS, err


def test_load_image_caption_folder_feeds_one_preview_per_image(comfy_server):
    folder = comfy_server.base_dir / "input" / "loralab_test_folder"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in {"a.png": (128, 128), "b.jpg": (256, 128), "c.webp": (100, 300)}.items():
        _write_png(folder / name, w, h, len(name)) if name.endswith(".png") else Image.new(
            "RGB", (w, h), (200, 10, 10)
        ).save(folder / name)
    (folder / "a.txt").write_text("first")
    (folder / "b.txt").write_text("second")
    (folder / "notes.md").write_text("not an image")
    prompt = {
        "1": {
            "class_type": "LoraLab_LoadImageCaptionFolder",
            "inputs": {
                "folder": "loralab_test_folder",
                "resolution": 128,
                "caption_extension": ".txt",
                "default_caption": "x",
            },
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    result = comfy_server.client.run(prompt, timeout=120)
    assert result.status == "success", result.error_message
    images = result.outputs["2"]["images"]
    assert len(images) == 3
    sizes = []
    for img in images:
        with Image.open(
            comfy_server.base_dir / img["type"] / img.get("subfolder", "") / img["filename"]
        ) as im:
            sizes.append(im.size)
    assert sorted(sizes) == sorted([(128, 128), (192, 64), (64, 192)])


@pytest.mark.parametrize("folder", ["../input", "/tmp", "a/../../x", "loralab_no_such_folder"])
def test_load_image_caption_folder_refuses_bad_folders_at_queue_time(comfy_server, folder):
    prompt = {
        "1": {
            "class_type": "LoraLab_LoadImageCaptionFolder",
            "inputs": {
                "folder": folder,
                "resolution": 512,
                "caption_extension": ".txt",
                "default_caption": "",
            },
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(PromptRejected) as info:
        comfy_server.client.queue_prompt(prompt)
    assert "1" in info.value.node_errors
    assert "folder" in json.dumps(info.value.node_errors["1"])


def test_load_image_caption_folder_empty_folder_fails_naming_folder(comfy_server):
    (comfy_server.base_dir / "input" / "loralab_empty_folder").mkdir(parents=True, exist_ok=True)
    prompt = {
        "1": {
            "class_type": "LoraLab_LoadImageCaptionFolder",
            "inputs": {
                "folder": "loralab_empty_folder",
                "resolution": 512,
                "caption_extension": ".txt",
                "default_caption": "",
            },
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    result = comfy_server.client.run(prompt, timeout=120)
    assert result.status == "error"
    assert "folder" in result.error["exception_message"] and "no images" in result.error["exception_message"]
