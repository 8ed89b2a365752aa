"""Streaming bytes into a slot.

The core (`copy_chunks`) writes a chunk stream into any seekable file object, skipping
all-zero blocks when the target is known to read zeros there. `SlotWriter` adds the rules
for a real slot on top: exclusive open, capacity check before the first byte, making the
target read zeros where that is cheap, periodic and final fsync, and a read-back that
reads the device (not the page cache) and compares the sha256 with the expected one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import io
import mmap
import os
import stat
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from abupgrade.errors import ImageRejected, OperationalError, PolicyRefusal
from abupgrade.progress import NullProgress, Progress

BLOCK = 4096  # zero detection granularity (the usual filesystem block)
CHUNK = 1024 * 1024  # bytes gathered before a write
SYNC_EVERY = 64 * 1024 * 1024  # writeback window: keeps dirty memory flat
READ_CHUNK = 4 * 1024 * 1024

_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS = bytes(CHUNK)
_ZERO_BLOCK = bytes(BLOCK)


@dataclass(frozen=True)
class WriteStats:
    size: int  # payload bytes
    written: int  # bytes actually written
    skipped: int  # all-zero bytes not written because the target already reads zeros there
    seconds: float


def copy_chunks(
    out: BinaryIO,
    chunks: Iterable[bytes | bytearray | memoryview],
    size: int,
    *,
    skip_zeros: bool = False,
    progress: Progress | None = None,
    sync_every: int = SYNC_EVERY,
) -> WriteStats:
    """Write exactly `size` bytes from `chunks` to `out` from offset 0.

    With `skip_zeros`, all-zero 4 KiB blocks are not written: the caller guarantees the
    target already reads zeros there. More or fewer bytes than `size` is ImageRejected.
    """
    progress = progress or NullProgress()
    started = time.monotonic()
    pending = bytearray(CHUNK)
    view = memoryview(pending)
    fill = 0
    pos = 0  # offset of pending[0] in the target
    written = 0
    behind = _WriteBehind(out, sync_every)

    def put(data: memoryview, offset: int) -> None:
        nonlocal written
        out.seek(offset)
        while data:
            n = out.write(data)
            if not n:
                raise OperationalError(f"short write at byte {offset}")
            data, offset = data[n:], offset + n
            written += n

    def flush(length: int) -> None:
        if not skip_zeros:
            put(view[:length], pos)
        elif length == CHUNK and pending == _ZEROS:
            pass
        else:
            run_start = None
            for at in range(0, length, BLOCK):
                end = min(at + BLOCK, length)
                zero = pending[at:end] == _ZERO_BLOCK[: end - at]
                if zero and run_start is not None:
                    put(view[run_start:at], pos + run_start)
                    run_start = None
                elif not zero and run_start is None:
                    run_start = at
            if run_start is not None:
                put(view[run_start:length], pos + run_start)
        progress.advance(length)

    progress.start("write", size)
    try:
        for chunk in chunks:
            data = memoryview(chunk).cast("B")
            if pos + fill + len(data) > size:
                raise ImageRejected(f"payload is longer than its declared {size:,} bytes")
            while data:
                n = min(CHUNK - fill, len(data))
                view[fill : fill + n] = data[:n]
                fill += n
                data = data[n:]
                if fill == CHUNK:
                    flush(CHUNK)
                    pos += CHUNK
                    fill = 0
                    behind.reached(pos)
        if fill:
            flush(fill)
            pos += fill
        if pos != size:
            raise ImageRejected(f"payload ended after {pos:,} of its declared {size:,} bytes")
        _sync(out)
    finally:
        view.release()
        progress.finish()
    return WriteStats(size, written, size - written, time.monotonic() - started)


def _sync(out: BinaryIO) -> None:
    out.flush()
    try:
        fd = out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return  # an in-memory file: nothing to sync
    os.fsync(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


class _WriteBehind:
    """Keeps dirty memory at about two windows without stalling the writes.

    Each full window is handed to writeback at once (sync_file_range WRITE) and the window
    before it is waited for; the final fsync still makes everything durable. Where
    sync_file_range is not available, a full window is fsynced.
    """

    def __init__(self, out: BinaryIO, window: int) -> None:
        self.window = window
        self.start = 0  # the window being filled begins here
        self.previous: tuple[int, int] | None = None  # the window in writeback
        try:
            self.fd: int | None = out.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.fd = None
        self.out = out

    def reached(self, pos: int) -> None:
        if self.fd is None or pos - self.start < self.window:
            return
        current = (self.start, pos - self.start)
        if not self._range(*current, _SYNC_FILE_RANGE_WRITE):
            _sync(self.out)
        elif self.previous is not None:
            self._range(*self.previous, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                        | _SYNC_FILE_RANGE_WAIT_AFTER)
        self.previous, self.start = current, pos

    def _range(self, offset: int, length: int, flags: int) -> bool:
        call = _libc.sync_file_range
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        if call(self.fd, offset, length, flags) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.ESPIPE, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise OperationalError(f"writeback failed: {os.strerror(err)}")


def _libc_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with flags (os.posix_fallocate has none); False when unsupported."""
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OperationalError(f"fallocate failed: {os.strerror(err)}")


def _sysfs_queue(path: Path, name: str) -> int:
    rdev = path.stat().st_rdev
    sysdir = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    queue = sysdir / "queue"
    if not queue.is_dir():
        queue = sysdir / ".." / "queue"  # a partition: the queue is its disk's
    try:
        return int((queue / name).read_text())
    except (OSError, ValueError):
        return 0


class SlotWriter:
    """Writes one payload into a slot (block device or plain file).

    with SlotWriter(Path("/dev/sda3"), progress) as w:
        w.write_payload(size, sha256, chunks)   # verifies the read-back unless verify=False
    """

    def __init__(
        self,
        path: Path,
        progress: Progress | None = None,
        *,
        verify: bool = True,
        capacity: int | None = None,
        sync_every: int = SYNC_EVERY,
    ) -> None:
        self.path = path
        self.progress = progress or NullProgress()
        self.verify = verify
        self.capacity = capacity  # for a plain file; a block device tells its own
        self.sync_every = sync_every
        self._file: BinaryIO | None = None
        self._block_device = False
        self._expected: tuple[int, str] | None = None

    def __enter__(self) -> SlotWriter:
        try:
            is_block = stat.S_ISBLK(self.path.stat().st_mode)
        except FileNotFoundError:
            is_block = False
        flags = os.O_WRONLY | os.O_CLOEXEC
        flags |= os.O_EXCL if is_block else os.O_CREAT
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise PolicyRefusal(f"{self.path} is in use (mounted or held open)",
                                    hint="unmount it; abupgrade never writes a device in use"
                                    ) from None
            raise OperationalError(f"cannot open {self.path}: {exc.strerror}") from None
        self._block_device = is_block
        if is_block:
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            self.capacity = struct.unpack("=Q", buf)[0]
        self._file = os.fdopen(fd, "wb", buffering=0)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write_payload(
        self, size: int, sha256: str, chunks: Iterable[bytes | bytearray | memoryview]
    ) -> WriteStats:
        """Write `size` bytes from `chunks`, fsync, then (unless verify=False) read back."""
        out = self._file
        if out is None:
            raise OperationalError("SlotWriter used outside its with block")
        if self.capacity is not None and size > self.capacity:
            raise ImageRejected(
                f"payload larger than the slot: {size:,} bytes into {self.capacity:,} "
                f"({self.path})", hint="build the image for this disk's slot size")
        skip = self._make_zeros(out.fileno(), size)
        stats = copy_chunks(out, chunks, size, skip_zeros=skip, progress=self.progress,
                            sync_every=self.sync_every)
        if not self._block_device and os.fstat(out.fileno()).st_size < size:
            os.ftruncate(out.fileno(), size)  # trailing zeros were skipped
            os.fsync(out.fileno())
        self._expected = (size, sha256.lower())
        if self.verify:
            self.verify_readback()
        return stats

    def _make_zeros(self, fd: int, size: int) -> bool:
        """Make [0, size) read zeros if that is cheap; True when it did."""
        if size == 0:
            return False
        if self._block_device:
            if _sysfs_queue(self.path, "write_zeroes_max_bytes") <= 0:
                return False
            sector = struct.unpack("=i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
            length = -(-size // sector) * sector
            if self.capacity is not None:
                length = min(length, self.capacity)
            try:
                fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("=QQ", 0, length))
            except OSError:
                return False
            return True
        end = os.fstat(fd).st_size
        if end == 0:
            return True  # a new or empty file reads zeros everywhere
        return _libc_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, min(end, size))

    def verify_readback(self) -> None:
        """Read the written bytes from the device itself and compare their sha256."""
        if self._expected is None:
            raise OperationalError("nothing written to verify")
        size, expected = self._expected
        self.progress.start("verify", size)
        try:
            digest = _read_digest(self.path, size, self.progress)
        finally:
            self.progress.finish()
        if digest != expected:
            raise OperationalError(
                f"read-back of {self.path} does not match what was written "
                f"(sha256 {digest[:16]}..., expected {expected[:16]}...)",
                hint="the storage may be failing; the slot stays unbootable")


def _read_digest(path: Path, size: int, progress: Progress) -> str:
    """sha256 of the first `size` bytes of `path`, bypassing the page cache."""
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        direct = True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise OperationalError(f"cannot open {path}: {exc.strerror}") from None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # tmpfs and friends: no O_DIRECT
        direct = False
    buf = mmap.mmap(-1, READ_CHUNK)  # page aligned, as O_DIRECT wants
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        done = 0
        with memoryview(buf) as view:
            while done < size:
                try:
                    n = os.preadv(fd, [view], done)
                except OSError as exc:
                    raise OperationalError(f"read-back of {path} failed at byte {done:,}: "
                                           f"{exc.strerror}") from None
                if n <= 0:
                    raise OperationalError(f"read-back of {path} ended at byte {done:,} "
                                           f"of {size:,}")
                take = min(n, size - done)
                digest.update(view[:take])
                done += take
                progress.advance(take)
    finally:
        with contextlib.suppress(BufferError):
            buf.close()
        os.close(fd)
    return digest.hexdigest()
