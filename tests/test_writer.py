"""writer.py: the core on plain files and in memory, the block-device layer on loop devices."""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from abupgrade.disk import attached, mounted
from abupgrade.errors import ImageRejected, OperationalError, PolicyRefusal
from abupgrade.image.keys import Keyring
from abupgrade.image.reader import ImageReader
from abupgrade.partitions import LINUX_FS, PartitionSpec, TableKind, create_table
from abupgrade.progress import NullProgress
from abupgrade.writer import BLOCK, CHUNK, ReadsInto, SlotWriter, _read_back, _runs, copy_chunks
from fixtures.images import KeyPair, signed_image
from fixtures.tiers import needs

MiB = 1024 * 1024


def payload(size: int = 5 * MiB + 123, seed: int = 1) -> bytes:
    """Random data with long zero runs (holes), like a filesystem image."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    data[MiB : 3 * MiB] = bytes(2 * MiB)  # a whole-chunk hole
    data[3 * MiB + 8192 : 3 * MiB + 5 * 4096] = bytes(3 * 4096)  # holes inside a chunk
    data[-100:] = bytes(100)  # zero tail
    return bytes(data)


def chunked(data: bytes, sizes: tuple[int, ...] = (777, 65537, 4096, 1 << 20)) -> Iterator[bytes]:
    at, i = 0, 0
    while at < len(data):
        n = sizes[i % len(sizes)]
        yield data[at : at + n]
        at, i = at + n, i + 1


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Watched:
    """A chunk iterator that records whether anything was taken from it."""

    def __init__(self, data: bytes) -> None:
        self.taken = False
        self._it = chunked(data)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        self.taken = True
        return next(self._it)


# ---------------------------------------------------------------- the core, plain files


def test_core_in_memory() -> None:
    data = payload()
    out = io.BytesIO()
    stats = copy_chunks(out, chunked(data), len(data))
    assert out.getvalue() == data
    assert (stats.written, stats.skipped) == (len(data), 0)


def test_core_length_checks() -> None:
    data = payload(MiB)
    with pytest.raises(ImageRejected, match="longer"):
        copy_chunks(io.BytesIO(), chunked(data), len(data) - 1)
    with pytest.raises(ImageRejected, match="ended after"):
        copy_chunks(io.BytesIO(), chunked(data), len(data) + 1)


def test_plain_file_bytes_equal_and_holes_skipped(tmp_path: Path) -> None:
    data = payload()
    target = tmp_path / "slot.img"
    with SlotWriter(target) as writer:
        stats = writer.write_payload(len(data), sha(data), chunked(data))
    assert target.read_bytes() == data
    assert stats.skipped == 2 * MiB  # the long zero run; the 12 KiB one is written
    assert stats.written + stats.skipped == len(data)
    assert target.stat().st_blocks * 512 < len(data) - 2 * MiB + 4096  # the long run is a hole


def test_plain_file_old_content_is_zeroed(tmp_path: Path) -> None:
    data = payload()
    target = tmp_path / "slot.img"
    target.write_bytes(b"\xff" * (len(data) + MiB))
    with SlotWriter(target) as writer:
        writer.write_payload(len(data), sha(data), chunked(data))
    assert target.read_bytes()[: len(data)] == data


def test_compare_writes_only_the_blocks_that_differ(tmp_path: Path) -> None:
    """The delta path's mode: what the target already holds is read, compared, not written."""
    data = payload()
    old = bytearray(data)
    for at in (0, 5 * 4096, 3 * MiB + 8192):  # three blocks differ (one in the zero run)
        old[at:at + 4096] = os.urandom(4096)
    target = tmp_path / "slot.img"
    target.write_bytes(bytes(old) + b"\xff" * MiB)
    with SlotWriter(target) as writer:
        stats = writer.write_payload(len(data), sha(data), chunked(data), compare=True)
    assert target.read_bytes()[: len(data)] == data
    assert stats.written == 3 * 4096 and stats.reused == len(data) - 3 * 4096


def test_oversized_is_refused_before_any_byte(tmp_path: Path) -> None:
    data = payload(2 * MiB)
    target = tmp_path / "slot.img"
    target.write_bytes(b"\xaa" * MiB)
    chunks = Watched(data)
    with SlotWriter(target, capacity=MiB) as writer, pytest.raises(PolicyRefusal) as err:
        writer.write_payload(len(data), sha(data), chunks)
    assert err.value.exit_code == 4 and "larger than the slot" in err.value.message
    assert not chunks.taken
    assert target.read_bytes() == b"\xaa" * MiB


def test_readback_catches_corruption(tmp_path: Path) -> None:
    data = payload()
    target = tmp_path / "slot.img"
    with SlotWriter(target, verify=False) as writer:
        writer.write_payload(len(data), sha(data), chunked(data))
        writer.verify_readback()  # intact: passes
        fd = os.open(target, os.O_WRONLY)
        os.pwrite(fd, b"\x00\x01", 4 * MiB + 5)
        os.close(fd)
        with pytest.raises(OperationalError, match="read-back"):
            writer.verify_readback()


@pytest.mark.parametrize("digest", ["blake3", "sha256"])
def test_tampered_payload_fails_the_write(tmp_path: Path, signer: KeyPair, digest: str) -> None:
    """The read-back checks the device against the stream; the stream itself is checked
    against the signed manifest by the reader as it is written: one byte changed in the
    image fails the write before anything is read back or reported written - with the
    BLAKE3 digest of a format 3 image, and with the SHA-256 of an older one."""
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(payload())
    image = signed_image(tmp_path / "image.tar", rootfs, signer, version="1",
                         blake3=digest == "blake3")
    raw = bytearray(image.read_bytes())
    at = raw.index(rootfs.read_bytes()[4 * MiB : 4 * MiB + 64])
    raw[at] ^= 1
    image.write_bytes(bytes(raw))
    target = tmp_path / "slot.img"
    with image.open("rb") as stream:
        reader = ImageReader(stream, Keyring.from_files([signer.public]))
        (item, chunks), = [next(reader.payloads())]
        assert item.digest_name == digest
        with SlotWriter(target) as writer, pytest.raises(ImageRejected, match=digest):
            writer.write_payload(item.size, item.sha256, chunks)
    with pytest.raises(OperationalError, match="nothing written"):
        writer.verify_readback()


def test_checksum_is_of_the_stream(tmp_path: Path) -> None:
    """The read-back's expectation comes from the streamed bytes, not from what the writer
    made of them: it is their xxh3 whatever the chunking, zero runs included."""
    data = payload()
    with SlotWriter(tmp_path / "slot.img") as writer:
        stats = writer.write_payload(len(data), sha(data), chunked(data, (4096 * 3 + 1, 17)))
    assert stats.checksum == xxhash.xxh3_128(data).hexdigest()


def test_zero_runs_are_those_of_a_block_by_block_reading() -> None:
    """The writer finds zero blocks by testing whole stretches and halving mixed ones: the
    runs must be exactly those a reading of every 4 KiB block gives (a short last block
    included), whatever the data looks like."""
    rng = random.Random(7)

    def by_block(data: bytes) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        for at in range(0, len(data), BLOCK):
            end = min(at + BLOCK, len(data))
            zero = data.count(0, at, end) == end - at
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], end, zero)
            else:
                runs.append((at, end, zero))
        return runs

    buffer = mmap.mmap(-1, CHUNK)
    for _ in range(400):
        length = rng.choice([CHUNK, rng.randrange(1, CHUNK), rng.randrange(1, 6 * BLOCK)])
        data = bytearray(length) if rng.random() < 0.6 else bytearray(rng.randbytes(length))
        for _ in range(rng.randrange(0, 8)):  # stretches of the other kind, anywhere
            at = rng.randrange(length)
            end = min(length, at + rng.randrange(1, 3 * BLOCK))
            data[at:end] = rng.randbytes(end - at) if not any(data[at:end]) else bytes(end - at)
        for _ in range(rng.randrange(0, 3)):  # a lone byte, often a block's last
            at = min(length - 1, rng.randrange(length // BLOCK + 1) * BLOCK + rng.choice((-1, 0, 7)))
            data[max(at, 0)] = rng.randrange(1, 256)
        buffer[:length] = data
        assert _runs(buffer, length) == by_block(bytes(data)), length


@pytest.mark.parametrize("compression", ["none", "zstd", "gzip"])
def test_reader_fills_the_writer_buffers(tmp_path: Path, signer: KeyPair, compression: str
                                         ) -> None:
    """An image's payload fills the writer's own buffers (no copy for a stored one): the
    slot gets its bytes, and the read-back checksum is of those bytes."""
    data = payload(9 * MiB + 5)
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(data)
    image = signed_image(tmp_path / "image.tar", rootfs, signer, version="1",
                         compression=compression, index=False)
    target = tmp_path / "slot.img"
    with image.open("rb") as stream:
        reader = ImageReader(stream, Keyring.from_files([signer.public]))
        (item, chunks), = [next(reader.payloads())]
        assert isinstance(chunks, ReadsInto)
        with SlotWriter(target) as writer:
            stats = writer.write_payload(item.size, item.sha256, chunks)
    assert target.read_bytes()[: len(data)] == data
    assert stats.checksum == xxhash.xxh3_128(data).hexdigest()


def test_read_back_error_in_its_thread_reaches_the_caller(tmp_path: Path) -> None:
    """The read-back reads in a thread of its own; what goes wrong there (here: the slot is
    shorter than the payload) fails the caller's check, and nothing is left running."""
    short = tmp_path / "short.img"
    short.write_bytes(bytes(3 * MiB))
    threads = threading.active_count()
    with pytest.raises(OperationalError, match="ended at byte 3,145,728 of 5,242,880"):
        _read_back(short, 5 * MiB, NullProgress())
    assert threading.active_count() == threads


def test_interrupt_leaves_nothing_open(tmp_path: Path) -> None:
    def interrupted() -> Iterator[bytes]:
        yield bytes(range(256)) * 4096
        raise KeyboardInterrupt

    before = set(os.listdir("/proc/self/fd"))
    writer = SlotWriter(tmp_path / "slot.img")
    with pytest.raises(KeyboardInterrupt), writer:
        writer.write_payload(4 * MiB, "0" * 64, interrupted())
    assert writer._file is None
    assert set(os.listdir("/proc/self/fd")) <= before


# ---------------------------------------------------------------- block devices (loop)


@pytest.fixture
def loop_slot(tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    """(partition device, backing image, partition offset) of an 8 MiB slot full of 0xff."""
    needs(loop=True)
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MiB)
    table = create_table(image, TableKind.GPT, [PartitionSpec(8 * MiB, LINUX_FS, "slot")])
    start = table.get(1).start
    with image.open("r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 8 * MiB)
    with attached(image) as disk:
        yield disk.partitions[1], image, start


def image_bytes(image: Path, start: int, size: int) -> bytes:
    with image.open("rb") as f:
        f.seek(start)
        return f.read(size)


@pytest.mark.loop
def test_loop_bytes_equal_holes_read_zero(loop_slot: tuple[Path, Path, int]) -> None:
    device, image, start = loop_slot
    data = payload()
    with SlotWriter(device) as writer:
        stats = writer.write_payload(len(data), sha(data), chunked(data))
    assert image_bytes(image, start, len(data)) == data
    assert device.read_bytes()[: len(data)] == data
    offload = Path(f"/sys/class/block/{device.name}/../queue/write_zeroes_max_bytes")
    if int(offload.read_text()) > 0:
        assert stats.skipped >= 2 * MiB
    else:
        assert stats.skipped == 0


@pytest.mark.loop
def test_loop_oversized_refused_before_any_byte(loop_slot: tuple[Path, Path, int]) -> None:
    device, image, start = loop_slot
    data = payload(8 * MiB + 4096)
    chunks = Watched(data)
    with SlotWriter(device) as writer, pytest.raises(PolicyRefusal, match="larger than the slot"):
        writer.write_payload(len(data), sha(data), chunks)
    assert not chunks.taken
    assert image_bytes(image, start, 8 * MiB) == b"\xff" * 8 * MiB


@pytest.mark.loop
def test_loop_readback_reads_the_device(loop_slot: tuple[Path, Path, int]) -> None:
    device, image, start = loop_slot
    data = payload()
    with SlotWriter(device, verify=False) as writer:
        writer.write_payload(len(data), sha(data), chunked(data))
        writer.verify_readback()
        # corrupt behind the device's back: through the backing file
        fd = os.open(image, os.O_WRONLY)
        os.pwrite(fd, b"\x5a", start + 3 * MiB + 4096 + 7)
        os.fsync(fd)
        os.close(fd)
        with pytest.raises(OperationalError, match="does not match"):
            writer.verify_readback()


@pytest.mark.loop
def test_loop_compare_reads_the_device_not_a_stale_page(
        loop_slot: tuple[Path, Path, int]) -> None:
    """Compare mode (a delta update) decides what to skip from the device's bytes: a page of
    the slot cached before the disk changed another way (here through the loop device's
    backing file) must not pass for them."""
    device, image, start = loop_slot
    data = payload()
    with SlotWriter(device) as writer:
        writer.write_payload(len(data), sha(data), chunked(data))
    with device.open("rb") as held:  # kept open: the partition's page cache stays
        assert held.read(len(data)) == data  # cached now
        fd = os.open(image, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x5a" * 10, start + 3 * MiB + 8192 + 5)  # the device changes
            os.fsync(fd)
        finally:
            os.close(fd)
        held.seek(3 * MiB + 8192)
        assert held.read(4096) == data[3 * MiB + 8192:3 * MiB + 12288]  # the page is stale
        with SlotWriter(device) as writer:
            stats = writer.write_payload(len(data), sha(data), chunked(data), compare=True)
    assert stats.written == 4096 and stats.reused == len(data) - 4096
    assert image_bytes(image, start, len(data)) == data


@pytest.mark.loop
def test_loop_mounted_slot_is_refused(loop_slot: tuple[Path, Path, int]) -> None:
    device, _, _ = loop_slot
    subprocess.run(["mkfs.ext4", "-q", "-F", str(device)], check=True)
    with mounted(device, readonly=True), pytest.raises(PolicyRefusal) as err:
        SlotWriter(device).__enter__()
    assert err.value.exit_code == 4


class ChangeAtReadBack:
    """A progress sink that changes bytes of the slot behind the device's back (through the
    loop device's backing file) as the read-back begins, after every write and the final
    flush: what the read-back meets on a device that lost or never stored those bytes."""

    def __init__(self, image: Path, at: int, data: bytes) -> None:
        self.image, self.at, self.data = image, at, data
        self.done = False

    def start(self, label: str, total: int) -> None:
        if label == "verify" and not self.done:
            fd = os.open(self.image, os.O_WRONLY)
            try:
                os.pwrite(fd, self.data, self.at)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.done = True

    def advance(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass


@pytest.mark.loop
def test_loop_zero_runs_are_holes_on_a_tmpfs_backed_device(tmp_path: Path) -> None:
    """A loop device on tmpfs takes no BLKZEROOUT (tmpfs has no FALLOC_FL_ZERO_RANGE), but
    it punches holes: zero runs must become holes in its file, not written zeros (the
    device's own write-zeroes, which the kernel guarantees and never emulates)."""
    needs(loop=True)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("this test needs a tmpfs at /dev/shm")
    backing = shm / f"abupgrade-test-{os.getpid()}.img"
    data = payload()
    try:
        backing.write_bytes(b"")
        os.truncate(backing, 16 * MiB)
        start = create_table(backing, TableKind.GPT,
                             [PartitionSpec(8 * MiB, LINUX_FS, "slot")]).get(1).start
        with backing.open("r+b") as f:
            f.seek(start)
            f.write(b"\xff" * 8 * MiB)
        allocated = os.stat(backing).st_blocks * 512
        with attached(backing) as disk, SlotWriter(disk.partitions[1]) as writer:
            stats = writer.write_payload(len(data), sha(data), chunked(data))
        assert stats.skipped == 2 * MiB  # the whole-chunk hole; shorter runs are written
        assert image_bytes(backing, start, len(data)) == data
        assert os.stat(backing).st_blocks * 512 == allocated - 2 * MiB  # a hole, not zeros
    finally:
        backing.unlink(missing_ok=True)


@pytest.mark.loop
def test_loop_byte_changed_after_the_write_is_caught(loop_slot: tuple[Path, Path, int]) -> None:
    device, image, start = loop_slot
    data = payload()
    sink = ChangeAtReadBack(image, start + 4 * MiB + 777, b"\x5a")
    # flush windows of 1 MiB: a read-back that followed the writer would have passed the
    # changed byte before it changed; every byte must be read after the last write
    with SlotWriter(device, sink, sync_every=MiB) as writer, pytest.raises(OperationalError) as err:
        writer.write_payload(len(data), sha(data), chunked(data))
    assert sink.done and "does not match" in err.value.message
    with SlotWriter(device) as writer:  # the same write, left alone, passes
        writer.write_payload(len(data), sha(data), chunked(data))


@pytest.mark.loop
def test_loop_zeroed_range_that_is_not_zero_is_caught(loop_slot: tuple[Path, Path, int]) -> None:
    """The long zero run (1-3 MiB) is zeroed, not written, where the device offloads it;
    the read-back reads it like the rest: a range that does not read zeros fails."""
    device, image, start = loop_slot
    data = payload()
    with SlotWriter(device) as writer:
        stats = writer.write_payload(len(data), sha(data), chunked(data))
    offload = Path(f"/sys/class/block/{device.name}/../queue/write_zeroes_max_bytes")
    assert stats.skipped == (2 * MiB if int(offload.read_text()) > 0 else 0)
    sink = ChangeAtReadBack(image, start + 2 * MiB + 4096 * 5, b"\xff" * 3)
    with SlotWriter(device, sink, sync_every=MiB) as writer, pytest.raises(OperationalError) as err:
        writer.write_payload(len(data), sha(data), chunked(data))
    assert sink.done and "does not match" in err.value.message
