"""ui_to_api against the stock workflow templates that ship with ComfyUI's frontend packages.

They are real frontend saves, so they check the widget rules (seed controls, uploads, input order)
on far more node types than the hand-made cases. Needs the live /object_info of the session server.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import warnings

import pytest

from harness.workflow import FRONTEND_ONLY_NODES, MODE_BYPASS, MODE_MUTED, ui_to_api, widget_layout

pytestmark = pytest.mark.server

PACKAGES = (
    "comfyui_workflow_templates_core",
    "comfyui_workflow_templates_media_image",
    "comfyui_workflow_templates_media_video",
    "comfyui_workflow_templates_media_api",
    "comfyui_workflow_templates_media_other",
)


def _template_files() -> list[pathlib.Path]:
    files = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            files += sorted(pathlib.Path(loc, "templates").glob("*.json"))
    return files


def _convertible(wf: dict, object_info: dict) -> bool:
    if "nodes" not in wf or (wf.get("definitions") or {}).get("subgraphs"):
        return False
    return all(
        n.get("type") in object_info
        or n.get("type") in FRONTEND_ONLY_NODES
        or n.get("mode") in (MODE_MUTED, MODE_BYPASS)
        for n in wf["nodes"]
    )


def test_stock_templates_convert(comfy_server):
    files = _template_files()
    if not files:
        pytest.skip("no comfyui_workflow_templates packages installed")
    info = comfy_server.object_info
    converted = 0
    too_few: list[str] = []
    for path in files:
        wf = json.loads(path.read_text())
        if not _convertible(wf, info):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api = ui_to_api(wf, info)
        converted += 1
        for node in wf["nodes"]:
            if node.get("type") not in info or not isinstance(node.get("widgets_values"), list):
                continue
            if info[node["type"]].get("api_node"):
                continue  # paid API nodes change their inputs often; templates lag behind
            layout = widget_layout(info[node["type"]])
            # Frontend extensions may append widgets of their own (3D viewers, API-node status), so a
            # template may hold more values than the definition implies, never fewer.
            if len(node["widgets_values"]) < len(layout):
                too_few.append(
                    f"{path.name}: node {node['id']} {node['type']} "
                    f"{len(node['widgets_values'])} < {len(layout)}"
                )
        for node_id, entry in api.items():
            assert entry["class_type"] in info, (path.name, node_id)
            for name, value in entry["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    assert value[0] in api, f"{path.name}: node {node_id}.{name} links to missing {value[0]}"
    assert converted >= 50, f"only {converted} templates were convertible"
    assert not too_few, "\n".join(too_few)
