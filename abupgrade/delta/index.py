"""The chunk index of a slot payload: what a client needs to build the slot from local blocks
and fetch only the chunks it lacks.

The payload is cut into chunks of `chunk_blocks` blocks of 4 KiB (the last may be shorter).
Each chunk is stored on its own - one zstd frame, or raw bytes - so that one HTTP range fetches
it and it decodes alone. Per chunk the index holds

- an id: the first 8 bytes of SHA-256 over the SHA-256 digests of its blocks. A machine that
  keeps the SHA-256 of every 4 KiB block of a slot finds a chunk anywhere in it by hashing runs
  of digests, without reading the slot again;
- the size of its stored bytes, so chunk offsets in the payload are prefix sums.

Layout: a fixed header (magic, block size, chunk blocks, payload size, body size), then one zstd
frame holding every id, then every stored size (u32, little-endian). The index is itself a
payload of the signed manifest: its sha256 is signed, so every id is as trusted as the manifest.
"""

from __future__ import annotations

import array
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

from abupgrade.errors import ImageRejected

BLOCK = 4096
CHUNK_BLOCKS = 4  # 16 KiB chunks: the best download for realistic updates (see bench/README.md)
ID_BYTES = 8
MAGIC = b"ABIDX\x00\x01\n"
_HEADER = struct.Struct("<8sIIQQ")  # magic, block, chunk blocks, payload size, body size
MAX_CHUNK_BLOCKS = 256
MAX_INDEX_BYTES = 256 << 20
FRAME_SLACK = 1024  # a stored chunk may exceed its raw size by this much (incompressible data)


def block_digests(data: bytes | bytearray | memoryview) -> list[bytes]:
    """SHA-256 of each 4 KiB block of `data` (the last block may be shorter)."""
    view = memoryview(data).cast("B")
    return [hashlib.sha256(view[at:at + BLOCK]).digest() for at in range(0, len(view), BLOCK)]


def digests_id(digests: bytes) -> bytes:
    """The id of a chunk whose blocks have these SHA-256 digests (concatenated)."""
    return hashlib.sha256(digests).digest()[:ID_BYTES]


def chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """The id of a chunk with these bytes."""
    return digests_id(b"".join(block_digests(data)))


def zero_id(length: int) -> bytes:
    """The id of `length` zero bytes."""
    return chunk_id(bytes(length))


@dataclass(frozen=True)
class ChunkIndex:
    block: int
    chunk_blocks: int
    size: int  # of the uncompressed payload
    ids: bytes  # ID_BYTES per chunk
    stored: array.array[int]  # stored bytes per chunk
    offsets: array.array[int]  # where each chunk's stored bytes begin in the payload member

    @property
    def chunk_size(self) -> int:
        return self.block * self.chunk_blocks

    @property
    def count(self) -> int:
        return len(self.stored)

    @property
    def stored_size(self) -> int:
        """Bytes of the payload member: the sum of every stored chunk."""
        return self.offsets[-1] + self.stored[-1] if self.count else 0

    def span(self, chunk: int) -> tuple[int, int]:
        """(start, length) of the chunk in the uncompressed payload."""
        start = chunk * self.chunk_size
        return start, min(self.chunk_size, self.size - start)

    def id(self, chunk: int) -> bytes:
        return self.ids[chunk * ID_BYTES:(chunk + 1) * ID_BYTES]

    def serialize(self) -> bytes:
        sizes = struct.pack(f"<{self.count}I", *self.stored)
        body = zstandard.ZstdCompressor(level=19).compress(self.ids + sizes)
        header = _HEADER.pack(MAGIC, self.block, self.chunk_blocks, self.size, len(body))
        return header + body

    @classmethod
    def create(cls, size: int, ids: bytes, stored: Sequence[int], *,
               chunk_blocks: int = CHUNK_BLOCKS) -> ChunkIndex:
        sizes = array.array("I", stored)
        return cls(BLOCK, chunk_blocks, size, ids, sizes, _offsets(sizes))


def _offsets(stored: array.array[int]) -> array.array[int]:
    offsets = array.array("Q", bytes(8 * len(stored)))
    at = 0
    for i, n in enumerate(stored):
        offsets[i] = at
        at += n
    return offsets


def parse(data: bytes, *, payload_size: int) -> ChunkIndex:
    """The index in `data` for a payload of `payload_size` bytes, or ImageRejected."""
    if len(data) < _HEADER.size or len(data) > MAX_INDEX_BYTES:
        raise ImageRejected(f"chunk index of {len(data)} bytes cannot be right")
    magic, block, chunk_blocks, size, body_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageRejected("chunk index: unknown format", hint="upgrade abupgrade")
    if block != BLOCK or not 1 <= chunk_blocks <= MAX_CHUNK_BLOCKS:
        raise ImageRejected(f"chunk index: unsupported geometry ({block} x {chunk_blocks})")
    if size != payload_size:
        raise ImageRejected(f"chunk index describes {size} bytes; the payload has {payload_size}")
    if body_size != len(data) - _HEADER.size:
        raise ImageRejected("chunk index: its body has the wrong length")
    chunk = block * chunk_blocks
    count = -(-size // chunk)
    want = count * (ID_BYTES + 4)
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 25).decompressobj()
        body = reader.decompress(data[_HEADER.size:])
    except zstandard.ZstdError as e:
        raise ImageRejected(f"chunk index: corrupt body ({e})") from None
    if len(body) != want or not reader.eof or reader.unused_data:
        raise ImageRejected("chunk index: its body does not match its header")
    ids = body[:count * ID_BYTES]
    stored = array.array("I", struct.unpack(f"<{count}I", body[count * ID_BYTES:]))
    index = ChunkIndex(block, chunk_blocks, size, ids, stored, _offsets(stored))
    for c in range(count):
        if not 1 <= stored[c] <= index.span(c)[1] + FRAME_SLACK:
            raise ImageRejected(f"chunk index: chunk {c} claims {stored[c]} stored bytes")
    return index
