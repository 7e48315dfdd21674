"""Unit tests of harness.workflow.ui_to_api against a small hand-made object_info (no server)."""

from __future__ import annotations

import copy
import json
import pathlib
import warnings

import pytest

from harness.workflow import (
    WidgetSlot,
    WorkflowMismatchWarning,
    fill_required_defaults,
    ui_to_api,
    widget_layout,
)
from training.config import node_options

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "example_workflows" / "loralab_tiny_sd3_lora.json"

OBJECT_INFO = {
    "Loader": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"]]}},
        "output": ["MODEL"],
        "display_name": "Load Checkpoint",
    },
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "seed": ["INT", {"default": 0, "min": 0}],  # no option: control widget by name
                "steps": ["INT", {"default": 20}],
                "cfg": ["FLOAT", {"default": 8.0}],
                "sampler_name": ["COMBO", {"options": ["euler", "heun"], "default": "euler"}],  # V3 style
                "latent": ["LATENT"],
            },
            "optional": {"denoise": ["FLOAT", {"default": 1.0}]},
        },
        "output": ["LATENT"],
    },
    "NoControl": {
        "input": {
            "required": {
                "seed": ["INT", {"default": 0, "control_after_generate": False}],
                "noise_seed": ["INT", {"default": 1}],
            }
        },
        "output": ["INT"],
    },
    "Controlled": {
        "input": {
            "required": {
                "value": ["INT", {"default": 0, "control_after_generate": True}],
                "choice": [["x", "y"], {"control_after_generate": True}],
                "text": ["STRING", {"default": "t"}],
            }
        },
        "output": ["INT"],
    },
    "ImageLoader": {
        "input": {"required": {"image": [["in.png"], {"image_upload": True}]}},
        "output": ["IMAGE", "MASK"],
    },
    "Saver": {
        "input": {
            "required": {"samples": ["LATENT"], "filename_prefix": ["STRING", {"default": "out"}]},
            "optional": {"steps": ["INT", {"forceInput": True}], "note": ["STRING", {"default": "n"}]},
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        },
        "output": [],
        "output_node": True,
    },
    "Ordered": {  # input_order wins over the dict order
        "input": {"required": {"b": ["INT", {"default": 2}], "a": ["INT", {"default": 1}]}},
        "input_order": {"required": ["a", "b"]},
        "output": ["INT"],
    },
    "Passthrough": {
        "input": {"required": {"latent": ["LATENT"], "strength": ["FLOAT", {"default": 1.0}]}},
        "output": ["LATENT"],
    },
    "Widgety": {
        "input": {
            "required": {
                "custom": ["MYTYPE", {"widgetType": "STRING", "default": "w"}],
                "forced": ["FLOAT", {"forceInput": True}],
            }
        },
        "output": ["LATENT"],
    },
}


def node(nid, ntype, widgets=(), inputs=(), outputs=(), mode=0, **extra):
    d = {
        "id": nid,
        "type": ntype,
        "mode": mode,
        "widgets_values": list(widgets),
        "inputs": [dict(i) for i in inputs],
        "outputs": [dict(o) for o in outputs],
    }
    d.update(extra)
    return d


def i(name, typ, link=None, widget=False):
    d = {"name": name, "type": typ, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def o(name, typ, links=()):
    return {"name": name, "type": typ, "links": list(links)}


def basic_graph():
    """Loader -> Sampler -> Saver, with a Note, and Passthrough feeding the latent."""
    return {
        "nodes": [
            node(1, "Loader", ["b.safetensors"], outputs=[o("MODEL", "MODEL", [1])]),
            node(
                2,
                "Passthrough",
                [0.5],
                inputs=[i("latent", "LATENT", None)],
                outputs=[o("LATENT", "LATENT", [2])],
            ),
            node(
                3,
                "Sampler",
                [42, "randomize", 7, 3.5, "heun", 0.75],
                inputs=[
                    i("model", "MODEL", 1),
                    i("latent", "LATENT", 2),
                    i("seed", "INT", None, widget=True),
                ],
                outputs=[o("LATENT", "LATENT", [3])],
            ),
            node(4, "Saver", ["pre", "note!"], inputs=[i("samples", "LATENT", 3)], title="My saver"),
            node(5, "Note", ["just a note"]),
        ],
        "links": [
            [1, 1, 0, 3, 0, "MODEL"],
            [2, 2, 0, 3, 1, "LATENT"],
            [3, 3, 0, 4, 0, "LATENT"],
        ],
        "version": 0.4,
    }


def test_basic_conversion_maps_widgets_links_and_skips_seed_control():
    api = ui_to_api(basic_graph(), OBJECT_INFO)
    assert set(api) == {"1", "2", "3", "4"}  # the Note is frontend-only
    assert api["1"] == {
        "class_type": "Loader",
        "inputs": {"ckpt_name": "b.safetensors"},
        "_meta": {"title": "Load Checkpoint"},
    }
    assert api["3"]["inputs"] == {
        "seed": 42,
        "steps": 7,
        "cfg": 3.5,
        "sampler_name": "heun",
        "denoise": 0.75,
        "model": ["1", 0],
        "latent": ["2", 0],
    }
    assert api["4"]["inputs"] == {"filename_prefix": "pre", "note": "note!", "samples": ["3", 0]}
    assert api["4"]["_meta"] == {"title": "My saver"}
    assert api["2"]["inputs"] == {"strength": 0.5}  # unconnected plain input is left out


def test_without_meta():
    api = ui_to_api(basic_graph(), OBJECT_INFO, include_meta=False)
    assert all(set(v) == {"class_type", "inputs"} for v in api.values())


def test_widget_layout_rules():
    assert widget_layout(OBJECT_INFO["Sampler"]) == [
        WidgetSlot("seed"),
        WidgetSlot("seed", "control"),
        WidgetSlot("steps"),
        WidgetSlot("cfg"),
        WidgetSlot("sampler_name"),
        WidgetSlot("denoise"),
    ]
    # explicit control_after_generate False turns the default off; noise_seed gets it by name
    assert widget_layout(OBJECT_INFO["NoControl"]) == [
        WidgetSlot("seed"),
        WidgetSlot("noise_seed"),
        WidgetSlot("noise_seed", "control"),
    ]
    # INT with the option: one extra; COMBO with it: control + filter list
    assert [s.kind for s in widget_layout(OBJECT_INFO["Controlled"])] == [
        "value",
        "control",
        "value",
        "control",
        "filter",
        "value",
    ]
    assert widget_layout(OBJECT_INFO["ImageLoader"]) == [WidgetSlot("image"), WidgetSlot("image", "upload")]
    assert widget_layout(OBJECT_INFO["Ordered"]) == [WidgetSlot("a"), WidgetSlot("b")]
    # forceInput and hidden inputs are no widgets; widgetType makes a custom type one
    assert widget_layout(OBJECT_INFO["Saver"]) == [WidgetSlot("filename_prefix"), WidgetSlot("note")]
    assert widget_layout(OBJECT_INFO["Widgety"]) == [WidgetSlot("custom")]


def test_control_and_upload_values_are_skipped():
    wf = {
        "nodes": [
            node(1, "Controlled", [5, "increment", "y", "fixed", "", "hello"]),
            node(2, "ImageLoader", ["in.png", "image"]),
            node(3, "NoControl", [3, 4, "fixed"]),
            node(4, "Ordered", [10, 20]),
        ],
        "links": [],
    }
    api = ui_to_api(wf, OBJECT_INFO, strict=True)
    assert api["1"]["inputs"] == {"value": 5, "choice": "y", "text": "hello"}
    assert api["2"]["inputs"] == {"image": "in.png"}
    assert api["3"]["inputs"] == {"seed": 3, "noise_seed": 4}
    assert api["4"]["inputs"] == {"a": 10, "b": 20}


def test_widget_input_with_link_overrides_stored_value():
    wf = basic_graph()
    wf["nodes"].append(node(6, "NoControl", [99, 98, "fixed"], outputs=[o("INT", "INT", [4])]))
    wf["nodes"][2]["inputs"][2]["link"] = 4  # Sampler.seed <- NoControl
    wf["links"].append([4, 6, 0, 3, 2, "INT"])
    api = ui_to_api(wf, OBJECT_INFO)
    assert api["3"]["inputs"]["seed"] == ["6", 0]


def test_muted_node_is_dropped_with_its_links():
    wf = basic_graph()
    wf["nodes"][1]["mode"] = 2  # Passthrough muted
    api = ui_to_api(wf, OBJECT_INFO)
    assert "2" not in api
    assert "latent" not in api["3"]["inputs"]
    assert api["3"]["inputs"]["model"] == ["1", 0]


def test_muted_source_of_a_widget_keeps_the_widget_value():
    wf = basic_graph()
    wf["nodes"].append(node(6, "NoControl", [99, 98, "fixed"], outputs=[o("INT", "INT", [4])], mode=2))
    wf["nodes"][2]["inputs"][2]["link"] = 4
    wf["links"].append([4, 6, 0, 3, 2, "INT"])
    api = ui_to_api(wf, OBJECT_INFO)
    assert api["3"]["inputs"]["seed"] == 42


def test_bypassed_node_is_wired_through():
    wf = basic_graph()
    # Loader -> ... and a latent source: Sampler(3) -> Passthrough(7, bypassed) -> Saver(4)
    wf["nodes"].append(
        node(
            7,
            "Passthrough",
            [1.0],
            inputs=[i("latent", "LATENT", 5)],
            outputs=[o("LATENT", "LATENT", [6])],
            mode=4,
        )
    )
    wf["nodes"][3]["inputs"][0]["link"] = 6
    wf["links"] = [lk for lk in wf["links"] if lk[0] != 3] + [
        [5, 3, 0, 7, 0, "LATENT"],
        [6, 7, 0, 4, 0, "LATENT"],
    ]
    api = ui_to_api(wf, OBJECT_INFO)
    assert "7" not in api
    assert api["4"]["inputs"]["samples"] == ["3", 0]


def test_bypassed_node_without_matching_input_drops_the_link():
    wf = basic_graph()
    wf["nodes"][0]["mode"] = 4  # Loader bypassed: it has no MODEL input to pass through
    api = ui_to_api(wf, OBJECT_INFO)
    assert "1" not in api and "model" not in api["3"]["inputs"]


def test_reroute_is_followed_and_primitive_value_inlined():
    wf = basic_graph()
    wf["nodes"].append(node(8, "Reroute", [], inputs=[i("", "*", 10)], outputs=[o("", "MODEL", [11])]))
    wf["nodes"].append(node(9, "Reroute", [], inputs=[i("", "*", 11)], outputs=[o("", "MODEL", [12])]))
    wf["nodes"][2]["inputs"][0]["link"] = 12
    wf["nodes"].append(node(10, "PrimitiveNode", [1234, "fixed"], outputs=[o("INT", "INT", [13])]))
    wf["nodes"][2]["inputs"][2]["link"] = 13
    wf["links"] = [lk for lk in wf["links"] if lk[0] != 1] + [
        [10, 1, 0, 8, 0, "MODEL"],
        [11, 8, 0, 9, 0, "MODEL"],
        [12, 9, 0, 3, 0, "MODEL"],
        [13, 10, 0, 3, 2, "INT"],
    ]
    api = ui_to_api(wf, OBJECT_INFO)
    assert not {"8", "9", "10"} & set(api)
    assert api["3"]["inputs"]["model"] == ["1", 0]
    assert api["3"]["inputs"]["seed"] == 1234


def test_link_objects_of_schema_version_1():
    wf = basic_graph()
    wf["links"] = [
        {
            "id": lk[0],
            "origin_id": lk[1],
            "origin_slot": lk[2],
            "target_id": lk[3],
            "target_slot": lk[4],
            "type": lk[5],
        }
        for lk in wf["links"]
    ]
    assert ui_to_api(wf, OBJECT_INFO) == ui_to_api(basic_graph(), OBJECT_INFO)


def test_widgets_values_as_dict():
    wf = {"nodes": [node(1, "Ordered", [])], "links": []}
    wf["nodes"][0]["widgets_values"] = {"b": 5, "a": 6}
    assert ui_to_api(wf, OBJECT_INFO)["1"]["inputs"] == {"a": 6, "b": 5}


def test_unknown_class_names_it():
    wf = basic_graph()
    wf["nodes"].append(node(11, "NotANode", []))
    with pytest.raises(ValueError, match="NotANode"):
        ui_to_api(wf, OBJECT_INFO)


def test_unknown_but_muted_node_is_ignored():
    wf = basic_graph()
    wf["nodes"].append(node(11, "NotANode", [], mode=2))
    assert "11" not in ui_to_api(wf, OBJECT_INFO)


def test_subgraph_node_is_reported():
    wf = basic_graph()
    sub_id = "2a4b2cc0-db37-4302-a067-da392f38f06b"
    wf["nodes"].append(node(12, sub_id, []))
    wf["definitions"] = {"subgraphs": [{"id": sub_id, "nodes": []}]}
    with pytest.raises(ValueError, match="subgraph"):
        ui_to_api(wf, OBJECT_INFO)


def test_length_mismatch_strict_and_lenient():
    wf = basic_graph()
    wf["nodes"][2]["widgets_values"] = [42, "randomize", 7]  # cfg, sampler_name, denoise missing
    with pytest.raises(ValueError, match="widgets_values has 3 entries"):
        ui_to_api(wf, OBJECT_INFO, strict=True)
    with pytest.warns(WorkflowMismatchWarning):
        api = ui_to_api(wf, OBJECT_INFO)
    assert api["3"]["inputs"]["cfg"] == 8.0 and api["3"]["inputs"]["sampler_name"] == "euler"
    assert api["3"]["inputs"]["denoise"] == 1.0


def test_api_format_input_is_refused():
    with pytest.raises(ValueError, match="API format"):
        ui_to_api({"1": {"class_type": "Loader", "inputs": {}}}, OBJECT_INFO)


def test_input_is_not_modified():
    wf = basic_graph()
    before = copy.deepcopy(wf)
    ui_to_api(wf, OBJECT_INFO)
    assert wf == before


# ---------------------------------------------------------------------------------------------------
# the example workflow, against the node contract of the pack (hand-written here, no server)

PACK_INFO = {
    "UNETLoader": {
        "input": {
            "required": {
                "unet_name": [["loralab-tiny-sd3.safetensors"]],
                "weight_dtype": [["default", "fp8_e4m3fn"]],
            }
        },
        "output": ["MODEL"],
    },
    "LoraLab_LoadLatentDataset": {
        "input": {"required": {"dataset": ["COMBO", {"options": ["loralab-tiny-dataset.safetensors"]}]}},
        "output": ["LATENT", "CONDITIONING"],
    },
    "LoraLab_TrainLoraNode": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "latents": ["LATENT"],
                "positive": ["CONDITIONING"],
                "batch_size": ["INT", {"default": 1}],
                "grad_accumulation_steps": ["INT", {"default": 1}],
                "steps": ["INT", {"default": 16}],
                "learning_rate": ["FLOAT", {"default": 0.0005}],
                "rank": ["INT", {"default": 8}],
                "optimizer": ["COMBO", {"options": ["AdamW"]}],
                "loss_function": ["COMBO", {"options": ["MSE"]}],
                "seed": ["INT", {"default": 0}],
                "training_dtype": ["COMBO", {"options": ["bf16", "fp32"]}],
                "lora_dtype": ["COMBO", {"options": ["bf16", "fp32"]}],
                "algorithm": ["COMBO", {"options": ["LoRA", "LoHa", "LoKr"]}],
                "gradient_checkpointing": ["BOOLEAN", {"default": True}],
                "existing_lora": ["COMBO", {"options": ["[None]"]}],
            },
            "optional": {"options": ["LORALAB_TRAINING_OPTIONS"]},
        },
        "output": ["MODEL", "LORA_MODEL", "LOSS_MAP", "INT"],
    },
    "LoraLab_PreviewSettings": {
        "input": {
            "required": {
                "positive": ["CONDITIONING"],
                "every_n_steps": ["INT", {"default": 100}],
                "seed": ["INT", {"default": 0}],
                "steps": ["INT", {"default": 20}],
                "cfg": ["FLOAT", {"default": 7.0}],
                "sampler_name": [["euler"]],
                "scheduler": [["simple", "normal"]],
                "width": ["INT", {"default": 512}],
                "height": ["INT", {"default": 512}],
                "lora_strength": ["FLOAT", {"default": 1.0}],
                "filename_prefix": ["STRING", {"default": "p"}],
            },
            "optional": {"negative": ["CONDITIONING"], "vae": ["VAE"]},
        },
        "output": ["LORALAB_PREVIEW"],
    },
    "LoraLab_TrainingOptions": {
        "input": {
            "required": {
                o.name: (
                    ["COMBO", {"options": list(o.choices)}]
                    if o.kind == "combo"
                    else [o.kind.upper().replace("BOOL", "BOOLEAN"), {"default": o.widget_default}]
                )
                for o in node_options("options")
            },
            "optional": {"preview": ["LORALAB_PREVIEW"], "validation": ["LORALAB_VALIDATION"]},
        },
        "output": ["LORALAB_TRAINING_OPTIONS"],
    },  # fmt: skip
    "LoraLab_PreviewImages": {"input": {"required": {"loss": ["LOSS_MAP"]}}, "output": ["IMAGE", "STRING"]},
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "output": [],
    },
    "LoraLab_SaveLora": {
        "input": {
            "required": {"lora": ["LORA_MODEL"], "filename_prefix": ["STRING", {"default": "x"}]},
            "optional": {
                "steps": ["INT", {"forceInput": True}],
                "key_format": [["comfyui", "kohya"], {"default": "comfyui"}],
            },
        },
        "output": ["STRING"],
    },
    "LoraLab_PlotLoss": {
        "input": {"required": {"loss": ["LOSS_MAP"], "filename_prefix": ["STRING", {"default": "y"}]}},
        "output": ["IMAGE"],
    },
}


@pytest.mark.parametrize("path", sorted(EXAMPLE.parent.glob("*.json")), ids=lambda p: p.stem)
def test_example_workflow_is_a_frontend_graph(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    ids = {n["id"] for n in wf["nodes"]}
    assert wf["last_node_id"] == max(ids) and wf["last_link_id"] == max(lk[0] for lk in wf["links"])
    for n in wf["nodes"]:
        for key in (
            "pos",
            "size",
            "flags",
            "order",
            "mode",
            "inputs",
            "outputs",
            "properties",
            "widgets_values",
        ):
            assert key in n, (n["id"], key)
    # every link is listed on both ends
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        s = next(n for n in wf["nodes"] if n["id"] == src)
        d = next(n for n in wf["nodes"] if n["id"] == dst)
        assert lid in (s["outputs"][sslot]["links"] or [])
        assert d["inputs"][dslot]["link"] == lid
        assert s["outputs"][sslot]["type"] == d["inputs"][dslot]["type"] == typ


def test_example_workflow_converts_to_the_expected_prompt():
    wf = json.loads(EXAMPLE.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkflowMismatchWarning)
        api = ui_to_api(wf, PACK_INFO, strict=True, include_meta=False)
    by_type = {v["class_type"]: (k, v["inputs"]) for k, v in api.items()}
    assert set(by_type) == set(PACK_INFO)  # the Note is gone
    unet, _ = by_type["UNETLoader"]
    data, _ = by_type["LoraLab_LoadLatentDataset"]
    trainer_id, trainer = by_type["LoraLab_TrainLoraNode"]
    assert trainer == {
        "model": [unet, 0],
        "latents": [data, 0],
        "positive": [data, 1],
        "batch_size": 1,
        "grad_accumulation_steps": 1,
        "steps": 40,
        "learning_rate": 0.001,
        "rank": 8,
        "optimizer": "AdamW",
        "loss_function": "MSE",
        "seed": 0,
        "training_dtype": "bf16",
        "lora_dtype": "bf16",
        "algorithm": "LoRA",
        "gradient_checkpointing": True,
        "existing_lora": "[None]",
        "options": [by_type["LoraLab_TrainingOptions"][0], 0],
    }
    previews, settings = by_type["LoraLab_PreviewSettings"]
    assert settings["positive"] == [data, 1] and settings["every_n_steps"] == 10 and settings["steps"] == 4
    assert (settings["width"], settings["height"], settings["filename_prefix"]) == (
        128,
        128,
        "loralab/tiny_sd3_previews",
    )
    options = by_type["LoraLab_TrainingOptions"][1]
    assert (
        options["preview"] == [previews, 0] and options["offload_blocks"] == -1 and options["save_every"] == 0
    )
    grid_id, grid = by_type["LoraLab_PreviewImages"]
    assert grid == {"loss": [trainer_id, 2]}
    assert by_type["SaveImage"][1] == {
        "images": [grid_id, 0],
        "filename_prefix": "loralab/tiny_sd3_preview_grid",
    }
    assert by_type["LoraLab_SaveLora"][1] == {
        "lora": [trainer_id, 1],
        "filename_prefix": "loralab/tiny_sd3",
        "steps": [trainer_id, 3],
        "key_format": "comfyui",
    }
    assert by_type["LoraLab_PlotLoss"][1] == {"loss": [trainer_id, 2], "filename_prefix": "loralab/loss"}
    assert by_type["LoraLab_LoadLatentDataset"][1] == {"dataset": "loralab-tiny-dataset.safetensors"}


def test_fill_required_defaults_adds_only_missing_required_inputs_with_a_default():
    info = {
        "Trainer": {
            "input": {
                "required": {
                    "steps": ["INT", {"default": 16}],
                    "bypass": ["BOOLEAN", {"default": False}],
                    "mode": ["COMBO", {"options": ["fast", "slow"]}],
                    "model": ["MODEL", {}],
                },
                "optional": {"extra": ["INT", {"default": 3}]},
            },
            "output": ["LORA_MODEL"],
        }
    }
    prompt = {
        "1": {"class_type": "Trainer", "inputs": {"steps": 40}},
        "2": {"class_type": "Unknown", "inputs": {}},
    }
    assert fill_required_defaults(prompt, info) is prompt
    # Set inputs keep their value; a MODEL link has no default and stays missing (the server names it).
    assert prompt["1"]["inputs"] == {"steps": 40, "bypass": False, "mode": "fast"}
    assert prompt["2"]["inputs"] == {}
