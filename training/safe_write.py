"""Writing files so that nothing half-written or overwritten is ever left: a temporary file beside
the target, fsynced, then published under its name (atomically; never over an existing file unless
asked), or a new file created exclusively. I/O errors (safetensors' too) become an ``OSError`` that
names the file and what to do. No ComfyUI imports."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "write_atomically",
    "create_exclusive",
    "publish",
    "copy_exclusive",
    "fsync_file",
    "fsync_dir",
    "write_error_cause",
]


def fsync_file(path: Path) -> None:
    """Make a written file's bytes durable before it is published under its name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give the finished temporary file ``tmp`` the name ``path``: replacing what is there when
    ``overwrite``, else only if the name is free (``FileExistsError``)."""
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link fails when the target exists: an atomic "rename unless taken".
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (exFAT, some SMB / FUSE mounts): create the name exclusively
        # (O_EXCL: fails if it exists, whoever made it and whenever) and copy the data into it. A file
        # that appears at any moment is never overwritten.
        copy_exclusive(tmp, path)
    os.unlink(tmp)


def copy_exclusive(src: Path, path: Path) -> None:
    """Copy ``src`` to the new file ``path`` (created with O_EXCL, fsynced); removed again on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours: created exclusively above
        raise


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def write_error_cause(exc: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, or None when ``exc`` is no I/O error.

    ``safetensors`` reports I/O failures (disk full, read-only folder) as its own ``SafetensorError``,
    which is not an ``OSError``; its text carries the code (``... (os error 28)``), which this turns
    back into an ``OSError`` with that errno, so callers can name the file and the cause.
    """
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ != "SafetensorError":
        return None
    text = str(exc)
    found = _OS_ERROR_CODE.search(text)
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return OSError(text) if "I/O error" in text else None


def write_atomically(path: Path, write: Callable[[Path], None], overwrite: bool, what: str = "file",
                     hint: str = "") -> None:  # fmt: skip
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsynced and published under
    ``path`` (never over an existing file unless ``overwrite``: ``FileExistsError``). An I/O error
    becomes ``OSError("could not write <what> <path>: <cause>; check that the folder is writable and
    has free space<hint>")``; nothing is left behind on any error. Missing parent folders are made."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            fsync_file(tmp)
            publish(tmp, path, overwrite)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, f"refusing to overwrite an existing {what}; choose another name or pass overwrite=True",
                str(path),
            ) from None  # fmt: skip
        except Exception as exc:
            io_error = write_error_cause(exc)
            if io_error is None:
                raise
            message = (f"could not write {what} {path}: {io_error.strerror or io_error}; check that the folder is "
                       f"writable and has free space{hint}")  # fmt: skip
            raise (OSError(message) if io_error.errno is None else OSError(io_error.errno, message)) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, write: Callable[[object], None]) -> bool:
    """``write(f)`` fills the new file ``path``, created exclusively (O_EXCL: never over a file that
    exists, whoever made it and whenever). False when the name is taken; a write that fails leaves
    nothing behind."""
    try:
        f = open(path, "xb")
    except FileExistsError:
        return False
    with f:
        try:
            write(f)
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                path.unlink()  # ours: created exclusively above
            raise
    return True
