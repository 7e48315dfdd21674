"""training/lorafile.py, file_names.py, lora_metadata.py, safe_write.py: safetensors I/O, refusals, names, metadata (pure, no ComfyUI)."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from training import file_names, lora_metadata, lorafile, safe_write
from training.file_names import earlier_steps, next_free_path, safe_prefix
from training.lora_metadata import build_metadata
from training.lorafile import LoraStateDict, read_lora_file, save_lora_file


def _sd() -> LoraStateDict:
    g = torch.Generator().manual_seed(0)
    return LoraStateDict(
        {
            "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight": torch.randn(
                4, 64, generator=g
            ),
            "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight": torch.randn(
                192, 4, generator=g
            ),
            "diffusion_model.joint_blocks.0.x_block.attn.qkv.alpha": torch.tensor(4.0),
        },
        metadata={"loralab.steps": "12", "modelspec.title": "test"},
    )


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------- LoraStateDict


def test_lora_state_dict_is_a_plain_dict_with_metadata(tmp_path):
    sd = _sd()
    assert isinstance(sd, dict)
    assert sd.metadata["loralab.steps"] == "12"
    assert LoraStateDict({"a": torch.zeros(1)}).metadata == {}
    copy = sd.copy()
    assert isinstance(copy, LoraStateDict) and copy.metadata == sd.metadata and copy.keys() == sd.keys()
    # what ComfyUI's stock SaveLoRA does with a LORA_MODEL
    safetensors.torch.save_file(sd, str(tmp_path / "stock.safetensors"))
    loaded = safetensors.torch.load_file(str(tmp_path / "stock.safetensors"))
    assert loaded.keys() == sd.keys()


# ------------------------------------------------------------------------------------------- saving


def test_round_trip_with_metadata(tmp_path):
    sd = _sd()
    meta = {"loralab.steps": "12", "ss_network_dim": "4", "note": "ünïcode ok"}
    path = save_lora_file(sd, tmp_path / "sub" / "a.safetensors", metadata=meta)
    assert path == (tmp_path / "sub" / "a.safetensors").absolute()
    tensors, metadata = read_lora_file(path)
    assert metadata == meta
    assert tensors.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(tensors[key], value)
    assert _listing(tmp_path / "sub") == ["a.safetensors"]


def test_save_handles_shared_storage_views_and_non_contiguous(tmp_path):
    base = torch.randn(8, 8)
    sd = {"a.lora_down.weight": base[:4], "a.lora_up.weight": base[4:].t()}
    path = save_lora_file(sd, tmp_path / "v.safetensors")
    tensors, _ = read_lora_file(path)
    assert torch.equal(tensors["a.lora_down.weight"], base[:4])
    assert torch.equal(tensors["a.lora_up.weight"], base[4:].t())


def test_never_overwrites_unless_asked(tmp_path):
    target = tmp_path / "x.safetensors"
    save_lora_file({"k": torch.ones(2)}, target)
    with pytest.raises(FileExistsError) as info:
        save_lora_file({"k": torch.zeros(2)}, target)
    assert str(target) in str(info.value)
    assert torch.equal(read_lora_file(target)[0]["k"], torch.ones(2))
    save_lora_file({"k": torch.zeros(2)}, target, overwrite=True)
    assert torch.equal(read_lora_file(target)[0]["k"], torch.zeros(2))
    assert _listing(tmp_path) == ["x.safetensors"]


def test_file_appearing_during_write_is_not_clobbered(tmp_path, monkeypatch):
    target = tmp_path / "race.safetensors"
    real_save = safetensors.torch.save_file

    def save_and_race(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        target.write_bytes(b"someone else's file")

    monkeypatch.setattr(safetensors.torch, "save_file", save_and_race)
    with pytest.raises(FileExistsError):
        save_lora_file({"k": torch.ones(2)}, target)
    assert target.read_bytes() == b"someone else's file"
    assert _listing(tmp_path) == ["race.safetensors"]


@pytest.mark.parametrize("where", ["save_file", "fsync", "publish"])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, where):
    # Tests run as root, where chmod does not block writes: make the write fail on purpose instead.
    target = tmp_path / "fail.safetensors"
    real_save = safetensors.torch.save_file

    def failing_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    if where == "save_file":
        monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    elif where == "fsync":
        monkeypatch.setattr(lorafile.os, "fsync", failing)
    else:
        monkeypatch.setattr(safe_write, "publish", failing)
    with pytest.raises(OSError) as info:
        save_lora_file(_sd(), target)
    assert str(target) in str(info.value)
    assert "writable" in str(info.value)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_safetensors_io_error_names_the_file(tmp_path, monkeypatch, code):
    # safetensors reports a full disk or a read-only folder as its own SafetensorError (not an
    # OSError), after it has removed its partial output: the caller still gets an OSError naming the
    # file and the cause, and nothing is left behind.
    from safetensors import SafetensorError

    def failing_save(tensors, filename, metadata=None):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    target = tmp_path / "full.safetensors"
    with pytest.raises(OSError) as info:
        save_lora_file(_sd(), target)
    assert info.value.errno == code
    assert str(target) in str(info.value) and os.strerror(code) in str(info.value)
    assert _listing(tmp_path) == []


def test_other_safetensors_errors_pass_through(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def failing_save(tensors, filename, metadata=None):
        raise SafetensorError("some other problem")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(SafetensorError):
        save_lora_file(_sd(), tmp_path / "x.safetensors")
    assert _listing(tmp_path) == []


def test_interrupt_during_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_lora_file(_sd(), tmp_path / "i.safetensors")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_weights_refused(tmp_path, bad, dtype):
    sd = {"ok.weight": torch.ones(3, dtype=dtype), "bad.weight": torch.tensor([1.0, bad], dtype=dtype)}
    with pytest.raises(ValueError, match="'bad.weight'") as info:
        save_lora_file(sd, tmp_path / "n.safetensors")
    assert "n.safetensors" in str(info.value)
    assert _listing(tmp_path) == []


def test_metadata_values_must_be_str(tmp_path):
    with pytest.raises(TypeError, match="ss_steps"):
        save_lora_file({"k": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"ss_steps": 10})
    assert _listing(tmp_path) == []


def test_save_refuses_other_suffixes_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_lora_file({"k": torch.ones(1)}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="empty"):
        save_lora_file({}, tmp_path / "e.safetensors")
    with pytest.raises(TypeError):
        save_lora_file({"k": [1.0]}, tmp_path / "l.safetensors")
    assert _listing(tmp_path) == []


# ------------------------------------------------------------------------------------------ reading


class _Booby:
    """Unpickling this creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pth", ".pkl"])
def test_pickle_files_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"weights": _Booby(marker)}))
    assert not marker.exists()
    with pytest.raises(ValueError) as info:
        read_lora_file(path)
    text = str(info.value)
    assert "pickle" in text and "never unpickle" in text and "safetensors" in text and str(path) in text
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "disguised.safetensors"
    path.write_bytes(pickle.dumps(_Booby(marker)))
    with pytest.raises(ValueError, match="disguised.safetensors"):
        read_lora_file(path)
    assert not marker.exists()


def test_other_suffix_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="only .safetensors"):
        read_lora_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_lora_file(tmp_path / "nope.safetensors")


def _good_bytes(tmp_path) -> bytes:
    path = save_lora_file(_sd(), tmp_path / "good.safetensors", metadata={"a": "b"})
    data = path.read_bytes()
    path.unlink()
    return data


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize(
    "name,make,expect",
    [
        ("empty", lambda good: b"", "empty"),
        ("tiny", lambda good: b"\x01\x02\x03", "truncated"),
        ("cut_in_header", lambda good: good[:20], "truncated"),
        ("cut_in_data", lambda good: good[:-5], "truncated"),
        ("garbage", lambda good: os.urandom(4096), "not a safetensors file"),
        ("text", lambda good: b"hello, this is not a model file at all" * 10, "not a safetensors file"),
        ("bad_json", lambda good: struct.pack("<Q", 8) + b"{notjson", "not JSON"),
        ("json_list", lambda good: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        ("trailing_bytes", lambda good: good + b"\x00" * 16, "could not be read as safetensors"),
    ],
)
def test_broken_files_give_value_error_naming_the_file(tmp_path, name, make, expect):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(make(_good_bytes(tmp_path)))
    with pytest.raises(ValueError) as info:
        read_lora_file(path)
    assert str(path) in str(info.value)
    assert expect in str(info.value)


def test_header_offsets_beyond_file(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(ValueError, match="truncated"):
        read_lora_file(path)


# ------------------------------------------------------------------------------------ earlier_steps


@pytest.mark.parametrize(
    "metadata,filename,expected",
    [
        (
            {"loralab.steps": "300", "ss_steps": "200", "steps": "100"},
            "x_5_steps_00001_.safetensors",
            (300, "metadata"),
        ),
        ({"ss_steps": "200", "steps": "100"}, None, (200, "metadata")),
        ({"steps": "100"}, None, (100, "metadata")),
        ({"loralab.steps": "250.0"}, None, (250, "metadata")),
        ({"loralab.steps": "junk", "ss_steps": "40"}, None, (40, "metadata")),
        ({"loralab.steps": "-3"}, "a_7_steps_00002_.safetensors", (7, "filename")),
        ({}, "ComfyUI_trained_lora_120_steps_00003_.safetensors", (120, "filename")),
        (None, "loralab/my_lora_50_steps_00002.safetensors", (50, "filename")),
        ({}, "sub/dir/run_1_steps_00001_.safetensors", (1, "filename")),
        ({}, "old_style_30steps_00004.safetensors", (30, "filename")),
        ({}, "twice_10_steps_00001__25_steps_00002_.safetensors", (25, "filename")),
        ({}, "my_lora_00007.safetensors", (0, "none")),
        ({}, "manysteps.safetensors", (0, "none")),
        ({}, None, (0, "none")),
        ({"other": "1"}, "", (0, "none")),
    ],
)
def test_earlier_steps(metadata, filename, expected):
    assert earlier_steps(metadata, filename) == expected


def test_earlier_steps_accepts_paths():
    assert earlier_steps({}, Path("/a/b/x_9_steps_00001_.safetensors")) == (9, "filename")


# ----------------------------------------------------------------------------------- next_free_path


def test_next_free_path_scheme(tmp_path):
    assert next_free_path(tmp_path, "my_lora", None) == tmp_path / "my_lora_00001.safetensors"
    assert next_free_path(tmp_path, "my_lora", 100) == tmp_path / "my_lora_100_steps_00001.safetensors"
    assert (
        next_free_path(tmp_path / "missing", "x", 3) == tmp_path / "missing" / "x_3_steps_00001.safetensors"
    )


def test_next_free_path_counts_across_step_counts_and_builtin_names(tmp_path):
    for name in [
        "my_lora_100_steps_00001.safetensors",
        "my_lora_00002.safetensors",
        "my_lora_50_steps_00007_.safetensors",  # ComfyUI's built-in SaveLoRA style
        "my_lora_extra_00099.safetensors",  # another prefix
        "other_00050.safetensors",
        "my_lora_00040.png",  # other extension
        "my_lora_300_steps_00012.safetensors.tmp-123",  # unfinished write
    ]:
        (tmp_path / name).write_bytes(b"x")
    assert next_free_path(tmp_path, "my_lora", 200).name == "my_lora_200_steps_00008.safetensors"
    assert next_free_path(tmp_path, "my_lora", None).name == "my_lora_00008.safetensors"
    assert next_free_path(tmp_path, "my_lora", 0).name == "my_lora_0_steps_00008.safetensors"
    assert next_free_path(tmp_path, "my_lora_extra", 1).name == "my_lora_extra_1_steps_00100.safetensors"


def test_next_free_path_never_reuses(tmp_path):
    seen = set()
    for i in range(12):
        path = next_free_path(tmp_path, "run", [None, 10, 20][i % 3])
        assert not path.exists() and path not in seen
        save_lora_file({"k": torch.ones(1)}, path)
        seen.add(path)
    counters = sorted(int(p.stem.rsplit("_", 1)[1]) for p in seen)
    assert counters == list(range(1, 13))


def test_next_free_path_counts_anything_in_the_way(tmp_path):
    (tmp_path / "p_00001.safetensors").mkdir()  # not a file, still taken
    assert next_free_path(tmp_path, "p", None).name == "p_00002.safetensors"


def test_next_free_path_wants_a_plain_prefix(tmp_path):
    with pytest.raises(ValueError):
        next_free_path(tmp_path, "a/b", None)
    with pytest.raises(ValueError):
        next_free_path(tmp_path, "", None)
    with pytest.raises(ValueError):
        next_free_path(tmp_path, "a", -1)


# -------------------------------------------------------------------------------------- safe_prefix


@pytest.mark.parametrize(
    "prefix,expected",
    [
        ("loralab/my_lora", "loralab/my_lora"),
        ("my lora-v1.2", "my lora-v1.2"),
        ("loralab\\win\\name", "loralab/win/name"),
        ("a/b:c*d?e", "a/b_c_d_e"),
        ('<x>|"y"', "_x___y_"),
        (".hidden/..dots/.x", "hidden/dots/x"),
        ("a//b/./c", "a/b/c"),
        ("  spaced / name  ", "spaced/name"),
        ("caf\u00e9/\u65e5\u672c", "caf_/__"),
        ("con", "_con"),
        ("loras/NUL.txt", "loras/_NUL.txt"),
        ("%date%/x", "_date_/x"),
    ],
)
def test_safe_prefix_cleans(prefix, expected):
    assert safe_prefix(prefix) == expected


@pytest.mark.parametrize(
    "prefix,hint",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share\\x", "absolute"),
        ("C:/Users/x", "drive letter"),
        ("c:x", "drive letter"),
        ("../escape", ".."),
        ("a/../../b", ".."),
        ("a\\..\\b", ".."),
        ("loralab/", "file name"),
        ("a/.../b", "dots"),
        ("./.", "no usable name"),
        ("x" * 200, "longer"),
    ],
)
def test_safe_prefix_refuses(prefix, hint):
    with pytest.raises(ValueError) as info:
        safe_prefix(prefix)
    assert "filename_prefix" in str(info.value)
    assert hint in str(info.value)


def test_safe_prefix_refuses_non_text():
    with pytest.raises(ValueError, match="filename_prefix"):
        safe_prefix(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- build_metadata


def test_build_metadata_lora():
    md = build_metadata(
        steps=500,
        algorithm="lora",
        rank=8,
        alpha=4.0,
        seed=42,
        optimizer="AdamW",
        learning_rate=1e-4,
        loss=0.0123,
        training_dtype="bf16",
        lora_dtype="fp32",
        model_family="SD15",
        dataset_size=20,
        pack_version="0.1.0",
        date=dt.datetime(2025, 3, 1, 12, 30, 5, 123, tzinfo=dt.timezone.utc),
    )
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["loralab.steps"] == md["ss_steps"] == "500"
    assert md["loralab.algorithm"] == "lora"
    assert md["ss_network_module"] == "networks.lora"
    assert "ss_network_args" not in md
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4"
    assert md["ss_learning_rate"] == "0.0001" and md["loralab.learning_rate"] == "0.0001"
    assert md["ss_seed"] == "42" and md["loralab.final_loss"] == "0.0123"
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["ss_v2"] == "False"
    assert md["modelspec.implementation"]
    assert md["modelspec.title"]
    assert md["modelspec.date"] == "2025-03-01T12:30:05+00:00"
    assert dt.datetime.fromisoformat(md["modelspec.date"])
    assert md["loralab.version"] == "0.1.0" and md["loralab.dataset_size"] == "20"


@pytest.mark.parametrize(
    "family,prediction,arch,v2,spec_prediction",
    [
        ("SD15", "eps", "stable-diffusion-v1", "False", "epsilon"),
        ("SD20", "eps", "stable-diffusion-v2-512", "True", "epsilon"),
        ("SD20", "v", "stable-diffusion-v2-768-v", "True", "v"),
        ("SDXL", "eps", "stable-diffusion-xl-v1-base", "False", "epsilon"),
        ("Flux", "flow", "flux-1-dev", "False", "flow"),
        ("CosmosT2IPredict2", "raw", "cosmost2ipredict2", "False", None),
    ],
)
def test_build_metadata_tells_sd2_v_prediction_and_resolution_as_a1111_and_kohya_read_them(
    family, prediction, arch, v2, spec_prediction
):
    md = build_metadata(steps=5, model_family=family, prediction_type=prediction, resolution="768x512")
    assert md["ss_v2"] == v2  # A1111 / Forge decide SD2 from this
    assert md["modelspec.architecture"] == f"{arch}/lora"
    assert md["modelspec.sai_model_spec"] == "1.0.1" and md["modelspec.resolution"] == "768x512"
    assert md.get("modelspec.prediction_type") == spec_prediction


@pytest.mark.parametrize("algo", ["loha", "lokr", "LoKr"])
def test_build_metadata_lycoris(algo):
    md = build_metadata(steps=10, algorithm=algo, rank=4, alpha=1, model_family="sdxl")
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == {"algo": algo.lower()}
    assert md["modelspec.architecture"] == f"stable-diffusion-xl-v1-base/{algo.lower()}"
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize(("algo", "args"), [("OFT", {"algo": "diag-oft"}),
                                            ("DoRA", {"algo": "lora", "dora_wd": True, "wd_on_out": False})])  # fmt: skip
def test_build_metadata_names_oft_and_dora_as_lycoris_does(algo, args):
    md = build_metadata(steps=10, algorithm=algo, rank=4, alpha=0, model_family="sdxl")
    assert md["ss_network_module"] == "lycoris.kohya" and json.loads(md["ss_network_args"]) == args


def test_build_metadata_leaves_out_unknowns_and_adds_extra():
    md = build_metadata(steps=3, extra={"loralab.note": "hi", "loralab.n": 5})
    assert "ss_seed" not in md and "loralab.rank" not in md and "modelspec.resolution" not in md
    assert md["loralab.note"] == "hi" and md["loralab.n"] == "5"
    assert md["ss_base_model_version"] == "unknown"
    assert md["modelspec.date"]  # now, with a time zone
    assert dt.datetime.fromisoformat(md["modelspec.date"]).tzinfo is not None


@pytest.mark.parametrize(
    "family,arch,version",
    [
        ("SD15", "stable-diffusion-v1", "sd_v1"),
        ("sd1.5", "stable-diffusion-v1", "sd_v1"),
        ("SD20", "stable-diffusion-v2-512", "sd_v2"),
        ("SD21UnclipL", "stable-diffusion-v2-512", "sd_v2"),
        ("SDXL", "stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
        ("SDXLRefiner", "stable-diffusion-xl-v1-refiner", "sdxl_refiner_v1-0"),
        ("SD3", "stable-diffusion-3", "sd3"),
        ("Flux", "flux-1-dev", "flux1"),
        ("FluxSchnell", "flux-1-schnell", "flux1"),
        ("FluxKontext", "flux-1", "flux1"),
        ("Flux2", "flux2", "flux2"),
        ("Chroma", "chroma", "chroma"),
        ("Lumina2", "lumina-2", "lumina2"),
        ("SD 1.5", "stable-diffusion-v1", "sd_v1"),
        ("sdv1", "stable-diffusion-v1", "sd_v1"),
        ("sdv2", "stable-diffusion-v2-512", "sd_v2"),
        ("SD2-v", "stable-diffusion-v2-768-v", "sd_v2"),
        ("SSD1B", "stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
        ("flux.1-schnell", "flux-1-schnell", "flux1"),
        ("flux1dev", "flux-1-dev", "flux1"),
        ("ChromaRadiance", "chromaradiance", "chromaradiance"),
        ("Some Model!", "some-model", "some-model"),
        ("BaseModel", "unknown", "unknown"),
        (None, "unknown", "unknown"),
    ],
)
def test_base_model_info(family, arch, version):
    assert lora_metadata.base_model_info(family) == (arch, version)


def test_build_metadata_base_model_alias():
    md = build_metadata(steps=1, base_model="SD3")
    assert md["loralab.model_family"] == "SD3" and md["ss_base_model_version"] == "sd3"
    assert md["modelspec.architecture"] == "stable-diffusion-3/lora"


def test_metadata_round_trips_through_a_file(tmp_path):
    md = build_metadata(steps=7, algorithm="loha", rank=2, alpha=2, model_family="SD3")
    sd = LoraStateDict({"diffusion_model.x.hada_w1_a": torch.ones(2, 2)}, metadata=md)
    path = save_lora_file(sd, tmp_path / "m.safetensors", metadata=sd.metadata)
    _, meta = read_lora_file(path)
    assert meta == md
    assert earlier_steps(meta, path.name) == (7, "metadata")


# ------------------------------------------------------------------------- issue 17: hostile files


def test_fallback_without_hard_links_never_overwrites(tmp_path, monkeypatch):
    """Where os.link fails for another reason than "exists" (exFAT, SMB / FUSE), a file that appears
    after the existence check must survive: the fallback creates the name with O_EXCL."""
    target = tmp_path / "race.safetensors"
    target.write_bytes(b"someone else's file")

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(lorafile.os, "link", no_links)
    # Every existence check answers "free", as if the other file was created just after it.
    monkeypatch.setattr(Path, "exists", lambda self, **kwargs: False)
    with pytest.raises(FileExistsError):
        save_lora_file(_sd(), target)
    assert target.read_bytes() == b"someone else's file"
    assert _listing(tmp_path) == ["race.safetensors"]  # no temporary file left


def test_fallback_without_hard_links_writes_the_file(tmp_path, monkeypatch):
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(lorafile.os, "link", no_links)
    path = save_lora_file(_sd(), tmp_path / "ok.safetensors", metadata={"a": "b"})
    tensors, meta = read_lora_file(path)
    assert tensors.keys() == _sd().keys() and meta == {"a": "b"}
    assert _listing(tmp_path) == ["ok.safetensors"]


def test_deeply_nested_header_gives_the_readable_error(tmp_path):
    depth = 100_000
    header = ('{"__metadata__": {"x": "y"}, "a": ' + "[" * depth + "]" * depth + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="not a safetensors file.*nested too deeply"):
        read_lora_file(path)


@pytest.mark.parametrize(
    "metadata,filename,expected",
    [
        ({"ss_steps": "1e308"}, None, (0, "none")),
        ({"loralab.steps": "1e3", "ss_steps": "40"}, None, (40, "metadata")),
        ({"ss_steps": "1" * 400}, "x_12_steps_00001.safetensors", (12, "filename")),
        ({"ss_steps": str(10**9 + 1)}, None, (0, "none")),
        ({"ss_steps": str(10**9)}, None, (10**9, "metadata")),
        ({"ss_steps": "inf"}, None, (0, "none")),
        ({"ss_steps": "nan"}, None, (0, "none")),
        ({"ss_steps": "+5"}, None, (0, "none")),
        ({"ss_steps": "12.5"}, None, (0, "none")),
        ({}, "x_" + "9" * 400 + "_steps_00001.safetensors", (0, "none")),
    ],
)
def test_step_counts_from_files_are_range_checked(metadata, filename, expected, caplog):
    with caplog.at_level("WARNING", logger="loralab"):
        assert earlier_steps(metadata, filename) == expected
    if expected[1] != "metadata" or len(metadata) > 1:
        assert "ignoring the step count" in caplog.text
        assert len(caplog.text) < 2000  # the bogus value is shortened, not logged whole


def test_step_count_type_checks():
    assert (
        file_names.step_count(7) == 7
        and file_names.step_count("7") == 7
        and file_names.step_count(" 250.0 ") == 250
    )
    for bad in (True, 7.0, -1, None, [], "1e308", 10**9 + 1, "0x10"):
        assert file_names.step_count(bad) is None, bad


def test_next_free_path_treats_a_sidecar_as_taken(tmp_path):
    (tmp_path / "ck_5_steps_00001.lorastate").write_bytes(b"orphaned state")
    path = next_free_path(tmp_path, "ck", 5)
    assert path.name == "ck_5_steps_00002.safetensors"
    # also a sidecar whose name the counter scan would not reach
    (tmp_path / "ck_7_steps_00002.lorastate").write_bytes(b"x")
    assert next_free_path(tmp_path, "ck", 7).name == "ck_7_steps_00003.safetensors"


def test_lora_bytes_match_the_written_file(tmp_path):
    sd = _sd()
    data = lorafile.lora_file_bytes(sd, sd.metadata)
    path = lorafile.save_lora_bytes(data, tmp_path / "b.safetensors")
    assert path.read_bytes() == data
    tensors, meta = read_lora_file(path)
    assert meta == sd.metadata and all(torch.equal(tensors[k], sd[k]) for k in sd)
    with pytest.raises(FileExistsError):
        lorafile.save_lora_bytes(data, path)


def test_build_metadata_writes_every_key_readers_look_for():
    """The whole set, for one LoKr run on SDXL: kohya's ss_* (A1111 / Forge, sd-scripts), ModelSpec 1.0.1,
    LoRA Lab's own; values as strings the way those readers parse them."""
    when = dt.datetime(2026, 12, 1, 13, 33, 14, 500, tzinfo=dt.timezone.utc)
    md = build_metadata(steps=120, algorithm="LoKr", rank=16, alpha=8, seed=7, optimizer="AdamW", learning_rate=0.0001,
                        loss=0.125, training_dtype="bf16", lora_dtype="fp32", model_family="SDXL", dataset_size=12,
                        pack_version="9.9.9", resolution="1024x768", prediction_type="eps", date=when)  # fmt: skip
    assert md == {
        "loralab.algorithm": "lokr", "loralab.alpha": "8", "loralab.dataset_size": "12", "loralab.final_loss": "0.125",
        "loralab.format_version": "1", "loralab.learning_rate": "0.0001", "loralab.lora_dtype": "fp32",
        "loralab.model_family": "SDXL", "loralab.optimizer": "AdamW", "loralab.rank": "16", "loralab.seed": "7",
        "loralab.steps": "120", "loralab.training_dtype": "bf16", "loralab.version": "9.9.9",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lokr", "modelspec.date": "2026-12-01T13:33:14+00:00",
        "modelspec.implementation": "https://github.com/comfyanonymous/ComfyUI", "modelspec.prediction_type": "epsilon",
        "modelspec.resolution": "1024x768", "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": "LoRA Lab LoKr 2026-12-01T13:33:14+00:00",
        "ss_base_model_version": "sdxl_base_v1-0", "ss_learning_rate": "0.0001", "ss_max_train_steps": "120",
        "ss_network_alpha": "8", "ss_network_args": '{"algo": "lokr"}', "ss_network_dim": "16",
        "ss_network_module": "lycoris.kohya", "ss_network_train_unet_only": "True", "ss_num_train_images": "12",
        "ss_optimizer": "AdamW", "ss_seed": "7", "ss_steps": "120",
        "ss_training_finished_at": str(int(when.replace(microsecond=0).timestamp())), "ss_unet_lr": "0.0001",
        "ss_v2": "False",
    }  # fmt: skip
    titles = {
        a: build_metadata(steps=1, algorithm=a, date=when)["modelspec.title"].split()[2]
        for a in ("OFT", "dora")
    }
    assert titles == {"OFT": "OFT", "dora": "DoRA"}


def test_build_metadata_defaults_dates_and_titles(monkeypatch):
    """No algorithm means LoRA; a naive date is local time and gets its offset; "now" is taken in UTC
    whatever the machine's time zone; the title names the algorithm (an unlisted LyCORIS name as it
    is); no family writes no family and no ss_v2 (A1111 would otherwise read "not SD2")."""
    import time

    md = build_metadata(steps=1, algorithm=None, date=dt.datetime(2025, 3, 1, 12, 30, 5))
    assert md["loralab.algorithm"] == "lora" and md["ss_network_module"] == "networks.lora"
    assert md["modelspec.title"].startswith("LoRA Lab LoRA ")
    assert re.search(r"T12:30:05[+-]\d\d:\d\d$", md["modelspec.date"]), md["modelspec.date"]
    assert "loralab.model_family" not in md and "ss_v2" not in md
    assert build_metadata(steps=1, algorithm="glora")["modelspec.title"].startswith("LoRA Lab glora ")
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        now = build_metadata(steps=1)["modelspec.date"]
    finally:
        monkeypatch.undo()
        time.tzset()
    assert now.endswith("+00:00"), now


def _raw_safetensors(path, header: object, data: bytes = b"", header_bytes: bytes | None = None):
    raw = json.dumps(header).encode() if header_bytes is None else header_bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path, len(raw)


def test_layout_check_says_what_is_wrong_with_each_broken_file(tmp_path):
    from training.lorafile import _check_safetensors_layout as check

    one = tmp_path / "one.safetensors"
    one.write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"is truncated \(1 bytes\)"):
        check(one)
    bare, _ = _raw_safetensors(tmp_path / "bare.safetensors", None, header_bytes=b"")  # 8 bytes: no header
    with pytest.raises(ValueError, match="header is not JSON"):
        check(bare)
    for i, entry in enumerate([[0, 4], {"data_offsets": [0, "4"]}, {"data_offsets": [0]}, {"dtype": "F32"}]):
        path, _ = _raw_safetensors(tmp_path / f"bad{i}.safetensors", {"w": entry}, b"\x00" * 4)
        with pytest.raises(ValueError, match="malformed safetensors header entry for 'w'"):
            check(path)
    cut, n = _raw_safetensors(tmp_path / "cut.safetensors", {"w": {"data_offsets": [0, 100]}}, b"\x00" * 10)
    with pytest.raises(ValueError, match=rf"tensors need {8 + n + 100} bytes but the file has {8 + n + 10};"):
        check(cut)
    empty, _ = _raw_safetensors(
        tmp_path / "ok.safetensors", {"__metadata__": {}, "w": {"data_offsets": [0, 0]}}
    )
    check(empty)  # a complete file (one empty tensor) is not called broken


def test_step_count_warnings_name_the_key_or_the_file_and_the_limit(caplog):
    with caplog.at_level("WARNING", logger="loralab"):
        earlier_steps({"ss_steps": "-3"}, None)
        name = "run_" + "9" * 100 + "_steps_00001.safetensors"
        earlier_steps({}, f"/some/folder/{name}")
    first, second = (r.getMessage() for r in caplog.records)
    assert first == ("LoRA Lab: ignoring the step count ss_steps='-3' in the LoRA's metadata: not a whole "
                     "number between 0 and 1000000000")  # fmt: skip
    assert (
        second == f"LoRA Lab: ignoring the step count in the file name {repr(name)[:77]}...: above 1000000000"
    )


@pytest.mark.parametrize(
    "family,arch",
    [("Unknown", "unknown"), ("None", "unknown"), ("FluxDev", "flux-1-dev"), ("Chroma1-HD", "chroma"),
     ("  My  Model  ", "my-model"), ("!!!", "unknown")],
)  # fmt: skip
def test_base_model_info_other_spellings(family, arch):
    assert lora_metadata.base_model_info(family)[0] == arch


def test_lora_state_dict_copies_keep_names_and_metadata_apart():
    t = torch.zeros(2)
    sd = LoraStateDict(a=t, metadata={"k": "v"}, file_names={"kohya": {"m": "lora_unet_m"}})
    assert list(sd) == ["a"] and sd["a"] is t
    copy = sd.copy()
    assert isinstance(copy, LoraStateDict) and copy == sd
    assert copy.metadata == {"k": "v"} and copy.file_names == {"kohya": {"m": "lora_unet_m"}}
    copy.file_names["kohya"]["m"] = "changed"
    copy.metadata["k"] = "changed"
    assert sd.file_names["kohya"]["m"] == "lora_unet_m" and sd.metadata["k"] == "v"


def test_missing_lora_file_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_lora_file(tmp_path / "gone.safetensors")
    assert info.value.errno == errno.ENOENT and info.value.filename == str(tmp_path / "gone.safetensors")
    assert info.value.strerror == "LoRA file not found"


def test_counters_are_case_sensitive_where_the_file_system_is(tmp_path):
    if os.name == "nt":
        pytest.skip("Windows file names are case-insensitive: counted alike there")
    (tmp_path / "CK_2_steps_00007.safetensors").write_bytes(b"")
    assert next_free_path(tmp_path, "ck", 2).name == "ck_2_steps_00001.safetensors"
    with pytest.raises(ValueError, match="plain file-name prefix"):
        next_free_path(tmp_path, "a\\b", 2)


def test_safe_prefix_keeps_letters_and_allows_the_longest_name():
    assert safe_prefix("Xmas/..hidden") == "Xmas/hidden"
    longest = "a" * file_names._MAX_COMPONENT
    assert safe_prefix(f"runs/{longest}") == f"runs/{longest}"
    with pytest.raises(ValueError, match="longer than"):
        safe_prefix(longest + "a")
