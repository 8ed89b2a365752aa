"""Streaming bytes into a slot.

The core (`copy_chunks`) takes a payload as a stream of authenticated chunks (the image reader
hashed each one against the signed manifest) and writes it into any seekable file object. It
gathers them into page-aligned buffers (a reader with `readinto` fills them itself) and hands
those, as (offset, buffer) extents, to a writer thread, which takes a fast checksum (xxh3-128)
of the same bytes in offset order, skips all-zero blocks where the target is known to read
zeros and writes the rest.
`SlotWriter` adds the rules for a real slot on top: exclusive open, capacity check before the
first byte, making the target read zeros where the device guarantees it, O_DIRECT writes,
periodic flushes and a final one, then a read-back of every byte of the payload's range -
written and zeroed alike - from the device (O_DIRECT, not the page cache), whose checksum
must equal the stream's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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
from typing import BinaryIO, Protocol, runtime_checkable

import xxhash

from abupgrade import blockdev
from abupgrade.errors import ImageRejected, Interrupted, OperationalError, PolicyRefusal
from abupgrade.progress import NullProgress, Progress

BLOCK = 4096  # zero detection granularity (the usual filesystem block)
CHUNK = 4 * 1024 * 1024  # bytes gathered before a write: one request in flight of several bios
ZERO_MIN = 256 * 1024  # shorter zero runs are written: one write beats splitting extents
SYNC_EVERY = 64 * 1024 * 1024  # flush window: keeps dirty memory flat
READ_CHUNK = 4 * 1024 * 1024

_libc_fallocate = blockdev.fallocate  # punches the holes in a plain file (tests record it)
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_SOURCE = mmap.mmap(-1, CHUNK, prot=mmap.PROT_READ)  # zeros to write, page aligned, no RSS
_ZEROS = memoryview(_ZERO_SOURCE)


def checksum() -> xxhash.xxh3_128:
    """The read-back checksum: xxh3-128, taken of the authenticated stream and of the bytes
    read back from the device. It proves the device returned what was streamed, not who
    made the stream: that is the signed manifest's sha256, checked by the image reader."""
    return xxhash.xxh3_128()


@dataclass(frozen=True)
class WriteStats:
    size: int  # payload bytes
    written: int  # bytes actually written
    skipped: int  # all-zero bytes not written because the target already reads zeros there
    seconds: float
    checksum: str  # xxh3-128 (hex) of the payload's bytes as they were streamed
    reused: int = 0  # bytes the target already held (compare mode): read, not written


@runtime_checkable
class ReadsInto(Protocol):
    """A source that fills a caller's buffer: `readinto(view)` returns the bytes it put
    there, 0 at the end (an image's PayloadChunks, which has checked them by then)."""

    def readinto(self, view: memoryview, /) -> int: ...


def copy_chunks(
    out: BinaryIO,
    chunks: Iterable[bytes | bytearray | memoryview] | ReadsInto,
    size: int,
    *,
    zero: Callable[[int, int], bool] | None = None,
    progress: Progress | None = None,
    sync_every: int = SYNC_EVERY,
    direct_fd: int | None = None,
    compare_fd: int | None = None,
) -> WriteStats:
    """Write exactly `size` bytes from `chunks` to `out` from offset 0.

    The caller's thread gathers the chunks (reading and hashing the image) into the writer's
    buffers, while a writer thread takes their checksum, in offset order, and writes them. A
    source with `readinto` (see ReadsInto) fills the buffers itself, with no copy; other chunks
    are copied into them. With `zero(offset, length)`, which makes a range of the target read
    zeros (True) or cannot (False), runs of all-zero 4 KiB blocks of at least ZERO_MIN bytes
    are zeroed instead of written. Every `sync_every` bytes the writes are flushed. More or
    fewer bytes than `size` is ImageRejected. `direct_fd`, the same target opened with
    O_DIRECT, takes the block-aligned writes past the page cache (an unaligned tail goes
    through `out`). With `compare_fd`, the target opened for reading, each 4 KiB block is
    compared with what the target holds and written only where it differs (a delta update:
    flash wear); zero runs are then compared like any data.
    """
    progress = progress or NullProgress()
    started = time.monotonic()
    progress.start("write", size)
    try:
        behind = _WriteBehind(out, sync_every, direct=direct_fd is not None)
        with _WriterThread(out, size, None if compare_fd is not None else zero, behind,
                           direct_fd, compare_fd) as writer:
            if isinstance(chunks, ReadsInto):
                pos = _fill_from(chunks, writer, size, progress)
            else:
                pos = _gather(chunks, writer, size, progress)
            if pos != size:
                raise ImageRejected(f"payload ended after {pos:,} of its declared {size:,} bytes")
            writer.drain()
        _sync(out)
    finally:
        progress.finish()
    return WriteStats(size, writer.written, size - writer.written, time.monotonic() - started,
                      writer.digest.hexdigest(), writer.reused)


def _runs(buffer: mmap.mmap, length: int) -> list[tuple[int, int, bool]]:
    """The first `length` bytes of `buffer` as runs (start, end, all zero) of whole 4 KiB
    blocks (the last one may be short), neighbours of a kind merged. Whole stretches are
    tested at once (a search for zeros as long as the stretch runs at memcmp's speed) and
    only mixed ones are halved: a buffer of data or of zeros costs one or two searches."""
    runs: list[tuple[int, int, bool]] = []

    def add(start: int, end: int, zero: bool) -> None:
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], end, zero)
        else:
            runs.append((start, end, zero))

    def split(start: int, end: int) -> None:  # whole blocks
        if buffer.find(_ZERO_BLOCK, start, end) < 0:
            add(start, end, False)  # not even one block's worth of zeros in a row
        elif buffer.find(_ZEROS[: end - start], start, end) == start:
            add(start, end, True)
        else:  # two blocks at least: one of them is zero, one is not
            middle = start + (end - start) // BLOCK // 2 * BLOCK
            split(start, middle)
            split(middle, end)

    whole = length // BLOCK * BLOCK
    if whole:
        split(0, whole)
    if whole < length:
        add(whole, length, buffer.find(_ZEROS[: length - whole], whole, length) == whole)
    return runs


def _too_long(size: int) -> ImageRejected:
    return ImageRejected(f"payload is longer than its declared {size:,} bytes")


def _fill_from(source: ReadsInto, writer: _WriterThread, size: int, progress: Progress) -> int:
    """Let `source` fill the writer's buffers; the bytes handed to the writer."""
    pos = 0
    while True:
        buffer = writer.take_buffer()
        fill = 0
        with memoryview(buffer) as view:
            while fill < CHUNK and (n := source.readinto(view[fill:])):
                fill += n
        if pos + fill > size:
            writer.give_back(buffer)
            raise _too_long(size)
        if not fill:
            writer.give_back(buffer)
            return pos
        writer.put(buffer, pos, fill)
        progress.advance(fill)
        pos += fill


def _gather(chunks: Iterable[bytes | bytearray | memoryview], writer: _WriterThread, size: int,
            progress: Progress) -> int:
    """Copy `chunks` into the writer's buffers; the bytes handed to the writer."""
    pos = 0  # bytes handed to the writer so far
    buffer = writer.take_buffer()
    fill = 0
    for chunk in chunks:
        data = memoryview(chunk).cast("B")
        if pos + fill + len(data) > size:
            raise _too_long(size)
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
    else:
        writer.give_back(buffer)
    return pos


class _WriterThread:
    """Writes gathered extents - (offset, buffer, length) - in a thread of its own, so that
    the writes (and waiting for the device) overlap with reading and hashing the next chunks.
    A few page-aligned buffers go round between the two threads: memory stays flat, and
    O_DIRECT writes go straight from them. An error in the thread is raised in the caller's
    at its next `put` or `drain`."""

    BUFFERS = 2  # one being filled, one being written

    def __init__(self, out: BinaryIO, size: int, zero: Callable[[int, int], bool] | None,
                 behind: _WriteBehind, direct_fd: int | None = None,
                 compare_fd: int | None = None) -> None:
        self.out = out
        self.size = size
        self.compare_fd = compare_fd  # the target, read: only blocks that differ are written
        self.current = mmap.mmap(-1, CHUNK) if compare_fd is not None else None
        self.reused = 0
        self.zero = zero
        self.direct_fd = direct_fd
        self.behind = behind
        self.written = 0
        self.digest = checksum()  # of every extent's bytes, taken here, off the reading thread
        self.zeros_from: int | None = None  # a run of zero blocks not yet zeroed starts here
        self.error: BaseException | None = None
        self.buffers = [mmap.mmap(-1, CHUNK) for _ in range(self.BUFFERS)]
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for buffer in self.buffers:
            self.free.put(buffer)
        self.work: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
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
        for buffer in self.buffers:
            with contextlib.suppress(BufferError):  # a view the caller still holds
                buffer.close()
        if self.current is not None:
            self.current.close()

    def take_buffer(self) -> mmap.mmap:
        return self.free.get()

    def give_back(self, buffer: mmap.mmap) -> None:
        """Return a buffer taken and not put."""
        self.free.put(buffer)

    def put(self, buffer: mmap.mmap, offset: int, length: int) -> None:
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
                    with memoryview(buffer) as view:  # in offset order: the stream's checksum
                        self.digest.update(view[:length])
                    self._write(buffer, offset, length)
                    if offset + length == self.size:
                        self._settle_zeros(self.size)
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

    def _write(self, buffer: mmap.mmap, offset: int, length: int) -> None:
        """Write one extent: its data runs, and its zero runs as zeroed ranges."""
        if self.compare_fd is not None:
            self._write_changed(buffer, offset, length)
            return
        with memoryview(buffer) as view:
            if self.zero is None:
                self._put(view[:length], offset)
                return
            for start, end, zero in _runs(buffer, length):
                if zero:
                    if self.zeros_from is None:
                        self.zeros_from = offset + start
                else:
                    self._settle_zeros(offset + start)
                    self._put(view[start:end], offset + start)

    def _write_changed(self, buffer: mmap.mmap, offset: int, length: int) -> None:
        """Write the 4 KiB blocks of one extent that differ from what the target holds."""
        assert self.current is not None and self.compare_fd is not None
        with memoryview(self.current) as current, memoryview(buffer) as view:
            whole = -(-length // BLOCK) * BLOCK  # an O_DIRECT read takes whole blocks
            held = os.preadv(self.compare_fd, [current[:whole]], offset)
            if held >= length and current[:length] == view[:length]:
                self.reused += length  # the whole extent is there already
                return
            run_from = None  # start of the run of blocks that differ
            for at in range(0, length, BLOCK):
                end = min(at + BLOCK, length)
                if end <= held and self.current[at:end] == buffer[at:end]:
                    self.reused += end - at
                    if run_from is not None:
                        self._put(view[run_from:at], offset + run_from)
                        run_from = None
                elif run_from is None:
                    run_from = at
            if run_from is not None:
                self._put(view[run_from:length], offset + run_from)

    def _settle_zeros(self, end: int) -> None:
        """Make the pending zero run [zeros_from, end) read zeros: zeroed when long enough
        and the target can, else written."""
        start, self.zeros_from = self.zeros_from, None
        if start is None:
            return
        assert self.zero is not None
        if end - start >= ZERO_MIN and self.zero(start, end - start):
            return
        while start < end:
            n = min(end - start, len(_ZEROS))
            self._put(_ZEROS[:n], start)
            start += n

    def _put(self, data: memoryview, offset: int) -> None:
        if self.direct_fd is not None and offset % BLOCK == 0 and len(data) % BLOCK == 0:
            done = 0  # O_DIRECT straight from the aligned buffer: no copy, nothing dirty
            while done < len(data):
                n = os.pwrite(self.direct_fd, data[done:], offset + done)
                if n <= 0 or n % BLOCK:
                    raise OperationalError(f"short direct write at byte {offset + done}")
                done += n
            self.written += done
            return
        self.out.seek(offset)
        while data:
            n = self.out.write(data)
            if not n:
                raise OperationalError(f"short write at byte {offset}")
            data, offset = data[n:], offset + n
            self.written += n


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


_libc = ctypes.CDLL(None, use_errno=True)  # the libc this process runs on
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


class _WriteBehind:
    """Flushes the writes window by window, so that dirty memory stays flat; the final fsync
    still makes everything durable.

    O_DIRECT writes (`direct`) sit in the device's own cache (for a loop device: its backing
    file's page cache), which only a flush empties: each full window is fsynced. Buffered
    writes sit in the page cache: each full window is handed to writeback at once
    (sync_file_range WRITE) and the window before it is waited for; where sync_file_range is
    not available, a full window is fsynced.
    """

    def __init__(self, out: BinaryIO, window: int, *, direct: bool = False) -> None:
        self.window = window
        self.direct = direct
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
        if self.direct or not self._range(*current, _SYNC_FILE_RANGE_WRITE):
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
        self, size: int, sha256: str, chunks: Iterable[bytes | bytearray | memoryview], *,
        compare: bool = False,
    ) -> WriteStats:
        """Write `size` bytes from `chunks`, fsync, then (unless verify=False) read back.

        `chunks` must be authenticated as they are consumed (ImageReader raises at their
        end when they do not hash to `sha256`); the read-back then proves that the device
        holds them: its checksum of [0, size) must equal the one of the stream.
        """
        out = self._file
        if out is None:
            raise OperationalError("SlotWriter used outside its with block")
        self._expected = None
        if self.capacity is not None:
            blockdev.require_fits(size, self.capacity, f"the slot {self.path}")
        if not self._block_device and os.fstat(out.fileno()).st_size < size:
            os.ftruncate(out.fileno(), size)  # a zeroed run at the end reads zeros too
        zero = self._zeroer(out.fileno())
        # compare: a delta update, whose target holds most of the payload already
        compare_fd = self._open_for_compare() if compare else None
        try:
            stats = copy_chunks(out, chunks, size, zero=zero, progress=self.progress,
                                sync_every=self.sync_every, direct_fd=self._direct,
                                compare_fd=compare_fd)
        finally:
            if compare_fd is not None:
                os.close(compare_fd)
        self._expected = (size, stats.checksum)
        if self.verify:
            self.verify_readback()
        return stats

    def _open_for_compare(self) -> int:
        """The target opened to read what it holds, from the device itself (O_DIRECT) where
        the writes bypass the page cache too: a page cached before an O_DIRECT write (or
        through another node of the same disk) must not pass for the device's bytes."""
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if self._direct is not None else 0)
        try:
            return os.open(self.path, flags)
        except OSError as exc:
            raise OperationalError(f"cannot read {self.path}: {exc.strerror}") from None

    def _zeroer(self, fd: int) -> Callable[[int, int], bool] | None:
        """How to make a range of the target read zeros without writing it, where the target
        guarantees that: the write-zeroes a device offloads (blockdev.zero_out), a punched
        hole in a file."""
        if not self._block_device:
            return lambda offset, length: _libc_fallocate(
                fd, blockdev.FALLOC_FL_PUNCH_HOLE | blockdev.FALLOC_FL_KEEP_SIZE, offset, length)
        if blockdev.queue_limit(self.path, "write_zeroes_max_bytes") <= 0:
            return None
        sector = blockdev.sector_size(fd)
        capacity = self.capacity

        def zero_out(offset: int, length: int) -> bool:
            end = -(-(offset + length) // sector) * sector  # a partial last sector: all of it
            if capacity is not None:
                end = min(end, capacity)
            return blockdev.zero_out(fd, end - offset, offset=offset)

        return zero_out

    def verify_readback(self) -> None:
        """Read [0, size) from the device itself, after the last write and the final flush,
        and compare its checksum with the stream's."""
        if self._expected is None:
            raise OperationalError("nothing written to verify")
        self._check(_read_back(self.path, self._expected[0], self.progress))

    def _check(self, digest: str) -> None:
        assert self._expected is not None
        expected = self._expected[1]
        if digest != expected:
            raise OperationalError(
                f"read-back of {self.path} does not match what was written "
                f"(xxh3 {digest[:16]}..., expected {expected[:16]}...)",
                hint="the storage may be failing; the slot stays unbootable")


def _read_back(path: Path, size: int, progress: Progress) -> str:
    """The checksum of the first `size` bytes of a slot, read from the device with O_DIRECT
    (not from the page cache) in large aligned reads; a thread reads the next piece while
    this one takes the checksum of the last."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise OperationalError(f"cannot open {path}: {exc.strerror}") from None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # tmpfs and friends: no O_DIRECT
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    digest = checksum()
    progress.start("verify", size)
    reader = _ReadAhead(fd, path, size)
    try:
        reader.thread.start()
        done = 0
        while done < size:
            buffer, n = reader.next()
            with memoryview(buffer) as view:
                digest.update(view[:n])
            reader.free.put(buffer)
            done += n
            progress.advance(n)
    finally:
        reader.stop()
        progress.finish()
        os.close(fd)
    return digest.hexdigest()


class _ReadAhead:
    """Reads [0, size) of `fd` in READ_CHUNK pieces into page-aligned buffers, in a thread
    of its own, one piece ahead of the consumer (`next`, then `free.put` the buffer back)."""

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self.fd, self.path, self.size = fd, path, size
        self.buffers = [mmap.mmap(-1, READ_CHUNK) for _ in range(2)]
        self.free: queue.Queue[mmap.mmap | None] = queue.Queue()
        for buffer in self.buffers:
            self.free.put(buffer)
        self.ready: queue.Queue[tuple[mmap.mmap, int] | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="abupgrade-readback",
                                       daemon=True)

    def next(self) -> tuple[mmap.mmap, int]:
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self.free.put(None)  # wakes the thread if it waits for a buffer
        if self.thread.ident is not None:  # started
            self.thread.join()
        for buffer in self.buffers:
            buffer.close()

    def _run(self) -> None:
        done = 0
        try:
            while done < self.size and (buffer := self.free.get()) is not None:
                with memoryview(buffer) as view:
                    try:
                        n = os.preadv(self.fd, [view], done)
                    except OSError as exc:
                        raise OperationalError(f"read-back of {self.path} failed at byte "
                                               f"{done:,}: {exc.strerror}") from None
                if n <= 0:
                    raise OperationalError(f"read-back of {self.path} ended at byte {done:,} "
                                           f"of {self.size:,}")
                n = min(n, self.size - done)
                self.ready.put((buffer, n))
                done += n
        except BaseException as exc:  # handed to the consumer
            self.ready.put(exc)
