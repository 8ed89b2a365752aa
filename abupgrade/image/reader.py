"""Streaming, verifying image reader: one pass, flat memory, nothing extracted by name.

The manifest and its signatures are read and checked before the first payload byte is handed
out; each payload's chunks are hashed as they pass, and its iterator raises ImageRejected at its
end when size or digest do not match (BLAKE3 where the manifest gives one, else SHA-256; `verify`
checks both). The consumer writes the chunks wherever it wants (a slot, /dev/null) and must not
treat a payload as good before its iterator ended without error.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

from abupgrade.errors import ImageRejected, OperationalError
from abupgrade.image import manifest as manifest_mod
from abupgrade.image import signature as signature_mod
from abupgrade.image.compress import Decoder, decoder, max_member_size
from abupgrade.image.keys import Keyring
from abupgrade.image.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURES_NAME,
    Compression,
    Manifest,
    Payload,
    PayloadKind,
)
from abupgrade.image.signature import MAX_SIGNATURES_BYTES, Signature, SignatureStatus
from abupgrade.image.tar import BLOCK, Header, decode_header, padding
from abupgrade.progress import NullProgress, Progress

CHUNK = 1 << 20
MAX_TRAILING_PADDING = 1 << 20

Chunk = bytes | memoryview


def _readinto_by_read(stream: BinaryIO, view: memoryview) -> int:
    data = stream.read(len(view))
    view[: len(data)] = data
    return len(data)


def _read_errors() -> tuple[type[Exception], ...]:
    """What a failed read of the image raises: OSError, and HTTP's exceptions where an HTTP
    stream may exist (http.client is loaded; a local image does not load it: start-up time)."""
    client = sys.modules.get("http.client")
    return (OSError,) if client is None else (OSError, client.HTTPException)


class _Input:
    """The image stream, read exactly, with the offset for messages."""

    def __init__(self, stream: BinaryIO) -> None:
        self._readinto: Callable[[memoryview], int | None] = getattr(stream, "readinto", None) or partial(
            _readinto_by_read, stream
        )
        self.offset = 0

    def readinto(self, view: memoryview) -> int:
        """Fill `view` as far as the stream goes; fewer bytes only at its end."""
        got = 0
        while got < len(view):
            try:
                n = self._readinto(view[got:])
            except _read_errors() as e:
                at = self.offset + got
                raise OperationalError(f"reading the image failed at byte {at}: {e}") from None
            if not n:
                break
            got += n
        self.offset += got
        return got

    def read_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.readinto_exact(memoryview(buf), what)
        return bytes(buf)

    def readinto_exact(self, view: memoryview, what: str) -> None:
        start = self.offset
        if self.readinto(view) != len(view):
            raise ImageRejected(f"image truncated at byte {self.offset} in {what} (from byte {start})")

    def header(self) -> Header | None:
        offset = self.offset
        block = bytearray(BLOCK)
        got = self.readinto(memoryview(block))
        if got != BLOCK:
            raise ImageRejected(f"image truncated at byte {self.offset} in a member header")
        return decode_header(block, offset)

    def padding(self, size: int, name: str) -> None:
        pad = padding(size)
        if pad and any(self.read_exact(pad, f"the padding of {name!r}")):
            raise ImageRejected(f"non-zero padding after member {name!r}")


class _Member:
    """The stored bytes of one member, for decoders (compress.Source)."""

    def __init__(self, source: _Input, size: int, name: str) -> None:
        self._in = source
        self._name = name
        self.remaining = size

    def read(self, n: int) -> bytes:
        n = min(n, self.remaining)
        data = self._in.read_exact(n, f"payload {self._name!r}") if n else b""
        self.remaining -= n
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise ImageRejected(f"{what} runs past the end of its member")
        return self.read(n)


@dataclass(frozen=True)
class _Head:
    manifest_bytes: bytes
    signatures: tuple[Signature, ...]


def _read_head(source: _Input) -> _Head:
    first = source.header()
    if first is None:  # a zero block: an empty tar, or a filesystem or disk image
        raise ImageRejected("not an abupgrade image: it starts with 512 zero bytes "
                            "(an empty archive, or a filesystem or disk image?)",
                            hint="an image is the .tar `abupgrade image build` writes")
    if first.name != MANIFEST_NAME:
        raise ImageRejected(f"first member is {first.name!r}; an image starts with {MANIFEST_NAME}")
    if first.size > MAX_MANIFEST_BYTES:
        raise ImageRejected(f"manifest is {first.size} bytes, over the {MAX_MANIFEST_BYTES} limit")
    manifest_bytes = source.read_exact(first.size, MANIFEST_NAME)
    source.padding(first.size, MANIFEST_NAME)
    second = source.header()
    if second is None or second.name != SIGNATURES_NAME:
        raise ImageRejected(
            f"image has no signature: {SIGNATURES_NAME} must follow {MANIFEST_NAME}",
            hint="sign it with `abupgrade image build --key`",
        )
    if second.size > MAX_SIGNATURES_BYTES:
        raise ImageRejected(f"{SIGNATURES_NAME} is {second.size} bytes, over the limit")
    sig_bytes = source.read_exact(second.size, SIGNATURES_NAME)
    source.padding(second.size, SIGNATURES_NAME)
    return _Head(manifest_bytes, signature_mod.parse(sig_bytes))


class ImageReader:
    """Verify an image from a stream and hand out its payloads in order.

    The constructor reads the manifest and signatures and raises ImageRejected unless a trusted
    key signed the manifest. `payloads()` then yields (Payload, chunks) in manifest order;
    consume each chunk before asking for the next: chunks of uncompressed payloads are views
    into one reused buffer.
    """

    def __init__(self, stream: BinaryIO, keyring: Keyring, *, progress: Progress | None = None) -> None:
        self._in = _Input(stream)
        self._progress: Progress = progress or NullProgress()
        head = _read_head(self._in)
        self.manifest_bytes = head.manifest_bytes
        self.signatures: tuple[SignatureStatus, ...] = signature_mod.check(
            head.manifest_bytes, head.signatures, keyring, strict=True
        )
        self.manifest: Manifest = manifest_mod.parse(head.manifest_bytes)
        self._buffer = memoryview(bytearray(min(CHUNK, max(p.size for p in self.manifest.payloads))))
        self._started = False
        self._every_digest = False

    def verify(self) -> VerifiedImage:
        """Read every payload to its end (sizes and every digest the manifest gives checked)
        and the archive's end, reporting to the reader's progress; write nothing."""
        self._every_digest = True
        self._progress.start("verify", sum(p.size for p in self.manifest.payloads))
        try:
            for _payload, chunks in self.payloads():
                for _ in chunks:
                    pass
        finally:
            self._progress.finish()
        return VerifiedImage(self.manifest, self.signatures, self.offset)

    @property
    def offset(self) -> int:
        """Bytes of the stream read so far."""
        return self._in.offset

    def payloads(self) -> Iterator[tuple[Payload, PayloadChunks]]:
        """Each slot and boot payload with an iterator over its uncompressed bytes; then the end
        is checked. The index payloads are checked and passed over (delta updates read them by
        range).

        A payload whose iterator the consumer leaves unfinished is read to its end (and checked)
        before the next one is yielded.
        """
        if self._started:
            raise RuntimeError("payloads() can run only once per reader")
        self._started = True
        names = {p.name for p in self.manifest.payloads}
        seen = {MANIFEST_NAME, SIGNATURES_NAME}
        for payload in self.manifest.payloads:
            header = self._payload_header(payload, names, seen)
            chunks = self._chunks(payload, header.size)
            if payload.kind not in (PayloadKind.INDEX, PayloadKind.CHUNKS):
                yield payload, chunks
            for _ in chunks:
                pass
            seen.add(payload.name)
        self._check_end(names)

    def _payload_header(self, payload: Payload, names: set[str], seen: set[str]) -> Header:
        offset = self._in.offset
        header = self._in.header()
        if header is None:
            raise ImageRejected(f"payload {payload.name!r} is missing: the archive ends at byte {offset}")
        want = payload.name
        if header.name != want:
            if header.name in seen:
                raise ImageRejected(f"member {header.name!r} appears twice (byte {offset})")
            if header.name in names:
                raise ImageRejected(
                    f"member {header.name!r} is out of order: expected {want!r} at byte {offset}"
                )
            raise ImageRejected(f"member {header.name!r} at byte {offset} is not in the manifest")
        if payload.compression is Compression.NONE and header.size != payload.size:
            raise ImageRejected(
                f"payload {want!r} holds {header.size} bytes, the manifest says {payload.size}"
            )
        if header.size > max_member_size(payload.compression, payload.size):
            raise ImageRejected(
                f"payload {payload.name!r} stores {header.size} compressed bytes, "
                f"too many for {payload.size} uncompressed"
            )
        return header

    def _chunks(self, payload: Payload, stored: int) -> PayloadChunks:
        # an indexed slot payload holds one zstd frame per chunk
        frames = self.manifest.index is not None and payload.kind is PayloadKind.SLOT
        return PayloadChunks(self._in, self._buffer, payload, stored, self._progress, frames,
                             self._every_digest)

    def _check_end(self, names: set[str]) -> None:
        offset = self._in.offset
        block = memoryview(bytearray(BLOCK))
        for index in range(2):
            got = self._in.readinto(block)
            if got != BLOCK:
                raise ImageRejected(f"image truncated at byte {self._in.offset} in the end-of-archive marker")
            if any(block):
                at = offset + index * BLOCK
                header = decode_header(block, at)
                if header is not None and header.name in names | {MANIFEST_NAME, SIGNATURES_NAME}:
                    raise ImageRejected(f"member {header.name!r} appears twice (byte {at})")
                if header is not None:
                    raise ImageRejected(f"member {header.name!r} at byte {at} is not in the manifest")
        extra = 0
        tail = memoryview(bytearray(BLOCK))
        while got := self._in.readinto(tail):
            if any(tail[:got]):
                at = offset + 2 * BLOCK + extra
                raise ImageRejected(f"trailing garbage after the end of the archive (byte {at})")
            extra += got
            if extra > MAX_TRAILING_PADDING:
                raise ImageRejected("more than 1 MiB of padding after the end of the archive")


class _Digests:
    """The digests one payload's bytes are checked against: the one readers check
    (`Payload.digest`), or with `every` each one the manifest gives."""

    def __init__(self, payload: Payload, every: bool) -> None:
        self.payload = payload
        self.hashers = [(payload.digest_name, payload.digest, payload.hasher())]
        if every and payload.blake3 is not None:
            self.hashers.append(("sha256", payload.sha256, hashlib.sha256()))

    def update(self, data: Chunk) -> None:
        for _, _, hasher in self.hashers:
            hasher.update(data)

    def check(self) -> None:
        for name, expected, hasher in self.hashers:
            if hasher.hexdigest() != expected:
                raise ImageRejected(
                    f"payload {self.payload.name!r} does not match its {name} in the manifest")


class PayloadChunks:
    """The uncompressed bytes of one payload - a member of `stored` bytes at the stream's
    position - hashed as they pass: ImageRejected at their end unless size and digest match
    the manifest (each of its digests with `every_digest`).

    Iterate for chunks (views into one reused buffer: consume each before the next), or
    `readinto` buffers of your own: a stored payload is then read straight into them, with
    no copy in between (the slot writer's page-aligned buffers).
    """

    def __init__(self, source: _Input, buffer: memoryview, payload: Payload, stored: int,
                 progress: Progress, frames: bool = False, every_digest: bool = False) -> None:
        self.payload = payload
        self._in = source
        self._buffer = buffer
        self._stored = stored
        self._progress = progress
        self._digest = _Digests(payload, every_digest)
        self._total = 0  # uncompressed bytes handed out
        self._left = stored  # stored bytes not read yet (a stored payload)
        self._member: _Member | None = None
        self._decoder: Decoder | None = None
        if payload.compression is not Compression.NONE:
            self._member = _Member(source, stored, payload.name)
            self._decoder = decoder(payload.compression, self._member, payload.name,
                                    frames=frames)
        self._done = False

    def __iter__(self) -> PayloadChunks:
        return self

    def __next__(self) -> Chunk:
        n = self.readinto(self._buffer[:CHUNK])
        if not n:
            raise StopIteration
        return self._buffer[:n]

    def readinto(self, view: memoryview) -> int:
        """Fill `view` with the next bytes (fewer only at the end); 0 once the payload ended
        and was checked."""
        if self._done:
            return 0
        if self._decoder is None:
            n = min(self._left, len(view))
            self._in.readinto_exact(view[:n], f"payload {self.payload.name!r}")
            self._left -= n
        else:
            out = self._decoder.read(min(len(view), self.payload.size - self._total + 1))
            n = len(out)
            if self._total + n > self.payload.size:
                raise ImageRejected(f"payload {self.payload.name!r} decompresses beyond its "
                                    f"declared {self.payload.size} bytes")
            view[:n] = out
        if not n:
            self._end()
            return 0
        self._digest.update(view[:n])
        self._total += n
        self._progress.advance(n)
        return n

    def _end(self) -> None:
        self._done = True
        name = self.payload.name
        if self._member is not None and self._member.remaining:
            raise ImageRejected(f"payload {name!r}: data after its compressed stream")
        self._in.padding(self._stored, name)
        if self._total != self.payload.size:
            raise ImageRejected(
                f"payload {name!r} has {self._total} bytes; the manifest says {self.payload.size}")
        self._digest.check()


def read_member(stream: BinaryIO, payload: Payload, stored: int,
                progress: Progress | None = None) -> PayloadChunks:
    """The verified bytes of one member whose data (`stored` bytes, then its padding) the
    stream is positioned at: for readers that find members by offset (delta updates)."""
    buffer = memoryview(bytearray(min(CHUNK, max(stored, 1))))
    return PayloadChunks(_Input(stream), buffer, payload, stored, progress or NullProgress())


@dataclass(frozen=True)
class VerifiedImage:
    manifest: Manifest
    signatures: tuple[SignatureStatus, ...]
    size: int  # bytes read from the stream

    def to_json(self) -> dict[str, Any]:
        """The `image verify --json` document."""
        return {
            "version": self.manifest.version,
            "compatible": self.manifest.compatible,
            "payloads": [p.to_json() for p in self.manifest.payloads],
            "signatures": [s.to_json() for s in self.signatures],
        }


def verify(stream: BinaryIO, keyring: Keyring, progress: Progress | None = None) -> VerifiedImage:
    """Check signature, every payload's size and hash, and the archive's end; write nothing."""
    return ImageReader(stream, keyring, progress=progress).verify()


@dataclass(frozen=True)
class ImageInfo:
    manifest: Manifest
    signatures: tuple[SignatureStatus, ...]

    def to_json(self) -> dict[str, Any]:
        """The `image inspect --json` document of the contract (plus format/created/kind)."""
        return {
            "version": self.manifest.version,
            "compatible": self.manifest.compatible,
            "format": self.manifest.format,
            "created": self.manifest.created,
            "payloads": [p.to_json() for p in self.manifest.payloads],
            "signatures": [s.to_json() for s in self.signatures],
            "security_floor": self.manifest.security_floor,
        }


def inspect(stream: BinaryIO, keyring: Keyring | None) -> ImageInfo:
    """Manifest and signature status from the head of the image; payloads are not read.

    Without a keyring every signature's trust is None. A signature that does not verify is
    reported untrusted here; `verify` and ImageReader reject it.
    """
    head = _read_head(_Input(stream))
    statuses = signature_mod.check(head.manifest_bytes, head.signatures, keyring, strict=False)
    return ImageInfo(manifest_mod.parse(head.manifest_bytes), statuses)
