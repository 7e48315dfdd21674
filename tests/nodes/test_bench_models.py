"""The generated models the benchmarks train: ComfyUI's own detection must read them as the families
they stand for, with the published parameter counts (shapes only: meta tensors, nothing allocated)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_models(comfy_glue):
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tiny_models

    return make_tiny_models


@pytest.mark.parametrize(
    "arch,family,params", [("sd15", "SD15", 859_520_964), ("sdxl", "SDXL", 2_567_463_684)]
)
def test_full_size_unets_are_detected_as_their_family(tiny_models, arch, family, params):
    import comfy.model_detection

    sd = tiny_models.unet_meta_state_dict(arch)
    assert sum(t.numel() for t in sd.values()) == params
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config).__name__ == family
    detected = comfy.model_detection.detect_unet_config(sd, "")
    built = tiny_models.UNET_ARCHS[arch]
    assert {k: detected[k] for k in built if k in detected} == {
        k: v for k, v in built.items() if k in detected
    }


@pytest.mark.parametrize("arch,depth,family", [("sd15mini", 2, "SD15"), ("sd3", 4, "SD3")])
def test_benchmark_writes_the_model_it_names(tiny_models, tmp_path, arch, depth, family):
    import comfy.model_detection
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_builtin

    (tmp_path / "models" / "diffusion_models").mkdir(parents=True)
    name = compare_builtin.write_model(tmp_path, arch, depth)
    sd = load_file(str(tmp_path / "models" / "diffusion_models" / name))
    assert type(comfy.model_detection.model_config_from_unet(sd, "")).__name__ == family
    if arch == "sd3":
        assert sum(k.endswith("x_block.attn.qkv.weight") for k in sd) == depth
