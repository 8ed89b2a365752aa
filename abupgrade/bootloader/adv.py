"""The syslinux Auxiliary Data Vector (ADV): read and written natively.

The ADV is the last 1024 bytes of `ldlinux.sys`: two identical 512-byte copies, each

    u32 magic1 | u32 checksum | 500 bytes of records | u32 magic3      (little endian)

where the checksum makes the sum of the 32-bit words from offset 4 to 508 equal magic2, and
the records are `tag, length, data` (tag 0 ends the list). Tag 1 (boot-once) holds a command
line that syslinux runs on the next boot, after it has cleared the tag itself.

`extlinux --install` records the sectors of those two copies in the boot code, so the ADV is
always rewritten in place, never by rename. A write puts copy 1 on disk, syncs, then copy 2
and syncs again: a power cut tears at most one copy, and a reader (syslinux at boot, extlinux,
and `read` here) takes the first copy whose magics and checksum hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from abupgrade import fsutil
from abupgrade.errors import OperationalError

ADV_SIZE = 512
ADV_LEN = ADV_SIZE - 3 * 4
MAGIC1 = 0x5A2D2FA5
MAGIC2 = 0xA3041767
MAGIC3 = 0xDD28BF64

TAG_END = 0
TAG_BOOTONCE = 1
TAG_MENUSAVE = 2

# <linux/fs.h>: ldlinux.sys is installed immutable; it must be lifted for an in-place write.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x00000010


@dataclass(frozen=True)
class Adv:
    """The records of one ADV, in order; the empty ADV is what `--reset-adv` writes."""

    records: tuple[tuple[int, bytes], ...] = ()

    def get(self, tag: int) -> bytes | None:
        for record_tag, data in self.records:
            if record_tag == tag:
                return data
        return None

    def with_record(self, tag: int, data: bytes | None) -> Adv:
        """This ADV with `tag` replaced by `data` (removed when `data` is None or empty)."""
        if not 1 <= tag <= 255:
            raise ValueError(f"ADV tag {tag} is out of range 1..255")
        if data is not None and len(data) > 255:
            raise ValueError(f"ADV record of {len(data)} bytes is longer than 255")
        kept = tuple(r for r in self.records if r[0] != tag)
        return Adv(kept + ((tag, data),) if data else kept)

    @property
    def once(self) -> str | None:
        """The boot-once command line, if one is set."""
        data = self.get(TAG_BOOTONCE)
        return data.decode("latin-1") if data else None

    def with_once(self, command: str | None) -> Adv:
        return self.with_record(TAG_BOOTONCE, command.encode("latin-1") if command else None)

    def encode(self) -> bytes:
        """One 512-byte copy."""
        body = b"".join(bytes((tag, len(data))) + data for tag, data in self.records)
        if len(body) > ADV_LEN:
            raise ValueError(f"ADV records need {len(body)} bytes, only {ADV_LEN} fit")
        body = body.ljust(ADV_LEN, b"\0")
        checksum = (MAGIC2 - sum(struct.unpack(f"<{ADV_LEN // 4}I", body))) & 0xFFFFFFFF
        return struct.pack("<II", MAGIC1, checksum) + body + struct.pack("<I", MAGIC3)

    def encode_pair(self) -> bytes:
        copy = self.encode()
        return copy + copy

    @classmethod
    def decode(cls, copy: bytes) -> Adv | None:
        """The ADV in one 512-byte copy, or None when its magics or checksum fail."""
        if len(copy) != ADV_SIZE:
            return None
        magic1, = struct.unpack_from("<I", copy, 0)
        magic3, = struct.unpack_from("<I", copy, ADV_SIZE - 4)
        words = struct.unpack_from(f"<{(ADV_SIZE - 8) // 4}I", copy, 4)
        if magic1 != MAGIC1 or magic3 != MAGIC3 or sum(words) & 0xFFFFFFFF != MAGIC2:
            return None
        records: list[tuple[int, bytes]] = []
        pos, end = 8, ADV_SIZE - 4
        while pos + 2 <= end and copy[pos] != TAG_END:
            tag, length = copy[pos], copy[pos + 1]
            if pos + 2 + length > end:
                break  # a record running past the end: syslinux stops there too
            records.append((tag, bytes(copy[pos + 2 : pos + 2 + length])))
            pos += 2 + length
        return cls(tuple(records))

    @classmethod
    def decode_pair(cls, pair: bytes) -> Adv | None:
        """The first valid copy of the two, or None when neither holds."""
        for index in (0, 1):
            adv = cls.decode(pair[index * ADV_SIZE : (index + 1) * ADV_SIZE])
            if adv is not None:
                return adv
        return None


def write_order(old_pair: bytes, new: Adv) -> Iterator[tuple[int, bytes]]:
    """The (offset within the pair, bytes) writes of an update, in order, each one synced
    before the next; copies that already hold the new bytes are skipped."""
    copy = new.encode()
    for index in (0, 1):
        if old_pair[index * ADV_SIZE : (index + 1) * ADV_SIZE] != copy:
            yield index * ADV_SIZE, copy


def _adv_offset(fd: int, path: Path) -> int:
    size = os.fstat(fd).st_size
    if size < 2 * ADV_SIZE:
        raise OperationalError(f"{path} is too small to hold an ADV ({size} bytes)",
                               hint="reinstall the bootloader: extlinux --install DIR")
    return size - 2 * ADV_SIZE


def read_pair(path: Path) -> bytes:
    """The raw 1024 bytes of both copies."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise OperationalError(f"cannot read the syslinux ADV in {path}: {exc.strerror}",
                               hint="is the boot partition mounted?") from None
    try:
        return os.pread(fd, 2 * ADV_SIZE, _adv_offset(fd, path))
    finally:
        os.close(fd)


def read(path: Path) -> Adv:
    """The ADV syslinux will see on the next boot: the first valid copy; an empty ADV when
    neither copy is valid (syslinux starts over from an empty one then, too)."""
    return Adv.decode_pair(read_pair(path)) or Adv()


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[int]:
    """A read-write descriptor of `path`, its immutable flag lifted meanwhile."""
    flags_buf = bytearray(4)
    ro = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.ioctl(ro, _FS_IOC_GETFLAGS, flags_buf)
        except OSError:
            flags = 0  # a filesystem without inode flags
        else:
            flags, = struct.unpack("<I", flags_buf)
        if flags & _FS_IMMUTABLE_FL:
            fcntl.ioctl(ro, _FS_IOC_SETFLAGS, struct.pack("<I", flags & ~_FS_IMMUTABLE_FL))
        try:
            rw = os.open(path, os.O_RDWR)
            try:
                yield rw
            finally:
                os.close(rw)
        finally:
            if flags & _FS_IMMUTABLE_FL:
                fcntl.ioctl(ro, _FS_IOC_SETFLAGS, struct.pack("<I", flags))
    finally:
        os.close(ro)


def write(path: Path, adv: Adv) -> None:
    """Write `adv` into both copies in place: copy 1, sync, copy 2, sync."""
    try:
        with _writable(path) as fd:
            base = _adv_offset(fd, path)
            old = os.pread(fd, 2 * ADV_SIZE, base)
            for offset, data in write_order(old, adv):
                if os.pwrite(fd, data, base + offset) != len(data):
                    raise OSError(f"short write at offset {base + offset}")
                os.fsync(fd)
                fsutil.checkpoint(path.parent)  # at its home sectors before the next copy
    except OSError as exc:
        raise OperationalError(f"cannot write the syslinux ADV in {path}: {exc}",
                               hint="is the boot partition mounted read-write?") from None
