"""The U-Boot environment on a block device, as U-Boot and libubootenv keep it.

Locations are `fw_env.config` lines, libubootenv's format: `DEVICE OFFSET SIZE [SECTOR_SIZE
[SECTORS]]`, the offset in C's base-0 notation (0x hex, leading 0 octal, else decimal; negative
counts from the device's end), the sizes in hex with or without 0x. Two lines: the second is
the redundant copy. abupgrade refuses a single copy: a write into the only copy is not
power-cut safe.

Each copy (redundant layout) is SIZE bytes:

    crc32 (4 bytes, little-endian) | flags (1 byte) | data (SIZE - 5 bytes)

`data` is `name=value\\0` entries ended by an empty one (a second \\0); the CRC covers all of
`data`, padding included. A copy is valid when its CRC matches. Of two valid copies the newer
is the one with the greater flags byte, except that 0 follows 255 (U-Boot's
env_check_redund and libubootenv's FLAGS_INCREMENTAL agree on this); with equal flags the
first copy wins. A writer puts the new state into the *other* copy with the current copy's
flags plus one, so the current copy is never touched and a write cut at any byte leaves
either the old state (torn copy: bad CRC) or the new one.
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from abupgrade.errors import OperationalError, UsageError
from abupgrade.partitions import TableKind, read_table

HEADER = 5  # crc32 + flags
DEFAULT_SIZE = 0x4000
_NAME = re.compile(r"[^\s=#\x00][^=\x00]*")


# ---------------------------------------------------------------- fw_env.config lines

def _c_integer(text: str, base: int) -> int:
    """strtoll/sscanf semantics for %lli (base 0) and %zx (base 16)."""
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if base == 16 or digits[:2].lower() == "0x":
        digits = digits[2:] if digits[:2].lower() == "0x" else digits
        return sign * int(digits, 16)
    if digits.startswith("0") and len(digits) > 1:
        return sign * int(digits[1:], 8)
    return sign * int(digits, 10)


@dataclass(frozen=True)
class EnvLocation:
    """One copy of the environment: `size` bytes at `offset` of `device` (negative: from
    the device's end). `sector_size` and `sectors` only matter to flash (MTD) devices."""

    device: str
    offset: int
    size: int
    sector_size: int | None = None
    sectors: int | None = None

    @classmethod
    def parse(cls, line: str) -> EnvLocation:
        words = line.split("#", 1)[0].split()
        if not 3 <= len(words) <= 5:
            raise UsageError(f"U-Boot environment location {line!r} is not "
                             "`DEVICE OFFSET SIZE [SECTOR_SIZE [SECTORS]]`",
                             hint='like fw_env.config: "/dev/mmcblk0 0x100000 0x4000"')
        try:
            offset = _c_integer(words[1], 0)
            numbers = [_c_integer(w, 16) for w in words[2:]]
        except ValueError:
            raise UsageError(f"U-Boot environment location {line!r} has a malformed number",
                             hint="offsets are 0x... hex or decimal, sizes are hex") from None
        size = numbers[0]
        if size <= HEADER + 1 or any(n <= 0 for n in numbers):
            raise UsageError(f"U-Boot environment location {line!r}: the size must be "
                             f"larger than {HEADER + 1} bytes and every number positive")
        return cls(words[0], offset, size, *numbers[1:])

    def line(self) -> str:
        """The fw_env.config line for this copy."""
        sign = "-" if self.offset < 0 else ""
        words = [self.device, f"{sign}{abs(self.offset):#x}", f"{self.size:#x}"]
        words += [f"{n:#x}" for n in (self.sector_size, self.sectors) if n is not None]
        return " ".join(words)


def parse_locations(lines: Sequence[str]) -> tuple[EnvLocation, EnvLocation]:
    """The two copies named by `[uboot] env`."""
    if len(lines) != 2:
        raise UsageError(f"[uboot] env has {len(lines)} line(s); it needs two, one per copy",
                         hint="a single copy cannot be rewritten safely across a power cut: "
                              "add the redundant copy's line")
    first, second = (EnvLocation.parse(line) for line in lines)
    if first.size != second.size:
        raise UsageError("[uboot] env: both copies must have the same size",
                         hint=f"{first.line()!r} vs {second.line()!r}")
    if first.device == second.device and first.offset >= 0 and second.offset >= 0 \
            and first.offset < second.offset + second.size \
            and second.offset < first.offset + first.size:
        raise UsageError("[uboot] env: the two copies overlap",
                         hint=f"{first.line()!r} and {second.line()!r}")
    return first, second


# ---------------------------------------------------------------- one copy

@dataclass(frozen=True)
class EnvCopy:
    """What one copy holds; `variables` in the order they are stored."""

    valid: bool
    flags: int
    variables: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, str]:
        return dict(self.variables)


def parse_copy(data: bytes) -> EnvCopy:
    """A copy read from disk. Entries without `=` are skipped (libubootenv does)."""
    if len(data) <= HEADER:
        return EnvCopy(False, 0)
    crc = int.from_bytes(data[:4], "little")
    body = data[HEADER:]
    if zlib.crc32(body) != crc:
        return EnvCopy(False, data[4])
    found: dict[str, str] = {}
    for entry in body.split(b"\0"):
        if not entry:
            break
        name, sep, value = entry.partition(b"=")
        if sep:
            found[name.decode("latin-1")] = value.decode("latin-1")
    return EnvCopy(True, data[4], tuple(found.items()))


def check_variable(name: str, value: str) -> None:
    """Refuse what U-Boot or fw_printenv would read differently from what was meant."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid U-Boot environment variable name {name!r}")
    if "\0" in value or not value:
        raise ValueError(f"invalid value {value!r} for U-Boot environment variable {name!r}")


def format_copy(variables: Iterable[tuple[str, str]], size: int, flags: int) -> bytes:
    """A copy of exactly `size` bytes, padded with NUL, as U-Boot's saveenv writes one."""
    body = bytearray()
    for name, value in variables:
        check_variable(name, value)
        body += f"{name}={value}".encode("latin-1") + b"\0"
    body += b"\0"
    room = size - HEADER
    if len(body) > room:
        raise ValueError(f"the U-Boot environment needs {len(body)} bytes, has {room}")
    body += b"\0" * (room - len(body))
    return zlib.crc32(body).to_bytes(4, "little") + bytes([flags & 0xFF]) + bytes(body)


def newer(copies: Sequence[EnvCopy]) -> int | None:
    """Index of the copy U-Boot and fw_printenv read (None: neither is valid)."""
    first, second = copies
    if not first.valid:
        return 1 if second.valid else None
    if not second.valid:
        return 0
    if first.flags == 0xFF and second.flags == 0:
        return 1
    if second.flags == 0xFF and first.flags == 0:
        return 0
    return 1 if second.flags > first.flags else 0


# ---------------------------------------------------------------- on a device

@dataclass(frozen=True)
class Current:
    """The copy in force (`index`, None when neither copy is valid) and its variables."""

    index: int | None
    flags: int
    variables: Mapping[str, str]

    @property
    def target(self) -> int:
        """The copy the next write goes to: never the current one."""
        return 1 if self.index == 0 else 0


def current(raw: Sequence[bytes]) -> Current:
    copies = [parse_copy(data) for data in raw]
    index = newer(copies)
    if index is None:
        # A first write then gets flags 1 in copy 0, as fw_setenv's would in copy 1.
        return Current(None, 0, {})
    return Current(index, copies[index].flags, copies[index].as_dict())


class Environment:
    """The two copies at their locations, devices resolved to paths."""

    def __init__(self, copies: Sequence[tuple[Path, EnvLocation]]) -> None:
        if len(copies) != 2:
            raise ValueError("the redundant layout has exactly two copies")
        self.copies = tuple(copies)

    def _offset(self, fd: int, location: EnvLocation) -> int:
        if location.offset >= 0:
            return location.offset
        return os.lseek(fd, 0, os.SEEK_END) + location.offset

    def read_raw(self) -> list[bytes]:
        found = []
        for path, location in self.copies:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise OperationalError(f"cannot open the U-Boot environment on {path}: "
                                       f"{exc.strerror}", hint="check [uboot] env") from None
            try:
                data = os.pread(fd, location.size, self._offset(fd, location))
            except OSError as exc:
                raise OperationalError(f"cannot read the U-Boot environment on {path}: "
                                       f"{exc.strerror}") from None
            finally:
                os.close(fd)
            if len(data) != location.size:
                raise UsageError(f"{path} ends inside the U-Boot environment copy "
                                 f"{location.line()!r}", hint="check [uboot] env")
            found.append(data)
        return found

    def current(self) -> Current:
        return current(self.read_raw())

    def write(self, variables: Iterable[tuple[str, str]]) -> Current:
        """Write `variables` into the copy that is not current, with the next flags; the
        copy is read back before this returns. Returns the new current state."""
        now = self.current()
        path, location = self.copies[now.target]
        data = format_copy(variables, location.size, now.flags + 1)
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            raise OperationalError(f"cannot open {path} to write the U-Boot environment: "
                                   f"{exc.strerror}") from None
        try:
            offset = self._offset(fd, location)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            os.fsync(fd)
        except OSError as exc:
            raise OperationalError(f"cannot write the U-Boot environment on {path}: "
                                   f"{exc.strerror}") from None
        finally:
            os.close(fd)
        if _read_back(path, offset, len(data)) != data:
            raise OperationalError(f"the U-Boot environment on {path} does not read back "
                                   "what was written", hint="the storage may be failing")
        after = self.current()
        if after.index != now.target:
            raise OperationalError(f"the U-Boot environment copy written on {path} is not "
                                   "the one in force afterwards")
        return after


def check_storage(path: Path, location: EnvLocation) -> None:
    """Refuse (UsageError) a copy abupgrade cannot rewrite safely: raw flash, missing or
    read-only storage, a copy past the end of its device, or one that overlaps a partition
    or the partition table of a whole disk (a write there would corrupt it)."""
    where = f"U-Boot environment copy {location.line()!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{where}: {path} does not exist", hint="check [uboot] env") from None
    if stat.S_ISCHR(st.st_mode):
        raise UsageError(f"{where}: {path} is raw flash (MTD); abupgrade writes the "
                         "environment on block devices only",
                         hint="keep the environment on the eMMC/SD card or disk")
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UsageError(f"{where}: {path} is neither a block device nor a file")
    if not os.access(path, os.W_OK):
        raise UsageError(f"{where}: {path} is not writable",
                         hint="run as root; for eMMC boot areas, /sys/block/*/force_ro")
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
    start = location.offset if location.offset >= 0 else size + location.offset
    end = start + location.size
    if start < 0 or end > size:
        raise UsageError(f"{where} does not fit on {path} ({size:,} bytes)",
                         hint="check [uboot] env")
    table = read_table(path)
    if table is None:
        return
    sector = table.sector_size
    reserved = [("the partition table", 0, sector)]
    if table.kind is TableKind.GPT:
        reserved = [("the partition table", 0, 34 * sector),
                    ("the backup partition table", size - 33 * sector, size)]
    reserved += [(f"partition {p.number}", p.start, p.start + p.size) for p in table.partitions]
    for what, first, last in reserved:
        if start < last and first < end:
            raise UsageError(f"{where} overlaps {what} of {path}",
                             hint="the environment belongs in the gap before the first "
                                  "partition (disk init puts it at 0x100000)")


def _read_back(path: Path, offset: int, size: int) -> bytes:
    """The bytes from the device itself where it is a block device (O_DIRECT, when aligned),
    else through the page cache."""
    is_block = stat.S_ISBLK(os.stat(path).st_mode)
    if is_block and offset % 4096 == 0 and size % 4096 == 0:
        import mmap

        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, size)
            os.preadv(fd, [buf], offset)
            return bytes(buf)
        finally:
            os.close(fd)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
