"""Writing HDF5 files so that a full disk is an error, not a crash.

HDF5 2.0 (h5py 3.16) handles ENOSPC badly when writing chunked datasets: the failed write
surfaces while a handle is deallocated and the process segfaults (reproduced on a 64 KiB
tmpfs), or the write fails with "RuntimeError: Disable slist on flush dest failure failed"
(the tiny recipe on a 600 KiB tmpfs), leaving a partial file. Neither tells a user that the
disk is full, so every HDF5 file this package writes goes through `create_h5`:

    HDF5 -> h5py's file-object driver -> `_LatchingFile` -> os.pwrite

`_LatchingFile` never lets an OSError reach HDF5. The first failed write is remembered
(latched); that write and every later one are kept in memory when small (metadata, so
HDF5 can read back what it believes it wrote) and dropped when large (raw chunks, which
HDF5 does not read back while writing). When HDF5 has closed the file, the latched error
is raised as a `DiskFullError` (or the original OSError) and the partial file is deleted.
The bytes written are identical to h5py's default driver (checked by a test), at the same
speed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

# Errors that mean "no room": a full file system, or the user's quota.
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writes up to this size made after a failure are kept so HDF5 can read them back.
_OVERLAY_MAX_BYTES = 1 << 20


class DiskFullError(OSError):
    """A write found no space left (ENOSPC or EDQUOT); nothing was marked complete."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_error(path: str | Path, exc: BaseException, what: str) -> DiskFullError:
    free = free_bytes(path)
    shown = "unknown" if free is None else f"{free} bytes"
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the device while writing {what} {path} ({exc}); {shown} free "
        "there now. Nothing was marked complete: free space (or raise the quota) and rerun "
        "the same command, it resumes from what is safely on disk",
    )


class _LatchingFile(io.RawIOBase):
    """A seekable file for h5py's file-object driver that never raises OSError on write."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.size = 0
        self.error: OSError | None = None
        self.overlay: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: Any) -> int:
        blob = bytes(data)
        if self.error is None:
            try:
                done = 0
                while done < len(blob):  # a short write is retried to get the real errno
                    wrote = os.pwrite(self.fd, blob[done:], self.pos + done)
                    if wrote == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += wrote
            except OSError as e:
                self.error = e
        if self.error is not None and len(blob) <= _OVERLAY_MAX_BYTES:
            self.overlay[self.pos] = blob
        self.pos += len(blob)
        self.size = max(self.size, self.pos)
        return len(blob)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self.fd, len(view), self.pos)
        view[: len(data)] = data
        view[len(data) :] = bytes(len(view) - len(data))
        for offset, blob in self.overlay.items():  # empty unless a write failed
            low, high = max(offset, self.pos), min(offset + len(blob), self.pos + len(view))
            if low < high:
                view[low - self.pos : high - self.pos] = blob[low - offset : high - offset]
        self.pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self.error = e
        self.size = size
        return size

    def flush(self) -> None:
        return None

    def sync(self) -> None:
        if self.error is None:
            try:
                os.fsync(self.fd)
            except OSError as e:
                self.error = e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


def write_text_atomic(path: str | Path, text: str, what: str = "file") -> None:
    """Writes `text` to a temporary name beside `path`, fsyncs it and renames it over
    `path`: a reader finds the old file or the new one. A full disk leaves the old file in
    place, no temporary file, and raises DiskFullError naming `what`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise (disk_full_error(path, e, what) if is_disk_full(e) else e) from e
    os.replace(tmp, path)


@contextlib.contextmanager
def replace_h5(path: str | Path, what: str = "file", **kwargs: Any) -> Iterator[h5py.File]:
    """`create_h5` under a temporary name beside `path`, renamed over `path` once whole, so
    a reader finds the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with create_h5(tmp, what, **kwargs) as h5:
        yield h5
    os.replace(tmp, path)


@contextlib.contextmanager
def create_h5(path: str | Path, what: str = "file", **kwargs: Any) -> Iterator[h5py.File]:
    """A new HDF5 file at `path` (truncated), written through `_LatchingFile`.

    On exit the file is fsynced. If any write failed, the partial file is removed and a
    `DiskFullError` (ENOSPC / EDQUOT) or the original OSError is raised instead.
    """
    path = Path(path)
    raw = _LatchingFile(path)
    try:
        with h5py.File(raw, "w", **kwargs) as h5:
            yield h5
        raw.sync()
    except BaseException:
        raw.close()
        path.unlink(missing_ok=True)
        raise
    raw.close()
    if raw.error is not None:
        path.unlink(missing_ok=True)
        if is_disk_full(raw.error):
            raise disk_full_error(path, raw.error, what) from raw.error
        raise raw.error
