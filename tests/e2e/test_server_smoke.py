"""Smoke tests against a real ComfyUI with this pack installed (one server for the session)."""

from __future__ import annotations

import json
import pathlib
import re
import warnings

import pytest

from harness.client import PromptRejected
from harness.server import PACK_NAME
from harness.workflow import WorkflowMismatchWarning, ui_to_api

pytestmark = pytest.mark.server

ROOT = pathlib.Path(__file__).resolve().parents[2]
PREFIX = "LoraLab_"
EXPECTED_NODES = {
    "LoraLab_TrainLoraNode",
    "LoraLab_LoadLatentDataset",
    "LoraLab_SaveLora",
    "LoraLab_PlotLoss",
    "LoraLab_TrainingOptions",
    "LoraLab_PreviewSettings",
    "LoraLab_PreviewImages",
}
EXAMPLE = ROOT / "example_workflows" / "loralab_tiny_sd3_lora.json"


def _pack_module(info: dict) -> bool:
    """Whether an object_info entry comes from this pack (ComfyUI names it after the folder)."""
    module = str(info.get("python_module", ""))
    return module == f"custom_nodes.{PACK_NAME}" or module.startswith(f"custom_nodes.{PACK_NAME}.")


def test_server_is_up(comfy_server):
    stats = comfy_server.client.system_stats()
    assert "system" in stats and "devices" in stats
    assert comfy_server.server.is_running()
    assert comfy_server.url.startswith("http://127.0.0.1:")


def test_pack_imported_without_errors(comfy_server):
    # Start-up only: tests that run before this one provoke execution errors on purpose (their
    # tracebacks run through the pack's files too), and each prompt's log starts with "got prompt"
    # (newer ComfyUI prefixes its log lines with a coloured level tag).
    log = re.split(r"\n[^\n]*?got prompt", comfy_server.log_text(), maxsplit=1)[0]
    bad = []
    for line in log.splitlines():
        if PACK_NAME not in line:
            continue
        if re.search(r"Cannot import|IMPORT FAILED|Error while calling comfy_entrypoint|Traceback", line):
            bad.append(line)
    # A traceback that runs through the pack's files, whatever its first line says.
    for block in re.split(r"\n(?=Traceback \(most recent call last\))", log):
        if block.startswith("Traceback") and f"custom_nodes/{PACK_NAME}" in block.split("\n\n")[0]:
            bad.append(block.split("\n\n")[0][-2000:])
    assert not bad, "the pack did not import cleanly:\n" + "\n".join(bad)


def test_object_info_lists_the_pack_nodes(comfy_server):
    info = comfy_server.object_info
    ours = sorted(k for k in info if k.startswith(PREFIX))
    assert len(ours) >= 2, f"no {PREFIX} nodes in /object_info (found {ours})"
    missing = EXPECTED_NODES - set(ours)
    assert not missing, f"missing nodes: {sorted(missing)}; present: {ours}"
    # Every node the pack registers carries the prefix, and every prefixed node is the pack's own: a
    # clash with a built-in id would be skipped silently by ComfyUI.
    from_pack = sorted(k for k, v in info.items() if _pack_module(v))
    assert from_pack, "no node reports this pack as its python_module"
    assert all(k.startswith(PREFIX) for k in from_pack), [k for k in from_pack if not k.startswith(PREFIX)]
    assert set(ours) == set(from_pack), {"prefixed, not ours": sorted(set(ours) - set(from_pack))}
    for key in ours:
        assert info[key].get("name") == key
        assert info[key].get("category"), f"{key} has no category"


def test_object_info_agrees_with_the_option_table(comfy_server):
    """Both nodes' widgets are the rows of training.config.OPTIONS: name, order, kind, default, range,
    step, choices and tooltip, as the live server reports them."""
    from training.config import node_options

    kinds = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "string": "STRING"}
    for node, where in (("LoraLab_TrainLoraNode", "train"), ("LoraLab_TrainingOptions", "options")):
        required = comfy_server.object_info[node]["input"]["required"]
        table = node_options(where)
        names = [name for name in required if name in {o.name for o in table}]
        assert names == [o.name for o in table], (node, names)
        for option in table:
            kind, spec = required[option.name][0], required[option.name][1]
            if option.kind == "combo":
                assert (kind if isinstance(kind, list) else spec.get("options")) == list(option.choices), (
                    option.name
                )
            else:
                assert kind == kinds[option.kind], (option.name, kind)
            assert spec["default"] == option.widget_default, (option.name, spec["default"])
            assert spec.get("tooltip") == option.tooltip, option.name
            if option.kind in ("int", "float"):
                assert (spec["min"], spec["max"]) == (option.lo, option.hi), (option.name, spec)
            if option.kind == "float":
                assert spec["step"] == option.step, option.name


def test_builtin_prompt_runs_end_to_end(comfy_server):
    prompt = {
        "1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "smoke/latent"}},
    }
    seen = []
    result = comfy_server.client.run(prompt, timeout=120, on_event=lambda t, d: seen.append(t))
    assert result.status == "success", result.error_message
    assert result.error is None
    assert seen and seen[-1] == "execution_success"
    assert "execution_start" in seen and "executed" in seen
    files = result.outputs["2"]["latents"]
    assert len(files) == 1 and files[0]["type"] == "output" and files[0]["subfolder"] == "smoke"
    path = comfy_server.base_dir / "output" / files[0]["subfolder"] / files[0]["filename"]
    assert path.is_file() and path.stat().st_size > 0
    assert result.history["status"]["status_str"] == "success"
    # the same prompt again is served from the cache and still ends in success
    again = comfy_server.client.run(prompt, timeout=60)
    assert again.status == "success"


def test_invalid_prompt_is_rejected_with_node_errors(comfy_server):
    prompt = {"1": {"class_type": "SaveLatent", "inputs": {"filename_prefix": "smoke/x"}}}
    with pytest.raises(PromptRejected) as info:
        comfy_server.client.queue_prompt(prompt)
    assert info.value.status == 400
    assert "1" in info.value.node_errors
    assert "samples" in str(info.value)


def test_execution_error_is_reported(comfy_server):
    # LoadLatent with a file that is no latent: validation passes (the file exists), loading fails.
    bogus = comfy_server.base_dir / "input" / "smoke-not-a-latent.latent"
    bogus.write_bytes(b"this is not a safetensors file")
    prompt = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": bogus.name}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "smoke/bad"}},
    }
    try:
        result = comfy_server.client.run(prompt, timeout=120)
    finally:
        bogus.unlink()
    assert result.status == "error"
    assert result.error is not None and result.error.get("node_id") == "1"
    assert result.error.get("exception_type")
    assert result.error_message.startswith("LoadLatent (node 1)")
    assert "2" not in result.outputs


def test_example_workflow_converts_against_live_object_info(comfy_server):
    wf = json.loads(EXAMPLE.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkflowMismatchWarning)
        api = ui_to_api(wf, comfy_server.object_info, strict=True)
    classes = sorted(v["class_type"] for v in api.values())
    assert classes == sorted(["UNETLoader", "SaveImage", *EXPECTED_NODES])
    info = comfy_server.object_info
    for node_id, node in api.items():
        spec = info[node["class_type"]]["input"]
        required = set((spec.get("required") or {}).keys())
        missing = required - set(node["inputs"])
        assert not missing, f"node {node_id} ({node['class_type']}) lacks {sorted(missing)}"
