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
import hashlib
import io
import mmap
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from abupgrade import blockdev
from abupgrade.errors import ImageRejected, Interrupted, OperationalError, PolicyRefusal
from abupgrade.progress import NullProgress, Progress

BLOCK = 4096  # zero detection granularity (the usual filesystem block)
CHUNK = 1024 * 1024  # bytes gathered before a write
SYNC_EVERY = 64 * 1024 * 1024  # writeback window: keeps dirty memory flat
READ_CHUNK = 4 * 1024 * 1024

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
    on_durable: Callable[[int], None] | None = None,
    direct_fd: int | None = None,
) -> WriteStats:
    """Write exactly `size` bytes from `chunks` to `out` from offset 0.

    The caller's thread gathers the chunks (reading and hashing the image) while a writer
    thread writes the gathered ones. With `skip_zeros`, all-zero 4 KiB blocks are not written:
    the caller guarantees the target already reads zeros there. `on_durable(end)` is called
    (from the writer thread) each time [0, end) has reached the device. More or fewer bytes
    than `size` is ImageRejected. `direct_fd`, the same target opened with O_DIRECT, takes the
    block-aligned writes past the page cache (the unaligned tail goes through `out`).
    """
    progress = progress or NullProgress()
    started = time.monotonic()
    pos = 0  # bytes handed to the writer so far
    progress.start("write", size)
    try:
        behind = _WriteBehind(out, sync_every, on_durable)
        with _WriterThread(out, skip_zeros, behind, direct_fd) as writer:
            buffer = writer.take_buffer()
            fill = 0
            for chunk in chunks:
                data = memoryview(chunk).cast("B")
                if pos + fill + len(data) > size:
                    raise ImageRejected(f"payload is longer than its declared {size:,} bytes")
                while data:
                    n = min(CHUNK - fill, len(data))
                    buffer[fill : fill + n] = data[:n]
                    fill += n
                    data = data[n:]
                    if fill == CHUNK:
                        writer.put(buffer, pos, fill)
                        progress.advance(fill)
                        pos, fill = pos + fill, 0
                        buffer = writer.take_buffer()
            if fill:
                writer.put(buffer, pos, fill)
                progress.advance(fill)
                pos += fill
            if pos != size:
                raise ImageRejected(f"payload ended after {pos:,} of its declared {size:,} bytes")
            writer.drain()
        _sync(out)
    finally:
        progress.finish()
    return WriteStats(size, writer.written, size - writer.written, time.monotonic() - started)


class _WriterThread:
    """Writes gathered chunks in a thread of its own, so that the writes (and waiting for the
    device) overlap with reading and hashing the next chunks. A few chunk buffers go round
    between the two threads: memory stays flat. An error in the thread is raised in the
    caller's at its next `put` or `drain`."""

    BUFFERS = 4

    def __init__(self, out: BinaryIO, skip_zeros: bool, behind: _WriteBehind,
                 direct_fd: int | None = None) -> None:
        self.out = out
        self.direct_fd = direct_fd
        self.staging = mmap.mmap(-1, CHUNK) if direct_fd is not None else None  # page aligned
        self.skip_zeros = skip_zeros
        self.behind = behind
        self.written = 0
        self.error: BaseException | None = None
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(self.BUFFERS):
            self.free.put(bytearray(CHUNK))
        self.work: queue.Queue[tuple[bytearray, int, int] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="abupgrade-writer", daemon=True)

    def __enter__(self) -> _WriterThread:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None and self.error is None:
            self.error = value or Interrupted("stopped")  # the thread skips what is queued
        self.work.put(None)
        self.thread.join()
        if self.staging is not None:
            self.staging.close()

    def take_buffer(self) -> bytearray:
        return self.free.get()

    def put(self, buffer: bytearray, offset: int, length: int) -> None:
        self._raise()
        self.work.put((buffer, offset, length))

    def drain(self) -> None:
        """Wait until everything put is written."""
        self.work.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            buffer, offset, length = item
            try:
                if self.error is None:
                    self._write(buffer, offset, length)
                    self.behind.reached(offset + length)
            except OSError as exc:  # EIO, ENOSPC from a failing or vanishing device
                self.error = OperationalError(
                    f"the slot's storage failed while writing near byte {offset:,}: "
                    f"{exc.strerror}", hint="the storage may be failing; the slot stays unbootable")
            except BaseException as exc:  # handed to the caller's thread
                self.error = exc
            finally:
                self.free.put(buffer)
                self.work.task_done()

    def _write(self, buffer: bytearray, offset: int, length: int) -> None:
        with memoryview(buffer) as view:
            if not self.skip_zeros:
                self._put(view[:length], offset)
            elif length == CHUNK and buffer == _ZEROS:
                pass
            elif buffer.find(_ZERO_BLOCK, 0, length) < 0:  # no zero block at all: one write
                self._put(view[:length], offset)
            else:
                run_start = None
                for at in range(0, length, BLOCK):
                    end = min(at + BLOCK, length)
                    zero = buffer[at:end] == _ZERO_BLOCK[: end - at]
                    if zero and run_start is not None:
                        self._put(view[run_start:at], offset + run_start)
                        run_start = None
                    elif not zero and run_start is None:
                        run_start = at
                if run_start is not None:
                    self._put(view[run_start:length], offset + run_start)

    def _put(self, data: memoryview, offset: int) -> None:
        if self.staging is not None and offset % BLOCK == 0 and len(data) % BLOCK == 0:
            self._put_direct(data, offset)
            return
        self.out.seek(offset)
        while data:
            n = self.out.write(data)
            if not n:
                raise OperationalError(f"short write at byte {offset}")
            data, offset = data[n:], offset + n
            self.written += n


    def _put_direct(self, data: memoryview, offset: int) -> None:
        """Write aligned blocks with O_DIRECT from the aligned staging buffer: the data skips
        the page cache, which saves a copy and leaves nothing dirty for fsync to flush."""
        assert self.staging is not None and self.direct_fd is not None
        length = len(data)
        self.staging[:length] = data
        with memoryview(self.staging) as view:
            done = 0
            while done < length:
                n = os.pwrite(self.direct_fd, view[done:length], offset + done)
                if n <= 0 or n % BLOCK:
                    raise OperationalError(f"short direct write at byte {offset + done}")
                done += n
        self.written += length


def _sync(out: BinaryIO) -> None:
    out.flush()
    try:
        fd = out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return  # an in-memory file: nothing to sync
    try:
        os.fsync(fd)
    except OSError as exc:  # EIO from a failing or vanished device surfaces here
        raise OperationalError(f"the slot's storage failed while writing: {exc.strerror}",
                               hint="the storage may be failing; the slot stays unbootable"
                               ) from None


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


class _WriteBehind:
    """Keeps dirty memory at about two windows without stalling the writes.

    Each full window is handed to writeback at once (sync_file_range WRITE) and the window
    before it is waited for; the final fsync still makes everything durable. Where
    sync_file_range is not available, a full window is fsynced. `on_durable(end)` hears when
    [0, end) has reached the device.
    """

    def __init__(self, out: BinaryIO, window: int,
                 on_durable: Callable[[int], None] | None = None) -> None:
        self.window = window
        self.on_durable = on_durable
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
        durable = None
        if not self._range(*current, _SYNC_FILE_RANGE_WRITE):
            _sync(self.out)
            durable = pos
        elif self.previous is not None:
            self._range(*self.previous, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                        | _SYNC_FILE_RANGE_WAIT_AFTER)
            durable = self.start
        self.previous, self.start = current, pos
        if durable is not None and self.on_durable is not None:
            self.on_durable(durable)

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
        self._direct: int | None = None
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
            self.capacity = blockdev.fd_capacity(fd)
            self._direct = self._open_direct(fd)
        self._file = os.fdopen(fd, "wb", buffering=0)
        return self

    def _open_direct(self, fd: int) -> int | None:
        """A second descriptor with O_DIRECT for aligned writes, where the device allows it
        (the exclusive claim is the first descriptor's)."""
        sector = blockdev.sector_size(fd)
        if sector <= 0 or BLOCK % sector:
            return None
        try:
            return os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
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
        if self.capacity is not None:
            blockdev.require_fits(size, self.capacity, f"the slot {self.path}")
        skip = self._make_zeros(out.fileno(), size)
        if not self._block_device and os.fstat(out.fileno()).st_size < size:
            os.ftruncate(out.fileno(), size)  # skipped zeros at the end read as zeros too
        self._expected = (size, sha256.lower())
        if not self.verify:
            return copy_chunks(out, chunks, size, skip_zeros=skip, progress=self.progress,
                               sync_every=self.sync_every, direct_fd=self._direct)
        # The read-back follows the writeback: each window is read from the device once it
        # got there, while the next ones are written; the rest after the final fsync.
        with _ReadBack(self.path, size) as readback:
            stats = copy_chunks(out, chunks, size, skip_zeros=skip, progress=self.progress,
                                sync_every=self.sync_every, on_durable=readback.allow,
                                direct_fd=self._direct)
            digest = readback.finish(self.progress)
        self._check(digest)
        return stats

    def _make_zeros(self, fd: int, size: int) -> bool:
        """Make [0, size) read zeros if that is cheap; True when it did."""
        if size == 0:
            return False
        if self._block_device:
            if blockdev.queue_limit(self.path, "write_zeroes_max_bytes") <= 0:
                return False
            sector = blockdev.sector_size(fd)
            length = -(-size // sector) * sector
            if self.capacity is not None:
                length = min(length, self.capacity)
            return blockdev.zero_out(fd, length)
        end = os.fstat(fd).st_size
        if end == 0:
            return True  # a new or empty file reads zeros everywhere
        return _libc_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, min(end, size))

    def verify_readback(self) -> None:
        """Read the written bytes from the device itself and compare their sha256."""
        if self._expected is None:
            raise OperationalError("nothing written to verify")
        with _ReadBack(self.path, self._expected[0]) as readback:
            self._check(readback.finish(self.progress))

    def _check(self, digest: str) -> None:
        assert self._expected is not None
        expected = self._expected[1]
        if digest != expected:
            raise OperationalError(
                f"read-back of {self.path} does not match what was written "
                f"(sha256 {digest[:16]}..., expected {expected[:16]}...)",
                hint="the storage may be failing; the slot stays unbootable")


class _ReadBack:
    """sha256 of the first `size` bytes of a slot, read from the device (O_DIRECT, not the
    page cache) in a thread, up to what `allow` says has reached the device."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.done = 0  # bytes read and hashed
        self.limit = 0  # bytes that may be read
        self.digest = hashlib.sha256()
        self.error: OperationalError | None = None
        self.stop = False
        self.changed = threading.Condition()
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            self.direct = True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise OperationalError(f"cannot open {path}: {exc.strerror}") from None
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # tmpfs and friends
            self.direct = False
        self.thread = threading.Thread(target=self._run, name="abupgrade-readback", daemon=True)

    def __enter__(self) -> _ReadBack:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self.changed:
            self.stop = True
            self.changed.notify_all()
        self.thread.join()
        os.close(self.fd)

    def allow(self, limit: int) -> None:
        with self.changed:
            limit = self.size if limit >= self.size else limit - limit % BLOCK  # O_DIRECT
            self.limit = max(self.limit, limit)
            self.changed.notify_all()

    def finish(self, progress: Progress) -> str:
        """Read the rest (the caller made it durable) and return the hex digest."""
        progress.start("verify", self.size)
        try:
            self.allow(self.size)
            reported = 0
            while self.thread.is_alive() and self.done < self.size and self.error is None:
                with self.changed:
                    self.changed.wait(0.2)
                progress.advance(self.done - reported)
                reported = self.done
            progress.advance(self.done - reported)
        finally:
            progress.finish()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def _run(self) -> None:
        buf = mmap.mmap(-1, READ_CHUNK)  # page aligned, as O_DIRECT wants
        try:
            if not self.direct:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            with memoryview(buf) as view:
                while self.done < self.size:
                    with self.changed:
                        while not self.stop and self.limit <= self.done:
                            self.changed.wait()
                        if self.stop:
                            return
                        limit = self.limit
                    self._read(view, limit)
                    with self.changed:
                        self.changed.notify_all()
        except OperationalError as exc:
            self.error = exc
        finally:
            with contextlib.suppress(BufferError):
                buf.close()

    def _read(self, view: memoryview, limit: int) -> None:
        """Read and hash [done, limit): whole buffers, but never past `limit` before the end."""
        while self.done < limit and not self.stop:
            want = len(view) if limit == self.size else min(len(view), limit - self.done)
            try:
                n = os.preadv(self.fd, [view[:want]], self.done)
            except OSError as exc:
                raise OperationalError(f"read-back of {self.path} failed at byte "
                                       f"{self.done:,}: {exc.strerror}") from None
            if n <= 0:
                raise OperationalError(f"read-back of {self.path} ended at byte "
                                       f"{self.done:,} of {self.size:,}")
            take = min(n, limit - self.done)
            self.digest.update(view[:take])
            self.done += take
