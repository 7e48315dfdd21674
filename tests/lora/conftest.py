"""Fixtures for the adapter tests: layer cases, parameter randomisation and a stock-ComfyUI import."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

COMFYUI_ROOT = Path(__file__).resolve().parents[2] / ".comfyui" / "ComfyUI"


def _randomise(module: torch.nn.Module, seed: int = 1234, std: float = 0.5) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std²) noise so ΔW != 0 (fresh adapters have ΔW == 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            param.copy_(noise.to(param.dtype))
    return module


@pytest.fixture
def randomise() -> Callable[..., torch.nn.Module]:
    return _randomise


@pytest.fixture(scope="session")
def comfy_lora() -> ModuleType:
    """Stock ComfyUI's ``comfy.lora`` (the loader + ``calculate_weight``), CPU-only; skips without a checkout."""
    if not (COMFYUI_ROOT / "comfy" / "lora.py").is_file():
        pytest.skip(f"no ComfyUI checkout at {COMFYUI_ROOT} (run scripts/setup.sh)")
    # Appended, not prepended: ComfyUI's root also holds top-level names such as `nodes` and `utils`
    # that must not shadow this repo's packages for the rest of the session.
    if str(COMFYUI_ROOT) not in sys.path:
        sys.path.append(str(COMFYUI_ROOT))
    cli_args = importlib.import_module("comfy.cli_args")
    if not Path(cli_args.__file__).resolve().is_relative_to(COMFYUI_ROOT):
        pytest.skip(f"`comfy` resolves to {cli_args.__file__}, not the checkout at {COMFYUI_ROOT}")
    cli_args.args.cpu = True  # before comfy.model_management is imported, so it never probes a GPU
    return importlib.import_module("comfy.lora")


# Adapter variants exercised everywhere: (algorithm name, rank). LoKr at rank 4 keeps w2 full on the
# test layers; at rank 1 it is low-rank (w2_a @ w2_b).
VARIANTS = {
    "LoRA": ("LoRA", 4),
    "LoHa": ("LoHa", 4),
    "LoKr-full": ("LoKr", 4),
    "LoKr-lowrank": ("LoKr", 1),
}


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, int]:
    """``(algorithm name, rank)``."""
    return VARIANTS[request.param]
