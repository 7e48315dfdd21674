"""LoraLab_LoadLatentDataset in-process (issue 17): the path checks at execute time, which a name that
arrives through a link meets without /prompt validation (a server cannot stage that with stock nodes:
no stock node outputs this combo's type)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors.torch import save_file

SECRET_KEY = "private_model_weight_name"


@pytest.fixture
def data_node(comfy_glue, tmp_path, monkeypatch):
    module = comfy_glue("data")
    import folder_paths

    root = tmp_path / "input"
    root.mkdir()
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({SECRET_KEY: torch.zeros(2)}, str(outside / "secret.safetensors"))
    save_file(
        {"latents": torch.zeros(2, 4, 8, 8), "context": torch.zeros(2, 3, 16)}, str(root / "good.safetensors")
    )
    save_file({"something": torch.zeros(1)}, str(root / "keys.safetensors"))
    (root / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "sub").mkdir()
    (root / "sub" / "inner_link.safetensors").symlink_to(
        root / "good.safetensors"
    )  # a link that stays inside
    os.mkfifo(root / "fifo.safetensors")
    (root / "dir.safetensors").mkdir()
    return module, root, outside


def _outside_names(root, outside) -> dict[str, str]:
    return {
        "absolute_existing": str(outside / "secret.safetensors"),
        "absolute_missing": str(outside / "missing.safetensors"),
        "relative_existing": os.path.relpath(outside / "secret.safetensors", root),
        "relative_missing": os.path.relpath(outside / "missing.safetensors", root),
        "link_out": "link.safetensors",
        "fifo": "fifo.safetensors",
        "folder": "dir.safetensors",
        "input_itself": ".",
        "nul": "a\0b",
    }


def test_list_holds_only_regular_files_inside_input(data_node):
    module, _, _ = data_node
    assert module._dataset_files() == ["good.safetensors", "keys.safetensors", "sub/inner_link.safetensors"]


def test_execute_refuses_every_name_outside_input_alike_without_opening(data_node):
    module, root, outside = data_node
    node = module.LoadLatentDataset
    messages = {}
    # A reader that opened the FIFO would block; a writer releases it after a while, so a regression
    # fails here instead of hanging the test run.
    stop = threading.Event()

    def release() -> None:
        while not stop.wait(0.5):
            try:
                os.close(os.open(root / "fifo.safetensors", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=release, daemon=True).start()
    try:
        for case, name in _outside_names(root, outside).items():
            assert node.validate_inputs(name) == module._not_a_dataset(name), case
            with pytest.raises(ValueError) as info:
                node.execute(name)
            messages[case] = str(info.value).replace(repr(name[:200]), "<NAME>")
    finally:
        stop.set()
    assert len(set(messages.values())) == 1, messages
    assert SECRET_KEY not in "".join(messages.values())
    print(next(iter(messages.values())))


def test_execute_loads_files_inside_input_and_names_their_keys(data_node):
    module, _, _ = data_node
    node = module.LoadLatentDataset
    assert node.validate_inputs("good.safetensors") is True and node.validate_inputs(None) is True
    out = node.execute("good.safetensors")
    assert out.result[0]["samples"].shape == (2, 4, 8, 8)
    assert node.execute("sub/inner_link.safetensors").result[0]["samples"].shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"has no 'latents' tensor \(keys: \['something'\]\)"):
        node.execute("keys.safetensors")
