"""Unit tests of the main job's helpers (scripts/main.py) that need no server."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from harness.client import RunResult

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def main_mod():
    spec = importlib.util.spec_from_file_location("loralab_main_job", ROOT / "scripts" / "main.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_format_step(main_mod):
    data = {"node": "3", "step": 3, "total": 40, "loss": 0.81234, "lr": 0.001, "steps_per_s": 12.34}
    assert main_mod.format_step(data) == "step 3/40 loss 0.8123 lr 1.0e-03 12.3 it/s"
    assert main_mod.format_step({"step": 1, "total": 2}) == "step 1/2"


def test_output_paths(main_mod, tmp_path):
    result = RunResult(
        "p",
        "success",
        {
            "4": {"loras": [{"filename": "loralab/tiny_sd3_40_steps_00001.safetensors", "type": "loras"}]},
            "5": {"images": [{"filename": "loss_00001_.png", "subfolder": "loralab", "type": "output"}]},
            "6": {"loras": [{"filename": "x.safetensors", "path": "/abs/x.safetensors"}]},
        },
        None,
    )
    loras, images = main_mod.output_paths(result, tmp_path)
    assert loras == [
        tmp_path / "models" / "loras" / "loralab" / "tiny_sd3_40_steps_00001.safetensors",
        pathlib.Path("/abs/x.safetensors"),
    ]
    assert images == [tmp_path / "output" / "loralab" / "loss_00001_.png"]


def test_progress_printer_prefers_the_pack_event(main_mod, capsys):
    prompt = {"3": {"class_type": "LoraLab_TrainLoraNode", "inputs": {}, "_meta": {"title": "Train"}}}
    printer = main_mod.ProgressPrinter(prompt)
    printer("executing", {"node": "3", "prompt_id": "p"})
    printer("progress", {"node": "3", "value": 1, "max": 2, "prompt_id": "p"})
    printer(
        "loralab.progress", {"node": "3", "step": 1, "total": 2, "loss": 1.0, "lr": 1e-3, "steps_per_s": 5.0}
    )
    printer("progress", {"node": "3", "value": 2, "max": 2, "prompt_id": "p"})  # muted now
    printer(
        "loralab.progress", {"node": "3", "step": 2, "total": 2, "loss": 0.5, "lr": 1e-3, "steps_per_s": 6.0}
    )
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "running node 3 (Train)",
        "  node 3 (Train): 1/2",
        "  step 1/2 loss 1.0000 lr 1.0e-03 5.0 it/s",
        "  step 2/2 loss 0.5000 lr 1.0e-03 6.0 it/s",
    ]
    assert printer.steps_per_s() == 6.0


def test_args(main_mod):
    args = main_mod.parse_args(["--steps", "7", "--keep-server"])
    assert args.steps == 7 and args.keep_server and args.workflow == main_mod.DEFAULT_WORKFLOW
    with pytest.raises(SystemExit):
        main_mod.parse_args(["--steps", "0"])
