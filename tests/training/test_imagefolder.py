"""training/imagefolder.py: folder resolution, listing, captions and sizing (pure, no ComfyUI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.imagefolder import bucket_size, list_image_captions, load_image_tensor, resolve_folder


def _img(path: Path, w: int, h: int, color=(10, 20, 30), mode="RGB") -> Path:
    Image.new(mode, (w, h), color if mode == "RGB" else color + (128,)).save(path)
    return path


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs/path", "C:/x", "C:\\x", "..", ""])
def test_resolve_folder_refuses_leaving_root(tmp_path, bad):
    with pytest.raises(ValueError, match="^folder"):
        resolve_folder(tmp_path, bad)


def test_resolve_folder_refuses_symlink_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "input"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        resolve_folder(root, "link")


def test_resolve_folder_accepts_subfolders(tmp_path):
    assert resolve_folder(tmp_path, "a/b") == tmp_path.resolve() / "a" / "b"
    assert resolve_folder(tmp_path, "a\\b/./") == tmp_path.resolve() / "a" / "b"
    assert resolve_folder(tmp_path, "x", name="dir") == tmp_path.resolve() / "x"
    with pytest.raises(ValueError, match="^dir"):
        resolve_folder(tmp_path, "../y", name="dir")


def test_list_sorted_with_captions_and_default(tmp_path):
    _img(tmp_path / "b.jpg", 8, 8)
    _img(tmp_path / "a.png", 8, 8)
    _img(tmp_path / "c.WEBP", 8, 8)
    _img(tmp_path / "d.bmp", 8, 8)
    (tmp_path / "a.txt").write_text("  caption a \n")
    (tmp_path / "c.txt").write_text("caption c")
    (tmp_path / "d.caption").write_text("caption d")
    (tmp_path / "readme.txt").write_text("no image")
    (tmp_path / "sub").mkdir()
    _img(tmp_path / "sub" / "e.png", 8, 8)
    items = list_image_captions(tmp_path, ".txt", "default")
    assert [i.path.name for i in items] == ["a.png", "b.jpg", "c.WEBP", "d.bmp"]
    assert [i.caption for i in items] == ["caption a", "default", "caption c", "default"]
    # another extension, given with or without the dot
    for ext in (".caption", "caption"):
        items = list_image_captions(tmp_path, ext, "dflt")
        assert [i.caption for i in items] == ["dflt", "dflt", "dflt", "caption d"]
    # no extension: every image gets the default
    assert {i.caption for i in list_image_captions(tmp_path, "", "z")} == {"z"}


def test_missing_and_empty_folders_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="^folder: .*not a folder"):
        list_image_captions(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="^folder: .*no images"):
        list_image_captions(tmp_path)


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [((512, 512), 512, (512, 512)), ((1024, 768), 512, (576, 448)), ((768, 1024), 1024, (896, 1152)),
     ((4000, 1000), 512, (1024, 256)), ((10, 10), 512, (512, 512)), ((5000, 10), 64, (1408, 64))],
)
def test_bucket_size(size, resolution, expected):
    w, h = bucket_size(*size, resolution)
    assert (w, h) == expected
    assert w % 64 == 0 and h % 64 == 0


def test_bucket_size_keeps_area_close():
    for w, h in [(640, 480), (1920, 1080), (333, 777), (1000, 1500)]:
        bw, bh = bucket_size(w, h, 1024)
        assert abs(bw * bh / 1024**2 - 1) < 0.15
        assert abs(bw / bh - w / h) / (w / h) < 0.2


def test_load_image_tensor_shape_range_and_center_crop(tmp_path):
    # left third red, middle third green, right third blue: a 3:1 image at resolution 64 -> a 128x64 bucket
    # (2:1 after rounding); the center crop cuts the red and blue sides and keeps the green middle
    arr = np.zeros((60, 180, 3), dtype=np.uint8)
    arr[:, :60, 0] = 255
    arr[:, 60:120, 1] = 255
    arr[:, 120:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "x.png")
    t = load_image_tensor(tmp_path / "x.png", 64)
    assert t.shape == (1, 64, 128, 3) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert float(t[0, 32, 64, 1]) > 0.9 and float(t[0, 32, 64, 0]) < 0.1


def test_load_image_tensor_converts_modes(tmp_path):
    rgba = _img(tmp_path / "a.png", 100, 50, mode="RGBA")
    t = load_image_tensor(rgba, 128)
    assert t.shape == (1, 64, 192, 3)
    gray = tmp_path / "g.png"
    Image.new("L", (64, 64), 128).save(gray)
    t = load_image_tensor(gray, 64)
    assert t.shape == (1, 64, 64, 3)
    assert torch.allclose(t, torch.full_like(t, 128 / 255), atol=1e-6)
