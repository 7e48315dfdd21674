"""In-process tests of the pack's ComfyUI glue (nodes/), against the checkout's real ComfyUI modules.

The pack is imported as the package ``loralab_pack`` (its relative imports need a parent package);
``loralab_pack.nodes`` is registered bare, so a test imports only the module it tests instead of
every node class and the server modules they pull in.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

from harness.server import TESTKIT_DIR

ROOT = Path(__file__).resolve().parents[2]
# LORALAB_COMFY_DIR: another ComfyUI tree (run pytest with that ComfyUI's Python too)
COMFYUI_ROOT = Path(os.environ.get("LORALAB_COMFY_DIR") or ROOT / ".comfyui" / "ComfyUI").resolve()
PACK = "loralab_pack"


@pytest.fixture(scope="session")
def comfy_glue():
    """Returns ``import_module(name)`` for ``loralab_pack.nodes.<name>``; skips without a checkout."""
    if not (COMFYUI_ROOT / "comfy" / "model_patcher.py").is_file():
        pytest.skip(f"no ComfyUI checkout at {COMFYUI_ROOT} (run scripts/setup.sh)")
    # Appended: ComfyUI's root also holds top-level `nodes` / `utils` that must not shadow this repo's.
    if str(COMFYUI_ROOT) not in sys.path:
        sys.path.append(str(COMFYUI_ROOT))
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = True  # before comfy.model_management is imported, so it never probes a GPU
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = pack
        spec.loader.exec_module(pack)
        nodes = types.ModuleType(f"{PACK}.nodes")
        nodes.__path__ = [str(ROOT / "nodes")]
        sys.modules[nodes.__name__] = nodes
    return lambda name: importlib.import_module(f"{PACK}.nodes.{name}")


@pytest.fixture(scope="session")
def graph_inputs(comfy_glue):
    """``nodes/graph_inputs.py``: LATENT and CONDITIONING into training samples."""
    return comfy_glue("graph_inputs")


@pytest.fixture(scope="session")
def model_forward(comfy_glue):
    """``nodes/model_forward.py``: the objective and the x0 prediction of a ComfyUI model."""
    return comfy_glue("model_forward")


@pytest.fixture(scope="session")
def trainable(comfy_glue):
    """``nodes/trainable.py``: grad mode, inference tensors, dtype, differentiable kernels."""
    return comfy_glue("trainable")


@pytest.fixture(scope="session")
def fast_attention(comfy_glue):
    """``nodes/attention.py``: the SDPA override of ComfyUI's slow attention."""
    return comfy_glue("attention")


@pytest.fixture(scope="session")
def families(comfy_glue):
    """``tests/comfy_testkit/families.py``: tiny models of every family (imports comfy)."""
    testkit = str(TESTKIT_DIR)
    if testkit not in sys.path:
        sys.path.insert(0, testkit)
    return importlib.import_module("families")


@pytest.fixture
def loras_dir(tmp_path, comfy_glue):
    """A temporary folder as ComfyUI's first (default) loras folder for the test."""
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    yield tmp_path
    folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    folder_paths.filename_list_cache.pop("loras", None)
