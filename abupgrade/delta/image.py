"""An image read by offset: its signed head first, then where each member lies, then the
chunk index - each checked before anything else is read or written.

The head goes through the same ImageReader as a streamed image (signature first). Members are
then found by walking their tar headers; the index member is read whole and must match its
digest in the manifest; boot payloads are read whole through the same verifying code as a
streamed image. The slot payload itself is left to the assembler, chunk by chunk.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

from abupgrade.delta import index as index_mod
from abupgrade.delta.index import ChunkTable, Index
from abupgrade.delta.remote import RangeSource
from abupgrade.errors import ImageRejected
from abupgrade.image.compress import max_member_size
from abupgrade.image.keys import Keyring
from abupgrade.image.manifest import Compression, Manifest, Payload
from abupgrade.image.reader import Chunk, ImageReader, read_member
from abupgrade.image.signature import SignatureStatus
from abupgrade.image.tar import BLOCK, decode_header, padding
from abupgrade.progress import Progress

HEAD = 8192  # the first request: manifest, signatures and the next member headers, usually


class _Head:
    """The first bytes of the image, fetched once; later reads beyond them go out."""

    def __init__(self, ranges: RangeSource) -> None:
        self.ranges = ranges
        self.data = ranges.read(0, min(HEAD, ranges.size))

    def read(self, offset: int, length: int) -> bytes:
        if offset + length <= len(self.data):
            return self.data[offset:offset + length]
        return self.ranges.read(offset, length)


class _RangeStream(io.RawIOBase):
    """A RangeSource read forward from an offset, as a stream."""

    def __init__(self, ranges: RangeSource | _Head, size: int, offset: int) -> None:
        super().__init__()
        self._ranges = ranges
        self._size = size
        self._at = offset

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._at)
        if n <= 0:
            return 0
        data = self._ranges.read(self._at, n)
        view[:n] = data
        self._at += n
        return n


def stream_at(ranges: RangeSource | _Head, size: int, offset: int, buffer: int) -> BinaryIO:
    stream = _RangeStream(ranges, size, offset)
    return cast(BinaryIO, io.BufferedReader(stream, buffer_size=buffer))


@dataclass(frozen=True)
class Member:
    payload: Payload
    data: int  # offset of its stored bytes in the image
    stored: int  # bytes stored


class IndexedImage:
    """The verified head, the members and (in format 2 images) the chunk index."""

    def __init__(self, ranges: RangeSource, keyring: Keyring,
                 policy: Callable[[Manifest], None] | None = None) -> None:
        self.ranges = ranges
        head = _Head(ranges)
        # the signature is checked here
        reader = ImageReader(stream_at(head, ranges.size, 0, HEAD), keyring)
        self.manifest: Manifest = reader.manifest
        if policy is not None:  # as on the streaming path: refusals before any payload check
            policy(self.manifest)
        self.signatures: tuple[SignatureStatus, ...] = reader.signatures
        self.members: dict[str, Member] = {}
        at = reader.offset
        for payload in self.manifest.payloads:
            header = decode_header(head.read(at, BLOCK), at)
            if header is None or header.name != payload.name:
                raise ImageRejected(f"payload {payload.name!r} is not where the manifest puts it "
                                    f"(byte {at})")
            if header.size > max_member_size(payload.compression, payload.size) or (
                    payload.compression is Compression.NONE and header.size != payload.size):
                raise ImageRejected(f"payload {payload.name!r} stores {header.size} bytes, "
                                    f"which cannot hold {payload.size}")
            self.members[payload.name] = Member(payload, at + BLOCK, header.size)
            at += BLOCK + header.size + padding(header.size)
        self.index: Index | None = self._read_index()

    def _read_index(self) -> Index | None:
        entry = self.manifest.index
        if entry is None:
            return None
        member = self.members[entry.name]
        data = self.ranges.read(member.data, member.stored)
        digest = entry.hasher()
        digest.update(data)
        if digest.hexdigest() != entry.digest:
            raise ImageRejected(f"payload {entry.name!r} does not match its {entry.digest_name} "
                                "in the manifest")
        slot = self.manifest.slot
        index = index_mod.parse(data, payload_size=slot.size)
        if index.stored_size != self.members[slot.name].stored:
            raise ImageRejected(f"the index says payload {slot.name!r} stores {index.stored_size} "
                                f"bytes; the image holds {self.members[slot.name].stored}")
        if slot.compression is Compression.NONE and any(
                index.stored[g] != index.group_span(g)[1] for g in range(index.count)):
            raise ImageRejected("the index does not fit an uncompressed payload")
        chunks = self.manifest.chunk_tables
        if chunks is None or index.tables_size != self.members[chunks.name].stored:
            raise ImageRejected("the chunk tables do not match the index")
        return index

    def tables(self, groups: list[int]) -> dict[int, ChunkTable]:
        """The chunk tables of these groups (ascending), fetched together and each checked."""
        index = self._index()
        entry = self.manifest.chunk_tables
        assert entry is not None  # an image with an index has them
        member = self.members[entry.name]
        spans = [(member.data + index.table_offsets[g], index.table_sizes[g]) for g in groups]
        fetched = self.ranges.fetch(spans, side=True)  # may run while the chunks stream
        return {g: index.table(g, data) for g, data in zip(groups, fetched, strict=True)}

    def table(self, group: int) -> ChunkTable:
        return self.tables([group])[group]

    def _index(self) -> Index:
        if self.index is None:
            raise ValueError("the image has no index")
        return self.index

    @property
    def slot(self) -> Member:
        return self.members[self.manifest.slot.name]

    def boot_payload(self, name: str, progress: Progress | None = None) -> Iterator[Chunk]:
        """The verified bytes of a boot payload (ImageRejected at the end on a mismatch)."""
        member = self.members[name]
        return read_member(stream_at(self.ranges, self.ranges.size, member.data, 1 << 20),
                           member.payload, member.stored, progress)
