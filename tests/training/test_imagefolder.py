"""training/imagefolder.py: folder resolution, listing, captions and sizing (pure, no ComfyUI)."""

from __future__ import annotations

import os
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
    [
        ((512, 512), 512, (512, 512)),
        ((1024, 768), 512, (576, 448)),
        ((768, 1024), 1024, (896, 1152)),
        ((4000, 1000), 512, (1024, 256)),
        ((10, 10), 512, (512, 512)),
        ((5000, 10), 64, (1408, 64)),
    ],
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


# ------------------------------------------------------------------------------ issue 17: bounded work


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width x height`` in its header but holds no pixel data: opening it reads
    the header; decoding it fails. A file like this proves the size is checked before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    png_header_only(tmp_path / "huge.png", 10_000, 10_000)
    with pytest.raises(
        ValueError,
        match=r"image 'huge.png' is 10000x10000 = 100,000,000 pixels, more than the limit of 67,108,864",
    ):
        load_image_tensor(tmp_path / "huge.png", 512)
    png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # above Pillow's own bomb limit too
    with pytest.raises(ValueError, match="bomb.png.*limit"):
        load_image_tensor(tmp_path / "bomb.png", 512)


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path):
    """A 1 x 1 000 000 PNG (a few KB) at resolution 4096 would be scaled through a 64 x 64 000 000
    intermediate (~11 GiB) before the crop."""
    Image.new("RGB", (1, 1_000_000), (200, 10, 10)).save(tmp_path / "tall.png")
    assert (tmp_path / "tall.png").stat().st_size < 10_000
    with pytest.raises(
        ValueError, match=r"tall.png' is 1x1000000, an aspect ratio of 1e\+06:1, beyond the limit of 8:1"
    ):
        load_image_tensor(tmp_path / "tall.png", 4096)
    Image.new("RGB", (20_000, 1)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match="aspect ratio"):
        load_image_tensor(tmp_path / "wide.png", 512)
    # 8:1 itself is fine
    Image.new("RGB", (512, 64)).save(tmp_path / "ok.png")
    assert load_image_tensor(tmp_path / "ok.png", 64).shape == (1, 64, 192, 3)


def test_resize_intermediate_stays_within_bound():
    from training.imagefolder import MAX_RESIZE_FACTOR, _cover_size, check_image_size

    worst = 0.0
    for resolution in (64, 512, 1024, 4096):
        for w, h in [
            (512, 64),
            (64, 512),
            (8, 1),
            (3000, 375),
            (1, 1),
            (4095, 4096),
            (8191, 1024),
            (100, 13),
        ]:
            tw, th = check_image_size(w, h, resolution)
            nw, nh = _cover_size(w, h, tw, th)
            worst = max(worst, nw * nh / (tw * th))
    assert worst <= MAX_RESIZE_FACTOR
    print(f"largest intermediate / output area within the limits: {worst:.2f}")


def test_tiny_images_are_upscaled_with_a_warning(tmp_path, caplog):
    from training.imagefolder import load_folder

    _img(tmp_path / "dot.png", 1, 1)
    _img(tmp_path / "big.png", 512, 512)
    with caplog.at_level("WARNING", logger="loralab"):
        images, captions = load_folder(tmp_path, 512)
    assert [t.shape for t in images] == [(1, 512, 512, 3), (1, 512, 512, 3)]
    assert "1 of 2 images" in caplog.text and "'dot.png', 512x" in caplog.text


def test_too_many_images_are_refused_while_listing(tmp_path):
    for i in range(4):
        _img(tmp_path / f"{i}.png", 8, 8)
    assert len(list_image_captions(tmp_path, max_images=4)) == 4
    with pytest.raises(ValueError, match="^folder: .*more than 3 images, the limit"):
        list_image_captions(tmp_path, max_images=3)


def test_oversized_caption_is_refused(tmp_path):
    from training.imagefolder import MAX_CAPTION_BYTES

    _img(tmp_path / "a.png", 8, 8)
    (tmp_path / "a.txt").write_bytes(b"x" * MAX_CAPTION_BYTES)
    assert len(list_image_captions(tmp_path)[0].caption) == MAX_CAPTION_BYTES
    (tmp_path / "a.txt").write_bytes(b"x" * (MAX_CAPTION_BYTES + 1))
    with pytest.raises(
        ValueError, match=r"^folder: caption file 'a.txt' has 65537 bytes, more than the limit of 65536"
    ):
        list_image_captions(tmp_path)


def test_symlinked_images_and_captions_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("private text")
    _img(outside / "o.png", 8, 8)
    folder = tmp_path / "in"
    folder.mkdir()
    _img(folder / "a.png", 8, 8)
    (folder / "a.txt").symlink_to(secret)
    with pytest.raises(ValueError, match="^folder: caption file 'a.txt' is a symbolic link") as info:
        list_image_captions(folder)
    assert "private" not in str(info.value)
    (folder / "a.txt").unlink()
    (folder / "b.png").symlink_to(outside / "o.png")
    with pytest.raises(ValueError, match="^folder: image 'b.png' is a symbolic link"):
        list_image_captions(folder)
    with pytest.raises(ValueError, match="symbolic link"):  # the loader itself refuses links too
        load_image_tensor(folder / "b.png", 64)


def test_fifos_are_refused_without_blocking(tmp_path):
    _img(tmp_path / "a.png", 8, 8)
    os.mkfifo(tmp_path / "a.txt")
    with pytest.raises(ValueError, match="caption file 'a.txt' is not a regular file"):
        list_image_captions(tmp_path)
    os.unlink(tmp_path / "a.txt")
    os.mkfifo(tmp_path / "b.png")
    with pytest.raises(ValueError, match="image 'b.png' is not a regular file"):
        list_image_captions(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        load_image_tensor(tmp_path / "b.png", 64)


def test_loading_checks_for_an_interrupt_before_each_file(tmp_path):
    from training.imagefolder import load_folder

    for i in range(3):
        _img(tmp_path / f"{i}.png", 8, 8)
    calls = []

    class Interrupted(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 5:  # 3 captions, then the first two images
            raise Interrupted

    with pytest.raises(Interrupted):
        load_folder(tmp_path, 64, check_interrupt=check)
    assert len(calls) == 5


def test_only_the_four_formats_are_decoded(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", format="TIFF")  # a TIFF named .png
    with pytest.raises(ValueError, match="not a PNG, JPEG, WebP or BMP image"):
        load_image_tensor(tmp_path / "x.png", 64)


def test_resolve_folder_edges(tmp_path):
    """A bare drive letter is absolute; '..' is refused by name even where it would stay inside;
    spaces belong to the name."""
    with pytest.raises(ValueError, match="absolute path"):
        resolve_folder(tmp_path, "C:")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        resolve_folder(tmp_path, "a/../a")
    assert resolve_folder(tmp_path, " my images/set 1 ") == tmp_path.resolve() / "my images" / "set 1"


def test_load_folder_defaults_read_txt_captions_and_name_the_folder_input(tmp_path):
    from training.imagefolder import load_folder

    _img(tmp_path / "a.png", 64, 64)
    (tmp_path / "a.txt").write_text("a red cube")
    _img(tmp_path / "b.png", 64, 64)  # no caption: the default, empty
    images, captions = load_folder(tmp_path, 64)
    assert captions == ["a red cube", ""] and [tuple(i.shape) for i in images] == [(1, 64, 64, 3)] * 2
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="^folder: image 'c.png'"):
        load_folder(tmp_path, 64)


def test_upscale_warning_names_the_folder_input_and_the_most_upscaled_image(tmp_path, caplog):
    from training.imagefolder import load_folder

    _img(tmp_path / "a.png", 200, 200)  # 2.56x: blurred
    _img(tmp_path / "b.png", 64, 64)  # 8x: the worst
    _img(tmp_path / "c.png", 256, 256)  # exactly 2x: at the limit, not warned about
    with caplog.at_level("WARNING", logger="loralab"):
        load_folder(tmp_path, 512, name="dataset_folder")
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "LoRA Lab: dataset_folder: 2 of 3 images are smaller than resolution 512 and scaled up more than 2x "
        "per side (most: 'b.png', 8x)"
    ), record.getMessage()


def test_captions_that_are_not_utf8_are_read_with_replacement_characters(tmp_path):
    _img(tmp_path / "a.png", 64, 64)
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait \n")  # Latin-1, as old Windows editors save
    assert [i.caption for i in list_image_captions(tmp_path, ".txt", "")] == ["caf\ufffd au lait"]


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0)])
def test_empty_image_sizes_are_refused(size):
    from training.imagefolder import check_image_size

    with pytest.raises(ValueError, match="empty"):
        bucket_size(*size, 512)
    with pytest.raises(ValueError):
        check_image_size(*size, 512)
