"""safe_write's building blocks on their own: the copy fallback of publish (filesystems without hard
links) and the reading of safetensors' I/O errors."""

import errno
import os
import stat

import pytest

from training.safe_write import copy_exclusive, publish, write_error_cause


def test_publish_without_hard_links_copies_into_a_new_file_with_the_usual_mode(tmp_path, monkeypatch):
    tmp = tmp_path / "x.tmp"
    tmp.write_bytes(os.urandom(3 << 20))  # more than one read chunk
    data = tmp.read_bytes()

    def no_link(src, dst, *a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    old_umask = os.umask(0o022)
    try:
        publish(tmp, tmp_path / "x.safetensors", overwrite=False)
    finally:
        os.umask(old_umask)
    out = tmp_path / "x.safetensors"
    assert out.read_bytes() == data and not tmp.exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # as a normal save: not executable
    tmp.write_bytes(b"new")
    with pytest.raises(FileExistsError):  # never over a file that is there
        publish(tmp, out, overwrite=False)
    assert out.read_bytes() == data


def test_copy_that_fails_removes_its_new_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        copy_exclusive(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class SafetensorError(Exception):  # what write_error_cause recognises, by name
    pass


@pytest.mark.parametrize(
    "exc,errno_,text",
    [
        (SafetensorError("Error while serializing: I/O error: No space left (os error 28)"), 28, None),
        (SafetensorError("Error while serializing: I/O error: something"), None, "I/O error: something"),
        (SafetensorError("header too large"), None, None),
        (ValueError("I/O error (os error 5)"), None, None),  # not safetensors': not read
    ],
)
def test_write_error_cause_reads_safetensors_io_errors(exc, errno_, text):
    cause = write_error_cause(exc)
    if errno_ is None and text is None:
        assert cause is None
        return
    assert isinstance(cause, OSError) and cause.errno == errno_
    if text:
        assert text in str(cause)
    own = OSError(errno.EIO, "x")
    assert write_error_cause(own) is own
