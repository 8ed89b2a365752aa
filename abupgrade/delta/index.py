"""The index of a slot payload: what a client needs to build the slot from local blocks and
fetch only the chunks it lacks - in two levels, so that it downloads little of the index too.

The payload is cut into chunks of `chunk_blocks` blocks of 4 KiB (the last may be shorter),
each stored on its own - one zstd frame, or raw bytes - so that one HTTP range fetches it and
it decodes alone. Chunks form groups of `group_chunks` (512 KiB).

- A chunk's id is the first 8 bytes of SHA-256 over the SHA-256 digests of its blocks; a group's
  id is the first 8 bytes of SHA-256 over its chunks' ids. A machine that keeps the SHA-256 of
  every 4 KiB block of its slots computes both for a run starting at any block, and so finds a
  chunk or a whole group anywhere in a slot without reading it again.
- The group index (image member `<slot>.index`, fetched whole) holds per group its id, the id
  of its first chunk (so a scan hashes runs only where a group can start), the bytes its
  chunks store, and the size and a hash of its chunk table.
- The chunk tables (member `<slot>.chunks`) hold per chunk its id and stored size. A client
  fetches only the tables of groups it did not find whole on the machine, and checks each
  against its hash in the group index.

Both members are payloads of the signed manifest (their sha256 covers them for a streaming
reader): every id and size a client uses is as trusted as the manifest.
"""

from __future__ import annotations

import array
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import zstandard

from abupgrade.errors import ImageRejected
from abupgrade.image.compress import decompress_frame

BLOCK = 4096
CHUNK_BLOCKS = 4  # 16 KiB chunks: the best download for realistic updates (see bench/README.md)
GROUP_CHUNKS = 32  # 512 KiB groups: the smallest index download (see bench/README.md)
ID_BYTES = 8
MAGIC = b"ABIDX\x00\x02\n"
_HEADER = struct.Struct("<8sIIIQQ")  # magic, block, chunk blocks, group chunks, size, body size
_ENTRY = 3 * ID_BYTES + 8  # group id, first chunk id, table hash, stored, table bytes (u32s)
MAX_CHUNK_BLOCKS = 256
MAX_GROUP_CHUNKS = 4096
MAX_INDEX_BYTES = 64 << 20
FRAME_SLACK = 1024  # a stored chunk may exceed its raw size by this much (incompressible data)
_ZSTD = zstandard.ZstdCompressor(level=19)


def short_hash(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()[:ID_BYTES]


def block_digests(data: bytes | bytearray | memoryview) -> list[bytes]:
    """SHA-256 of each 4 KiB block of `data` (the last block may be shorter)."""
    view = memoryview(data).cast("B")
    return [hashlib.sha256(view[at:at + BLOCK]).digest() for at in range(0, len(view), BLOCK)]


def chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """The id of a chunk with these bytes."""
    return short_hash(b"".join(block_digests(data)))


def _u32s(data: bytes) -> array.array[int]:
    return array.array("I", struct.unpack(f"<{len(data) // 4}I", data))


@dataclass(frozen=True)
class ChunkTable:
    """One group's chunks: their ids and stored sizes."""

    ids: bytes
    stored: array.array[int]

    def id(self, n: int) -> bytes:
        return self.ids[n * ID_BYTES:(n + 1) * ID_BYTES]

    def serialize(self) -> bytes:
        return _ZSTD.compress(self.ids + struct.pack(f"<{len(self.stored)}I", *self.stored))

    @classmethod
    def parse(cls, data: bytes, count: int) -> ChunkTable:
        body = decompress_frame(data, count * (ID_BYTES + 4), "a chunk table")
        return cls(body[:count * ID_BYTES], _u32s(body[count * ID_BYTES:]))


@dataclass(frozen=True)
class Index:
    """The group index, and the geometry every offset derives from."""

    block: int
    chunk_blocks: int
    group_chunks: int
    size: int  # of the uncompressed payload
    ids: bytes  # ID_BYTES per group
    firsts: bytes  # the id of each group's first chunk
    table_hashes: bytes  # ID_BYTES per group
    stored: array.array[int]  # stored bytes of each group's chunks
    table_sizes: array.array[int]  # bytes of each group's chunk table
    # where each group's chunks begin in the payload member, its table in the chunks member
    stored_offsets: array.array[int] = field(init=False, repr=False, compare=False)
    table_offsets: array.array[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stored_offsets", _offsets(self.stored))
        object.__setattr__(self, "table_offsets", _offsets(self.table_sizes))

    @property
    def chunk_size(self) -> int:
        return self.block * self.chunk_blocks

    @property
    def group_size(self) -> int:
        return self.chunk_size * self.group_chunks

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def count(self) -> int:
        """Groups."""
        return len(self.stored)

    @property
    def stored_size(self) -> int:
        """Bytes of the payload member."""
        return sum(self.stored)

    @property
    def tables_size(self) -> int:
        """Bytes of the chunks member."""
        return sum(self.table_sizes)

    def id(self, group: int) -> bytes:
        return self.ids[group * ID_BYTES:(group + 1) * ID_BYTES]

    def first(self, group: int) -> bytes:
        return self.firsts[group * ID_BYTES:(group + 1) * ID_BYTES]

    def table_hash(self, group: int) -> bytes:
        return self.table_hashes[group * ID_BYTES:(group + 1) * ID_BYTES]

    def chunks(self, group: int) -> range:
        """The chunk numbers of a group."""
        first = group * self.group_chunks
        return range(first, min(first + self.group_chunks, self.chunk_count))

    def span(self, chunk: int) -> tuple[int, int]:
        """(start, length) of a chunk in the uncompressed payload."""
        start = chunk * self.chunk_size
        return start, min(self.chunk_size, self.size - start)

    def group_span(self, group: int) -> tuple[int, int]:
        start = group * self.group_size
        return start, min(self.group_size, self.size - start)

    def table(self, group: int, data: bytes) -> ChunkTable:
        """A group's chunk table from its stored bytes, checked against this index."""
        if len(data) != self.table_sizes[group] or short_hash(data) != self.table_hash(group):
            raise ImageRejected(f"the chunk table of group {group} does not match the index")
        table = ChunkTable.parse(data, len(self.chunks(group)))
        if (short_hash(table.ids) != self.id(group) or table.id(0) != self.first(group)
                or sum(table.stored) != self.stored[group]):
            raise ImageRejected(f"the chunk table of group {group} contradicts the index")
        for n, chunk in enumerate(self.chunks(group)):
            if not 1 <= table.stored[n] <= self.span(chunk)[1] + FRAME_SLACK:
                raise ImageRejected(f"chunk {chunk} claims {table.stored[n]} stored bytes")
        return table

    def serialize(self) -> bytes:
        entries = b"".join(
            self.id(g) + self.first(g) + self.table_hash(g)
            + struct.pack("<II", self.stored[g], self.table_sizes[g]) for g in range(self.count))
        body = _ZSTD.compress(entries)
        return _HEADER.pack(MAGIC, self.block, self.chunk_blocks, self.group_chunks, self.size,
                            len(body)) + body


def _offsets(sizes: array.array[int]) -> array.array[int]:
    offsets = array.array("Q", bytes(8 * len(sizes)))
    at = 0
    for i, n in enumerate(sizes):
        offsets[i] = at
        at += n
    return offsets


def build(size: int, chunk_ids: Sequence[bytes], stored: Sequence[int], *,
          chunk_blocks: int = CHUNK_BLOCKS, group_chunks: int = GROUP_CHUNKS) -> tuple[Index, bytes]:
    """The index of a payload of `size` bytes whose chunks have these ids and stored sizes, and
    the chunks member (every group's table)."""
    tables = []
    ids, firsts, hashes, group_stored, sizes = [], [], [], [], []
    for first in range(0, len(chunk_ids), group_chunks):
        table = ChunkTable(b"".join(chunk_ids[first:first + group_chunks]),
                           array.array("I", stored[first:first + group_chunks]))
        data = table.serialize()
        tables.append(data)
        ids.append(short_hash(table.ids))
        firsts.append(table.id(0))
        hashes.append(short_hash(data))
        group_stored.append(sum(table.stored))
        sizes.append(len(data))
    index = Index(BLOCK, chunk_blocks, group_chunks, size, b"".join(ids), b"".join(firsts),
                  b"".join(hashes), array.array("I", group_stored), array.array("I", sizes))
    return index, b"".join(tables)


def parse(data: bytes, *, payload_size: int) -> Index:
    """The group index in `data` for a payload of `payload_size` bytes, or ImageRejected."""
    if len(data) < _HEADER.size or len(data) > MAX_INDEX_BYTES:
        raise ImageRejected(f"an index of {len(data)} bytes cannot be right")
    magic, block, chunk_blocks, group_chunks, size, body_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageRejected("the chunk index has an unknown format", hint="upgrade abupgrade")
    if (block != BLOCK or not 1 <= chunk_blocks <= MAX_CHUNK_BLOCKS
            or not 1 <= group_chunks <= MAX_GROUP_CHUNKS):
        raise ImageRejected(f"unsupported index geometry ({block} x {chunk_blocks} x {group_chunks})")
    if size != payload_size:
        raise ImageRejected(f"the index describes {size} bytes; the payload has {payload_size}")
    if body_size != len(data) - _HEADER.size:
        raise ImageRejected("the index body has the wrong length")
    groups = -(-size // (block * chunk_blocks * group_chunks))
    body = decompress_frame(data[_HEADER.size:], groups * _ENTRY, "the index")
    ids, firsts, hashes, stored, sizes = [], [], [], [], []
    for g in range(groups):
        entry = body[g * _ENTRY:(g + 1) * _ENTRY]
        ids.append(entry[:ID_BYTES])
        firsts.append(entry[ID_BYTES:2 * ID_BYTES])
        hashes.append(entry[2 * ID_BYTES:3 * ID_BYTES])
        n_stored, n_table = struct.unpack_from("<II", entry, 3 * ID_BYTES)
        stored.append(n_stored)
        sizes.append(n_table)
    index = Index(block, chunk_blocks, group_chunks, size, b"".join(ids), b"".join(firsts),
                  b"".join(hashes), array.array("I", stored), array.array("I", sizes))
    for g in range(groups):
        chunks = index.chunks(g)
        most = sum(index.span(c)[1] + FRAME_SLACK for c in chunks)
        if not len(chunks) <= index.stored[g] <= most or index.table_sizes[g] > 64 * len(chunks) + 64:
            raise ImageRejected(f"index group {g} claims sizes that cannot be right")
    return index
