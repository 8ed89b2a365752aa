"""A small, strict ustar codec: only what abupgrade images use, everything else is a rejection.

An image holds regular files with short flat names and nothing else, so the reader never has to
resolve a path, follow a link or make a directory. Sizes beyond the 11 octal digits of ustar use
the GNU base-256 size field. The archive ends with two zero blocks; only zero padding may follow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from abupgrade.errors import ImageRejected

BLOCK = 512
END_MARKER = bytes(2 * BLOCK)
MAGIC = b"ustar\x0000"
MAX_OCTAL_SIZE = 8**11 - 1
MAX_MEMBER_SIZE = 2**63 - 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long-name header",
    b"K": "a GNU long-link header",
}


@dataclass(frozen=True)
class Header:
    """A tar member's name and size."""

    name: str
    size: int


def padding(size: int) -> int:
    """Bytes of zero padding that follow `size` bytes of member data."""
    return -size % BLOCK


def encode_header(name: str, size: int, mtime: int = 0) -> bytes:
    """The ustar header of a regular file `name` (flat, short) holding `size` bytes."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"member name {name!r} is not a flat short name")
    if not 0 <= size <= MAX_MEMBER_SIZE:
        raise ValueError(f"member size {size} out of range")
    header = bytearray(BLOCK)
    header[0:100] = name.encode("ascii").ljust(100, b"\0")
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = _encode_size(size)
    header[136:148] = b"%011o\0" % max(0, min(mtime, MAX_OCTAL_SIZE))
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = MAGIC
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _encode_size(size: int) -> bytes:
    if size <= MAX_OCTAL_SIZE:
        return b"%011o\0" % size
    return b"\x80" + size.to_bytes(11, "big")


def decode_header(block: bytes | bytearray | memoryview, offset: int) -> Header | None:
    """Parse one header block; None for a zero block (the end marker). Raises ImageRejected."""
    raw = bytes(block)
    if len(raw) != BLOCK:
        raise ImageRejected(f"image truncated in the member header at byte {offset}")
    if raw == bytes(BLOCK):
        return None
    where = f"member header at byte {offset}"
    stored = raw[148:156]
    if not (re.fullmatch(rb"[0-7]{6}", stored[:6]) and stored[6:] == b"\0 "):
        raise ImageRejected(f"malformed checksum field in the {where}")
    if int(stored[:6], 8) != sum(raw[:148]) + 8 * 0x20 + sum(raw[156:]):
        raise ImageRejected(f"header checksum mismatch in the {where}")
    if raw[257:265] != MAGIC:
        raise ImageRejected(f"not a POSIX ustar header: the {where}")
    kind = raw[156:157]
    if kind not in (b"0", b"\0"):
        what = _TYPE_NAMES.get(kind, f"an unsupported member type {kind!r}")
        raise ImageRejected(f"{where} is {what}; images hold regular files only")
    if raw[345:500].strip(b"\0") or raw[157:257].strip(b"\0"):
        raise ImageRejected(f"{where} has a name prefix or link target; images use flat names")
    name_field = raw[0:100]
    name_bytes, _, rest = name_field.partition(b"\0")
    if rest.strip(b"\0"):
        raise ImageRejected(f"{where} has bytes after the end of its name")
    name = name_bytes.decode("ascii", errors="replace")
    if name.startswith("/"):
        raise ImageRejected(f"absolute member name {name!r} in the {where}")
    if ".." in name.split("/"):
        raise ImageRejected(f"member name {name!r} climbs out with '..' in the {where}")
    if not NAME_RE.fullmatch(name):
        raise ImageRejected(f"member name {name!r} is not a flat short name ({where})")
    return Header(name=name, size=_decode_size(raw[124:136], where))


def _decode_size(field: bytes, where: str) -> int:
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] & 0x80:
        raise ImageRejected(f"negative or oversized member size in the {where}")
    digits = field.rstrip(b"\0 ")
    if not re.fullmatch(rb" *[0-7]{1,11}", digits):
        raise ImageRejected(f"malformed size field in the {where}")
    return int(digits, 8)
