"""training/checkpoint.py: checkpoints bound to their LoRA, written durably, pruned, checked for space."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training import checkpoint as ck
from training.checkpoint import (
    CheckpointSeries,
    bound_training_state,
    load_training_state,
    save_training_state,
    state_path_for,
    write_checkpoint,
)
from training.lorafile import read_lora_file

KEY = "diffusion_model.blk.lora_down.weight"


def _lora(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {KEY: torch.full((4, 8), value), "diffusion_model.blk.lora_up.weight": torch.full((8, 4), value)}


def _optim() -> dict:
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 8)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}]}  # fmt: skip


def _write(folder: Path, step: int = 2, value: float = 1.0, stem: str = "ck") -> tuple[Path, Path]:
    return write_checkpoint(folder, stem, step, _lora(value), {"loralab.steps": str(step)}, _lora(value), _optim(),
                            10, {"rank": 4}, what="checkpoint_prefix 'ck'")  # fmt: skip


def _state_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["loralab.trainstate"])


def _rewrite_meta(path: Path, **changes) -> None:
    """Change the sidecar's JSON metadata in place (tensors kept)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["loralab.trainstate"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata={"loralab.trainstate": json.dumps(meta)})


def test_checkpoint_is_bound_to_its_lora_by_content_hash(tmp_path):
    lora, state = _write(tmp_path)
    assert (lora.name, state.name) == ("ck_2_steps_00001.safetensors", "ck_2_steps_00001.lorastate")
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name, lora.name]  # no temporary files
    assert _state_meta(state)["lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    tensors, meta = read_lora_file(lora)
    assert meta == {"loralab.steps": "2"} and torch.equal(tensors[KEY], _lora()[KEY])
    found, problem = bound_training_state(lora)
    assert problem is None
    master, optimizer_state, info = found
    assert (info["step"], info["total_steps"]) == (2, 10) and torch.equal(master[KEY], _lora()[KEY])
    assert torch.equal(optimizer_state["state"][0]["exp_avg"], torch.ones(4, 8))


def test_foreign_or_orphaned_sidecar_is_not_used(tmp_path):
    a, a_state = _write(tmp_path, step=2, value=1.0)
    b, b_state = _write(tmp_path, step=4, value=2.0)
    # B's state copied beside A (a sidecar from another run / another file)
    a_state.write_bytes(b_state.read_bytes())
    found, problem = bound_training_state(a)
    assert found is None and "another LoRA file" in problem
    # A LoRA replaced under its name keeps an orphaned sidecar
    b.write_bytes(a.read_bytes())
    found, problem = bound_training_state(b)
    assert found is None and "another LoRA file" in problem
    # no sidecar: nothing to say
    assert bound_training_state(tmp_path / "none.safetensors") == (None, None)


def test_unbound_sidecar_of_an_older_version_is_not_used(tmp_path):
    lora, _ = _write(tmp_path)
    save_training_state(state_path_for(lora), _lora(), _optim(), 2, 10, {"rank": 4})  # no hash
    found, problem = bound_training_state(lora)
    assert found is None and "not bound" in problem


def test_sidecar_that_is_a_link_is_not_used(tmp_path):
    lora, state = _write(tmp_path)
    elsewhere = tmp_path / "elsewhere.lorastate"
    state.rename(elsewhere)
    state.symlink_to(elsewhere)
    found, problem = bound_training_state(lora)
    assert found is None and "not a regular file" in problem


@pytest.mark.parametrize(
    "changes",
    [
        {"step": 1e308},
        {"step": "2"},
        {"step": -1},
        {"step": 10**400},
        {"total_steps": 10**9 + 1},
        {"step": 11},
        {"step": True},
        {"config": "x"},
        {"param_groups": None},
    ],
)
def test_bogus_step_counts_in_a_sidecar_are_refused(tmp_path, changes):
    lora, state = _write(tmp_path)
    _rewrite_meta(state, **changes)
    with pytest.raises(ValueError, match="training state"):
        load_training_state(state)
    found, problem = bound_training_state(lora)  # the hash still matches: refused for its values
    assert found is None and "training state" in problem and len(problem) < 400


def test_deeply_nested_sidecar_metadata_is_a_readable_error(tmp_path):
    lora, state = _write(tmp_path)
    save_file(
        {"x": torch.zeros(1)}, str(state), metadata={"loralab.trainstate": "[" * 100_000 + "]" * 100_000}
    )
    with pytest.raises(ValueError, match="not readable JSON"):
        load_training_state(state)


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    real = ck.shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=100_000)

    monkeypatch.setattr(ck.shutil, "disk_usage", nearly_full)
    with pytest.raises(OSError) as info:
        _write(tmp_path / "sub")
    message = str(info.value)
    print(message)
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror.startswith("checkpoint_prefix 'ck': not enough free space")
    for word in ("ck_2_steps_00001.safetensors", "ck_2_steps_00001.lorastate", "save_every", "keep_checkpoints",
                 str(tmp_path / "sub"), "MiB"):  # fmt: skip
        assert word in message, word
    assert list((tmp_path / "sub").iterdir()) == []


def test_failed_sidecar_publish_leaves_no_lora_behind(tmp_path, monkeypatch):
    def failing(tmp, path, overwrite):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ck, "publish", failing)
    with pytest.raises(OSError) as info:
        _write(tmp_path)
    assert "ck_2_steps_00001.lorastate" in str(info.value) and "Input/output error" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_sidecar_is_published_after_its_lora_and_both_are_fsynced(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst, *args, **kwargs):
        events.append(f"link {Path(dst).name}")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    lora, state = _write(tmp_path)
    pid = os.getpid()
    files = [e for e in events if "tmp" in e or e.startswith("link")]
    assert files == [f"fsync {state.name}.tmp-{pid}", f"fsync {lora.name}.tmp-{pid}", f"link {lora.name}",
                     f"link {state.name}"], events  # fmt: skip


def test_a_name_whose_sidecar_exists_is_skipped(tmp_path):
    (tmp_path / "ck_2_steps_00001.lorastate").write_bytes(b"someone's state")
    lora, state = _write(tmp_path)
    assert lora.name == "ck_2_steps_00002.safetensors" and state.name == "ck_2_steps_00002.lorastate"
    assert (tmp_path / "ck_2_steps_00001.lorastate").read_bytes() == b"someone's state"


def test_series_keeps_the_newest_of_this_run_only(tmp_path):
    other = tmp_path / "ck_1_steps_00001.safetensors"  # an earlier run of the same prefix
    other.write_bytes(b"earlier run")
    series = CheckpointSeries(keep=2)
    written = []
    for step in range(1, 6):
        lora, state = _write(tmp_path, step=step)
        written.append((lora, state))
        series.add(lora, state)
    names = sorted(p.name for p in tmp_path.iterdir())
    kept = [p.name for pair in written[-2:] for p in pair]
    assert names == sorted(kept + [other.name]), names
    keep_all = CheckpointSeries(keep=0)
    for lora, state in written[-2:]:
        assert keep_all.add(lora, state) == []


def test_failure_messages_keep_the_cause_and_name_the_input(tmp_path, monkeypatch):
    """The errno of the cause stays on the raised error; a cause without one is said in its own words;
    the advice names the input (the first word of `what`); free space is said in MiB."""
    real = ck.shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    with pytest.raises(OSError, match=r"has 0\.1 MiB free"):
        _write(tmp_path / "full")
    monkeypatch.undo()

    for cause, errno_, reason in [(OSError(errno.EIO, "Input/output error"), errno.EIO, "Input/output error"),
                                  (OSError("the disk went away"), None, "the disk went away")]:  # fmt: skip

        def failing(tmp, path, overwrite, cause=cause):
            raise cause

        monkeypatch.setattr(ck, "publish", failing)
        with pytest.raises(OSError) as info:
            _write(tmp_path / "io")
        assert info.value.errno == errno_
        message = str(info.value)
        assert f": {reason}; check that the folder is writable" in message, message
        assert message.endswith("or choose another checkpoint_prefix"), message


def test_clean_up_that_fails_does_not_hide_the_error(tmp_path, monkeypatch):
    """On a disk that refuses unlink too, the write's own error reaches the user."""

    def failing(tmp, path, overwrite):
        raise OSError(errno.EIO, "Input/output error")

    def no_unlink(self, missing_ok=False):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(ck, "publish", failing)
    monkeypatch.setattr(Path, "unlink", no_unlink)
    with pytest.raises(OSError) as info:
        _write(tmp_path)
    assert info.value.errno == errno.EIO


def test_series_skips_files_the_user_already_deleted(tmp_path):
    series = CheckpointSeries(keep=1)
    first = _write(tmp_path, step=1)
    second = _write(tmp_path, step=2)
    assert series.add(*first) == []
    first[0].unlink()  # the user removed the old LoRA by hand
    assert series.add(*second) == [first[1]]
    assert not first[1].exists() and second[0].exists() and second[1].exists()


def test_free_space_needed_is_both_files_plus_the_margin(tmp_path, monkeypatch):
    """The check counts the LoRA (its real size), the sidecar (its estimate, never below its real size)
    and FREE_SPACE_MARGIN; exactly that much free is enough, one byte less is refused; the folder may
    be several levels new."""
    estimates = []
    real_size = ck._state_size
    monkeypatch.setattr(ck, "_state_size", lambda *a: estimates.append(real_size(*a)) or estimates[-1])
    lora, state = _write(tmp_path / "probe")
    assert estimates[0] >= state.stat().st_size
    needed = lora.stat().st_size + estimates[0] + ck.FREE_SPACE_MARGIN
    real = ck.shutil.disk_usage
    for free, ok in [(needed, True), (needed - 1, False)]:
        monkeypatch.setattr(
            ck.shutil, "disk_usage", lambda path, free=free: real(tmp_path)._replace(free=free)
        )
        folder = tmp_path / f"free{free}" / "a" / "b"
        if ok:
            assert _write(folder)[0].exists()
        else:
            with pytest.raises(OSError, match="not enough free space"):
                _write(folder)


@pytest.mark.parametrize("fails", ["state", "lora"])
def test_a_failed_write_names_the_file_being_written_and_its_step(tmp_path, monkeypatch, fails):
    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ck, "_write_state_file" if fails == "state" else "save_lora_bytes", failing)
    with pytest.raises(OSError) as info:
        _write(tmp_path, step=7)
    suffix = ".lorastate" if fails == "state" else ".safetensors"
    assert f"could not save the step 7 checkpoint {tmp_path / ('ck_7_steps_00001' + suffix)}" in str(
        info.value
    )
    assert info.value.errno == errno.EIO and list(tmp_path.iterdir()) == []
