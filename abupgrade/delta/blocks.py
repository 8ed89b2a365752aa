"""The SHA-256 of every 4 KiB block of a slot, and their cache in state_dir.

An update looks chunks of the new image up in these digests to find what the machine already
holds, in place in the target slot or anywhere in the active one. The cache is keyed by the
sha256 of the image the slot holds (as the state records it), so a slot rewritten by an update
never matches an old entry; a slot changed behind abupgrade's back (mounted read-write) makes
the entry stale, which costs nothing but a fetch: every block read from a slot is hashed again
before it is used. A cache file that does not check out is ignored and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from abupgrade.delta.index import BLOCK, short_hash
from abupgrade.errors import OperationalError
from abupgrade.fsutil import atomic_write
from abupgrade.progress import NullProgress, Progress

DIGEST = 32
READ = 4 << 20
MAGIC = b"ABBLK\x00\x01\n"
_HEADER = struct.Struct("<8sIQ32s")  # magic, block, bytes covered, sha256 of the digests
_NAME = re.compile(r"[0-9a-f]{64}\.blocks")


@dataclass(frozen=True)
class SlotBlocks:
    """The digests of the blocks of the first `size` bytes of a slot."""

    size: int
    digests: bytes  # DIGEST bytes per block

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST

    def run_ids(self, blocks: int) -> list[bytes]:
        """The chunk id of the run of `blocks` whole blocks that starts at each block."""
        digests = self.digests
        return [short_hash(digests[first * DIGEST:(first + blocks) * DIGEST])
                for first in range(0, self.size // BLOCK - blocks + 1)]

    def serialize(self) -> bytes:
        return _HEADER.pack(MAGIC, BLOCK, self.size, hashlib.sha256(self.digests).digest()) + self.digests

    @classmethod
    def parse(cls, data: bytes) -> SlotBlocks | None:
        """The digests in a cache file, or None when it is not one or does not check out."""
        if len(data) < _HEADER.size:
            return None
        magic, block, size, checksum = _HEADER.unpack_from(data)
        digests = data[_HEADER.size:]
        if (magic != MAGIC or block != BLOCK or len(digests) != -(-size // BLOCK) * DIGEST
                or hashlib.sha256(digests).digest() != checksum):
            return None
        return cls(size, digests)


def read_slot(device: Path, size: int, progress: Progress | None = None) -> SlotBlocks:
    """Read the first `size` bytes of `device` (fewer if it is smaller) and hash each block."""
    sink: Progress = progress or NullProgress()
    parts: list[bytes] = []
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OperationalError(f"cannot read {device}: {exc.strerror}") from None
    sink.start(f"index {device.name}", size)
    try:
        buffer = bytearray(READ)
        view = memoryview(buffer)
        at = 0
        while at < size:
            n = os.preadv(fd, [view[:min(READ, size - at)]], at)
            if n <= 0:
                break
            parts += [hashlib.sha256(view[i:min(i + BLOCK, n)]).digest() for i in range(0, n, BLOCK)]
            at += n
            sink.advance(n)
    except OSError as exc:
        raise OperationalError(f"reading {device} failed: {exc.strerror}") from None
    finally:
        os.close(fd)
        sink.finish()
    return SlotBlocks(at, b"".join(parts))


class BlockCache:
    """Cached SlotBlocks in a folder of state_dir, one file per image digest."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.blocks"

    def load(self, sha256: str) -> SlotBlocks | None:
        try:
            data = self._path(sha256).read_bytes()
        except OSError:
            return None
        return SlotBlocks.parse(data)

    def save(self, sha256: str, blocks: SlotBlocks) -> None:
        """Keep `blocks` for the image `sha256`; a cache that cannot be written is no error."""
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self._path(sha256), blocks.serialize())

    def forget(self, sha256: str) -> None:
        with contextlib.suppress(OSError):
            self._path(sha256).unlink()

    def prune(self, keep: Iterable[str | None]) -> None:
        """Remove the entries of images no slot holds any more."""
        wanted = {f"{sha}.blocks" for sha in keep if sha}
        with contextlib.suppress(OSError):
            for path in self.folder.iterdir():
                if _NAME.fullmatch(path.name) and path.name not in wanted:
                    path.unlink()
