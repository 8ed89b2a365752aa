"""Turn a plan into the slot payload: every chunk, in order, verified before it is handed out.

Each chunk comes from where the plan says - zeros, the target slot in place, a read of the
active or target slot, or the image's stored bytes (fetched ranges, merged and streamed) - and
its id is computed from its bytes and compared with the signed index before the chunk leaves
this module. A local chunk that does not match (the slot changed since its digests were cached)
is fetched instead, one request each, up to a limit; past it, or when fetched bytes do not
match, DeltaFailed tells the caller to fall back to the whole image. The sha256 of the whole
payload is computed on the way and compared with the manifest's at the end.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from abupgrade.delta.blocks import SlotBlocks
from abupgrade.delta.image import IndexedImage
from abupgrade.delta.index import block_digests, digests_id
from abupgrade.delta.plan import Plan, Source, Step
from abupgrade.errors import AbupgradeError, ImageRejected, OperationalError
from abupgrade.image.compress import decompress_chunk
from abupgrade.image.manifest import Compression
from abupgrade.progress import NullProgress, Progress

STALE_LIMIT = 64  # local chunks that may fail their check before the delta is given up


class DeltaFailed(AbupgradeError):
    """The delta path cannot finish; the whole image must be applied instead."""


@dataclass(frozen=True)
class Piece:
    """One chunk of the payload. `in_place`: the target slot already holds exactly these bytes
    there (read and checked), so writing them can be skipped."""

    data: bytes
    in_place: bool


@dataclass
class Tally:
    in_place: int = 0  # payload bytes found in place in the target slot
    from_active: int = 0  # payload bytes read from the active slot
    from_target: int = 0  # payload bytes read from elsewhere in the target slot
    zeros: int = 0
    fetched: int = 0  # payload bytes that came from the image (uncompressed)
    stale: dict[str, int] = field(default_factory=dict)  # slot role -> chunks that failed


class Assembler:
    """with Assembler(plan, image, target=..., active=...) as a: for piece in a.pieces(): ..."""

    def __init__(self, plan: Plan, image: IndexedImage, *, target: Path, active: Path | None,
                 progress: Progress | None = None) -> None:
        if image.index is None:
            raise ValueError("the image has no chunk index")
        self.plan = plan
        self.image = image
        self.index = image.index
        self.paths = {Source.IN_PLACE: target, Source.TARGET: target, Source.ACTIVE: active}
        self.progress: Progress = progress or NullProgress()
        self.tally = Tally()
        self.digests = bytearray()  # of every block of the new payload, for the block cache
        self._fds: dict[Path, int] = {}
        self._zeros: dict[int, bytes] = {}

    def __enter__(self) -> Assembler:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    @property
    def blocks(self) -> SlotBlocks:
        """The block digests of the payload, once pieces() ran to its end."""
        return SlotBlocks(self.index.size, bytes(self.digests))

    def pieces(self) -> Iterator[Piece]:
        index, payload = self.index, self.image.manifest.slot
        member = self.image.slot
        fetched = iter(self.image.ranges.fetch(
            [(member.data + index.offsets[c], index.stored[c])
             for c in self.plan.chunks(Source.FETCH)]))
        whole = hashlib.sha256()
        self.progress.start("assemble", index.size)
        try:
            for c, step in enumerate(self.plan.steps):
                data, digests, origin = self._chunk(c, step, fetched)
                self._count(origin, len(data))
                self.digests += digests
                whole.update(data)
                self.progress.advance(len(data))
                yield Piece(data, origin is Source.IN_PLACE)
        finally:
            self.progress.finish()
        if next(fetched, None) is not None:
            raise DeltaFailed("the image sent more chunks than were asked for")
        if whole.hexdigest() != payload.sha256:
            raise DeltaFailed(f"the assembled payload does not match its sha256 in the manifest "
                              f"({whole.hexdigest()[:16]}...)")

    def _chunk(self, c: int, step: Step, fetched: Iterator[bytes]) -> tuple[bytes, bytes, Source]:
        """(bytes, block digests, where they came from) of chunk `c`, checked."""
        start, length = self.index.span(c)
        if step.source is Source.ZERO:
            if length not in self._zeros:
                self._zeros[length] = b"".join(block_digests(bytes(length)))
            return bytes(length), self._zeros[length], Source.ZERO
        if step.source is Source.FETCH:
            data = self._decode(c, next(fetched))
            digests = self._check(c, data)
            if digests is None:
                raise DeltaFailed(f"chunk {c} of the image does not match the signed index: "
                                  "the server sent other bytes")
            return data, digests, Source.FETCH
        first = start // self.index.block if step.source is Source.IN_PLACE else step.block
        data = self._read(self.paths[step.source], first * self.index.block, length)
        digests = self._check(c, data)
        if digests is None:
            data, digests = self._refetch(c, step.source)
            return data, digests, Source.FETCH
        return data, digests, step.source

    def _decode(self, chunk: int, stored: bytes) -> bytes:
        length = self.index.span(chunk)[1]
        if self.image.manifest.slot.compression is Compression.NONE:
            return stored
        try:
            return decompress_chunk(stored, length)
        except ImageRejected as exc:
            raise DeltaFailed(f"chunk {chunk} of the image: {exc.message}") from None

    def _check(self, chunk: int, data: bytes) -> bytes | None:
        """The block digests of `data` when it is the chunk the index names, else None."""
        digests = b"".join(block_digests(data))
        return digests if digests_id(digests) == self.index.id(chunk) else None

    def _read(self, path: Path | None, offset: int, length: int) -> bytes:
        assert path is not None
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise OperationalError(f"cannot read {path}: {exc.strerror}") from None
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise OperationalError(f"reading {path} at byte {offset:,} failed: {exc.strerror}") from None
        return data

    def _refetch(self, chunk: int, source: Source) -> tuple[bytes, bytes]:
        role = "active" if source is Source.ACTIVE else "target"
        self.tally.stale[role] = self.tally.stale.get(role, 0) + 1
        if sum(self.tally.stale.values()) > STALE_LIMIT:
            raise DeltaFailed(f"more than {STALE_LIMIT} chunks of the {role} slot differ from "
                              "its cached digests")
        stored = self.image.ranges.read(self.image.slot.data + self.index.offsets[chunk],
                                        self.index.stored[chunk])
        data = self._decode(chunk, stored)
        checked = self._check(chunk, data)
        if checked is None:
            raise DeltaFailed(f"chunk {chunk} of the image does not match the signed index")
        return data, checked

    def _count(self, source: Source, length: int) -> None:
        tally = self.tally
        if source is Source.ZERO:
            tally.zeros += length
        elif source is Source.IN_PLACE:
            tally.in_place += length
        elif source is Source.ACTIVE:
            tally.from_active += length
        elif source is Source.TARGET:
            tally.from_target += length
        else:
            tally.fetched += length
