"""Payload compression: encoders for the builder, bounded strict decoders for the reader.

Every decoder hands out at most the bytes asked for, so a compression bomb costs at most one
chunk of memory before the reader notices the declared size is exceeded. A decoder reports the
end only after its compressed stream ended exactly at the end of the member.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Sequence
from typing import Protocol

import zstandard

from abupgrade.errors import ImageRejected
from abupgrade.image.manifest import Compression

IN_CHUNK = 1 << 20
ZSTD_LEVEL = 3
CHUNK_LEVEL = 15  # chunks are small: a higher level pays (see bench/README.md)
ZSTD_MAX_WINDOW = 1 << 25  # the builder uses 2 MiB windows; frames wanting over 32 MiB are refused
XZ_PRESET = 6
XZ_MEMLIMIT = 128 << 20
GZIP_LEVEL = 6


class Encoder(Protocol):
    def compress(self, data: bytes | memoryview, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes | memoryview, /) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


def encoder(compression: Compression, size: int) -> Encoder:
    """A compressor for a payload of `size` uncompressed bytes."""
    match compression:
        case Compression.NONE:
            return _Identity()
        case Compression.GZIP:
            return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        case Compression.XZ:
            return lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
        case Compression.ZSTD:
            cctx = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, threads=-1, write_checksum=True, write_content_size=True
            )
            obj: Encoder = cctx.compressobj(size=size)
            return obj


def compress_chunks(chunks: Sequence[bytes], level: int = CHUNK_LEVEL) -> list[bytes]:
    """One independent zstd frame per chunk (content size in the header, no checksum: the
    chunk index and the manifest's sha256 check the bytes), on every core."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True,
                                    write_dict_id=False)
    if len(chunks) == 1:
        return [cctx.compress(chunks[0])]
    frames = cctx.multi_compress_to_buffer([bytes(c) for c in chunks], threads=-1)
    return [frames[i].tobytes() for i in range(len(chunks))]


def decompress_frame(frame: bytes, size: int, what: str) -> bytes:
    """The `size` bytes one zstd frame holds (a chunk, an index), or ImageRejected."""
    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
    try:
        data = reader.decompress(frame)
    except zstandard.ZstdError as e:
        raise ImageRejected(f"{what}: corrupt zstd frame ({e})") from None
    if len(data) != size or not reader.eof or reader.unused_data:
        raise ImageRejected(f"{what} holds {len(data)} bytes where {size} belong")
    return data


def max_member_size(compression: Compression, size: int) -> int:
    """The largest compressed member a payload of `size` bytes can honestly need."""
    if compression is Compression.NONE:
        return size
    return size + size // 64 + (1 << 20)


class Source(Protocol):
    """The compressed bytes of one member; read() returns b"" at the member's end."""

    @property
    def remaining(self) -> int: ...

    def read(self, n: int) -> bytes: ...

    def read_exact(self, n: int, what: str) -> bytes: ...


class Decoder(Protocol):
    def read(self, n: int) -> bytes | memoryview:
        """At most `n` uncompressed bytes; b"" once the compressed stream ended cleanly."""


def decoder(compression: Compression, source: Source, name: str, *, frames: bool = False) -> Decoder:
    """A decoder of one compressed stream; with `frames`, a zstd member may hold several
    frames in a row (a payload stored chunk by chunk)."""
    match compression:
        case Compression.GZIP:
            return _GzipDecoder(source, name)
        case Compression.XZ:
            return _XzDecoder(source, name)
        case Compression.ZSTD:
            return _ZstdDecoder(source, name, frames=frames)
        case Compression.NONE:
            raise ValueError("uncompressed payloads are read directly")


def _trailing(name: str) -> ImageRejected:
    return ImageRejected(f"payload {name!r}: data after the end of its compressed stream")


def _truncated(name: str) -> ImageRejected:
    return ImageRejected(f"payload {name!r}: compressed stream ends before it is complete")


class _GzipDecoder:
    def __init__(self, source: Source, name: str) -> None:
        self._source = source
        self._name = name
        self._d = zlib.decompressobj(wbits=31)  # gzip wrapper only, one member
        self._tail = b""
        self._end = False

    def read(self, n: int) -> bytes:
        while not self._end:
            try:
                out = self._d.decompress(self._tail, n)
            except zlib.error as e:
                raise ImageRejected(f"payload {self._name!r}: corrupt gzip stream ({e})") from None
            self._tail = self._d.unconsumed_tail
            if self._d.eof:
                if self._d.unused_data or self._tail or self._source.remaining:
                    raise _trailing(self._name)
                self._end = True
            if out:
                return out
            if not self._tail and not self._end:
                self._tail = self._source.read(IN_CHUNK)
                if not self._tail:
                    raise _truncated(self._name)
        return b""


class _XzDecoder:
    def __init__(self, source: Source, name: str) -> None:
        self._source = source
        self._name = name
        self._d = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
        self._end = False

    def read(self, n: int) -> bytes:
        while not self._end:
            data = b""
            if self._d.needs_input:
                data = self._source.read(IN_CHUNK)
                if not data:
                    raise _truncated(self._name)
            try:
                out = self._d.decompress(data, n)
            except lzma.LZMAError as e:
                raise ImageRejected(f"payload {self._name!r}: corrupt xz stream ({e})") from None
            if self._d.eof:
                if self._d.unused_data or self._source.remaining:
                    raise _trailing(self._name)
                self._end = True
            if out:
                return out
        return b""


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCK_MAX = 128 << 10
_ZSTD_BATCH_OUT = 4 << 20


class _ZstdDecoder:
    """One zstd frame (with `frames`, one or more in a row), fed to libzstd in whole blocks
    whose possible output is bounded.

    libzstd's one-shot streaming call returns all the output its input can make; walking the
    block headers ourselves keeps each call under a few MiB and tells exactly where the frame
    ends, so nothing but the frame(s) may fill the member.
    """

    def __init__(self, source: Source, name: str, *, frames: bool = False) -> None:
        self._source = source
        self._name = name
        self._frames = frames
        self._pending = memoryview(b"")
        self._end = False
        self._new_frame()

    def _new_frame(self) -> None:
        self._d = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
        self._started = False
        self._checksum = False
        self._frame_done = False

    def read(self, n: int) -> bytes | memoryview:
        while not self._pending:
            if self._end:
                return b""
            batch = self._next_batch()
            try:
                self._pending = memoryview(self._d.decompress(batch))
            except zstandard.ZstdError as e:
                raise ImageRejected(f"payload {self._name!r}: corrupt zstd stream ({e})") from None
            if self._frame_done:
                if not self._d.eof:
                    raise ImageRejected(f"payload {self._name!r}: zstd frame did not end cleanly")
                if self._d.unused_data:
                    raise _trailing(self._name)
                if self._frames and self._source.remaining:
                    self._new_frame()
                elif self._source.remaining:
                    raise _trailing(self._name)
                else:
                    self._end = True
        chunk, self._pending = self._pending[:n], self._pending[n:]
        return chunk

    def _exact(self, n: int) -> bytes:
        return self._source.read_exact(n, f"payload {self._name!r}: compressed stream")

    def _next_batch(self) -> bytes:
        parts: list[bytes] = []
        if not self._started:
            self._started = True
            parts.append(self._frame_header())
        budget = _ZSTD_BATCH_OUT
        size_in = 0
        while budget > 0 and size_in < IN_CHUNK and not self._frame_done:
            head = self._exact(3)
            value = int.from_bytes(head, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3 or size > _ZSTD_BLOCK_MAX:
                raise ImageRejected(f"payload {self._name!r}: corrupt zstd block header")
            body = self._exact(1 if kind == 1 else size)
            parts += (head, body)
            size_in += 3 + len(body)
            budget -= _ZSTD_BLOCK_MAX if kind == 2 else size
            if last:
                if self._checksum:
                    parts.append(self._exact(4))
                self._frame_done = True
        return b"".join(parts)

    def _frame_header(self) -> bytes:
        start = self._exact(5)
        if start[:4] != _ZSTD_MAGIC:
            raise ImageRejected(f"payload {self._name!r}: not a zstd frame")
        descriptor = start[4]
        if descriptor & 0x08:
            raise ImageRejected(f"payload {self._name!r}: reserved bit set in the zstd frame header")
        single_segment = bool(descriptor & 0x20)
        self._checksum = bool(descriptor & 0x04)
        if descriptor & 0x03:
            raise ImageRejected(f"payload {self._name!r}: zstd frame needs a dictionary")
        content_size_bytes = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        rest = (0 if single_segment else 1) + content_size_bytes
        return start + self._exact(rest)
