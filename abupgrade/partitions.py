"""Partition tables read by ourselves (GPT and MBR), written with sfdisk.

Reading does not depend on the kernel's partition parsers or on udev: a table is parsed
from the first sectors of an image file or a block device. Offsets and sizes are bytes.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from abupgrade import blockdev
from abupgrade.errors import OperationalError, UsageError
from abupgrade.run import require_tool, run

BIOS_GRUB = "21686148-6449-6E6F-744E-656564454649"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MBR_LINUX = "83"

_GPT_SIGNATURE = b"EFI PART"
_MBR_EXTENDED = {0x05, 0x0F, 0x85}


class TableKind(enum.StrEnum):
    GPT = "gpt"
    MBR = "dos"  # sfdisk's name for it


@dataclass(frozen=True)
class Partition:
    """One entry of a partition table."""

    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # GPT: type GUID, upper case; MBR: two hex digits ("83")
    name: str | None  # GPT partition name (PARTLABEL); None on MBR
    partuuid: str  # lower case, as blkid and the kernel's root=PARTUUID= spell it
    bootable: bool  # MBR active flag; GPT legacy BIOS bootable attribute (bit 2)


@dataclass(frozen=True)
class PartitionTable:
    """A GPT or MBR partition table as read from the disk."""

    kind: TableKind
    disk_id: str  # GPT disk GUID or MBR disk signature (8 hex digits), lower case
    sector_size: int
    partitions: tuple[Partition, ...]

    def get(self, number: int) -> Partition:
        for part in self.partitions:
            if part.number == number:
                return part
        raise OperationalError(f"partition {number} does not exist")

    def by_name(self, name: str) -> list[Partition]:
        return [p for p in self.partitions if p.name == name]


@dataclass(frozen=True)
class PartitionSpec:
    """One partition for `create_table`; `size` None takes the rest of the disk."""

    size: int | None
    type: str
    name: str | None = None
    bootable: bool = False
    start: int | None = None  # bytes from the start of the disk; None: right after the last


def _guid(raw: bytes) -> str:
    """A GPT GUID (its first three fields little-endian) as text, the way uuid.UUID(bytes_le=)
    spells it; without the uuid module, which costs every command's start."""
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OperationalError(f"short read at byte {offset}: the disk is smaller than its table")
    return data


def read_table(path: Path) -> PartitionTable | None:
    """The partition table of a disk image or block device; None when it has none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OperationalError(f"cannot open {path}: {exc.strerror}") from None
    try:
        sector = blockdev.sector_size(fd)
        mbr = os.pread(fd, 512, 0)
        if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
            return None
        entries = [mbr[446 + 16 * i : 462 + 16 * i] for i in range(4)]
        if any(e[0] not in (0x00, 0x80) for e in entries):
            return None  # a boot sector of something else (a filesystem), not a table
        if any(e[4] == 0xEE for e in entries):
            return _read_gpt(fd, path, sector)
        return _read_mbr(mbr, entries, sector)
    finally:
        os.close(fd)


def _read_mbr(mbr: bytes, entries: list[bytes], sector: int) -> PartitionTable:
    (signature,) = struct.unpack_from("<I", mbr, 440)
    parts = []
    for index, entry in enumerate(entries, start=1):
        status, kind = entry[0], entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if kind == 0 or count == 0 or kind in _MBR_EXTENDED:
            continue
        parts.append(Partition(
            number=index,
            start=start * sector,
            size=count * sector,
            type=f"{kind:02x}",
            name=None,
            partuuid=f"{signature:08x}-{index:02d}",
            bootable=status == 0x80,
        ))
    return PartitionTable(TableKind.MBR, f"{signature:08x}", sector, tuple(parts))


def _read_gpt(fd: int, path: Path, sector: int) -> PartitionTable:
    header = _pread(fd, sector, sector)
    if header[:8] != _GPT_SIGNATURE:
        raise OperationalError(f"{path}: protective MBR but no GPT header",
                               hint="repair the table with sgdisk or fdisk")
    (header_size,) = struct.unpack_from("<I", header, 12)
    (header_crc,) = struct.unpack_from("<I", header, 16)
    if not 92 <= header_size <= sector:
        raise OperationalError(f"{path}: GPT header size {header_size} is invalid")
    blank = header[:16] + b"\0\0\0\0" + header[20:header_size]
    if zlib.crc32(blank) != header_crc:
        raise OperationalError(f"{path}: GPT header checksum mismatch",
                               hint="repair the table with sgdisk or fdisk")
    disk_guid = _guid(header[56:72])
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if entry_size < 128 or count > 4096:
        raise OperationalError(f"{path}: GPT entry array is invalid ({count} x {entry_size})")
    array = _pread(fd, count * entry_size, entries_lba * sector)
    if zlib.crc32(array) != entries_crc:
        raise OperationalError(f"{path}: GPT partition entries checksum mismatch",
                               hint="repair the table with sgdisk or fdisk")
    parts = []
    for index in range(count):
        entry = array[index * entry_size : (index + 1) * entry_size]
        if entry[:16] == b"\0" * 16:
            continue
        first, last, attributes = struct.unpack_from("<QQQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(Partition(
            number=index + 1,
            start=first * sector,
            size=(last - first + 1) * sector,
            type=_guid(entry[:16]).upper(),
            name=name,
            partuuid=_guid(entry[16:32]),
            bootable=bool(attributes & (1 << 2)),
        ))
    return PartitionTable(TableKind.GPT, disk_guid, sector, tuple(parts))


def create_table(target: Path, kind: TableKind, specs: Sequence[PartitionSpec], *,
                 disk_id: str | None = None) -> PartitionTable:
    """Write a new table with sfdisk (old signatures wiped) and return it as read back;
    `disk_id` is the GPT disk GUID or the MBR signature (0x12345678), random if None."""
    sfdisk = require_tool("sfdisk", package="fdisk")
    lines = [f"label: {kind}"] + ([f"label-id: {disk_id}"] if disk_id else []) + [""]
    for spec in specs:
        fields = [f"type={spec.type}"]
        if spec.start is not None:
            if spec.start <= 0 or spec.start % 1024:
                raise UsageError(f"partition start {spec.start} is not a positive multiple "
                                 "of 1 KiB")
            fields.insert(0, f"start={spec.start // 1024}KiB")
        if spec.size is not None:
            if spec.size <= 0 or spec.size % 1024:
                raise UsageError(f"partition size {spec.size} is not a positive multiple of 1 KiB")
            fields.insert(0, f"size={spec.size // 1024}KiB")
        if spec.name is not None:
            if kind is TableKind.MBR:
                raise UsageError("MBR partitions have no names")
            fields.append(f'name="{spec.name}"')
        if spec.bootable:
            if kind is TableKind.GPT:
                fields.append("attrs=LegacyBIOSBootable")
            else:
                fields.append("bootable")
        lines.append(", ".join(fields))
    script = "\n".join(lines) + "\n"
    run([sfdisk, "--quiet", "--wipe", "always", "--wipe-partitions", "always",
         "--no-reread", "--no-tell-kernel", target], input=script.encode())
    table = read_table(target)
    if table is None or len(table.partitions) != len(specs):
        raise OperationalError(f"sfdisk did not write the expected table on {target}")
    return table
