"""Turn a plan into the slot payload: every byte, in order, checked before it is handed out.

Each part comes from where the plan says - zeros, the target slot in place, a read of the
active or target slot, or the image's stored chunks (fetched ranges, merged and streamed). A
group read from a slot must hash to its id in the signed group index, a chunk to its id in its
signed chunk table, before it leaves this module. Where a slot changed since its digests were
cached, the chunks that do not match are fetched instead (one request each) up to a limit;
past it, or when fetched bytes do not match, DeltaFailed tells the caller to apply the whole
image. The whole payload's digest (Payload.digest) is computed on the way and compared at the
end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from abupgrade.delta.blocks import DIGEST, SlotBlocks
from abupgrade.delta.image import IndexedImage
from abupgrade.delta.index import ChunkTable, block_digests, short_hash
from abupgrade.delta.plan import Plan, Source, Step
from abupgrade.errors import AbupgradeError, ImageRejected, OperationalError
from abupgrade.image.compress import decompress_frame
from abupgrade.image.manifest import Compression
from abupgrade.progress import NullProgress, Progress

STALE_LIMIT = 64  # local chunks that may fail their check before the delta is given up


class DeltaFailed(AbupgradeError):
    """The delta path cannot finish; the whole image must be applied instead."""


@dataclass
class Tally:
    in_place: int = 0  # payload bytes found in place in the target slot
    from_active: int = 0  # payload bytes read from the active slot
    from_target: int = 0  # payload bytes read from elsewhere in the target slot
    zeros: int = 0
    fetched: int = 0  # payload bytes that came from the image (uncompressed)
    stale: dict[str, int] = field(default_factory=dict)  # slot role -> chunks that failed

    def add(self, source: Source, length: int) -> None:
        name = {Source.IN_PLACE: "in_place", Source.ACTIVE: "from_active",
                Source.TARGET: "from_target", Source.ZERO: "zeros", Source.FETCH: "fetched"}[source]
        setattr(self, name, getattr(self, name) + length)


class Assembler:
    """with Assembler(plan, image, target=..., active=...) as a: for piece in a.pieces(): ..."""

    def __init__(self, plan: Plan, image: IndexedImage, *, target: Path, active: Path | None,
                 progress: Progress | None = None) -> None:
        self.plan = plan
        self.image = image
        self.index = plan.index
        self.paths = {Source.IN_PLACE: target, Source.TARGET: target, Source.ACTIVE: active}
        self.progress: Progress = progress or NullProgress()
        self.tally = Tally()
        self.digests = bytearray()  # of every block of the new payload, for the block cache
        self._fds: dict[Path, int] = {}
        self._zeros: dict[int, tuple[bytes, bytes]] = {}

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

    def pieces(self) -> Iterator[bytes]:
        index, payload = self.index, self.image.manifest.slot
        member = self.image.slot
        fetches = list(self.plan.fetches())
        fetched = iter(self.image.ranges.fetch([(member.data + at, n) for _, at, n in fetches]))
        whole = payload.hasher()
        self.progress.start("assemble", index.size)
        try:
            for g, group in enumerate(self.plan.groups):
                parts = (self._group(g, group.step) if group.step is not None
                         else self._chunks(g, group.table, group.chunks, fetched))
                for piece, source in parts:
                    self.tally.add(source, len(piece))
                    whole.update(piece)
                    self.progress.advance(len(piece))
                    yield piece
        finally:
            self.progress.finish()
        if next(fetched, None) is not None:
            raise DeltaFailed("the image sent more chunks than were asked for")
        if whole.hexdigest() != payload.digest:
            raise DeltaFailed(f"the assembled payload does not match its {payload.digest_name} "
                              f"in the manifest ({whole.hexdigest()[:16]}...)")

    def _group(self, g: int, step: Step) -> Iterator[tuple[bytes, Source]]:
        """A whole group from one place, checked against its id."""
        start, length = self.index.group_span(g)
        if step.source is Source.ZERO:
            yield self._zero_piece(length), Source.ZERO
            return
        data = self._read(step, start, length)
        digests = b"".join(block_digests(data))
        if self._group_id(digests) == self.index.id(g):
            self.digests += digests
            yield data, step.source
            return
        # the slot changed: what still matches is used chunk by chunk, the rest fetched
        table = self.image.table(g)
        steps = tuple(step for _ in self.index.chunks(g))
        yield from self._chunks(g, table, steps, iter(()), data)

    def _group_id(self, digests: bytes) -> bytes:
        step = self.index.chunk_blocks * DIGEST
        return short_hash(b"".join(short_hash(digests[at:at + step])
                                   for at in range(0, len(digests), step)))

    def _chunks(self, g: int, table: ChunkTable | None, steps: tuple[Step, ...],
                fetched: Iterator[bytes], read: bytes | None = None) -> Iterator[tuple[bytes, Source]]:
        assert table is not None
        group_start = self.index.group_span(g)[0]
        for n, chunk in enumerate(self.index.chunks(g)):
            step = steps[n]
            start, length = self.index.span(chunk)
            if step.source is Source.ZERO:
                yield self._zero_piece(length), Source.ZERO
                continue
            if step.source is Source.FETCH:
                data = self._decode(chunk, next(fetched))
                digests = self._check(table.id(n), data)
                if digests is None:
                    raise DeltaFailed(f"chunk {chunk} of the image does not match the signed "
                                      "index: the server sent other bytes")
                self.digests += digests
                yield data, Source.FETCH
                continue
            if read is not None:  # the group was read whole already
                data = read[start - group_start:start - group_start + length]
            else:
                data = self._read(step, start, length)
            digests = self._check(table.id(n), data)
            if digests is None:
                data, digests = self._refetch(g, table, n, step.source)
                self.digests += digests
                yield data, Source.FETCH
                continue
            self.digests += digests
            yield data, step.source

    def _zero_piece(self, length: int) -> bytes:
        """`length` zero bytes (one shared object per length), their digests noted."""
        if length not in self._zeros:
            data = bytes(length)
            self._zeros[length] = (data, b"".join(block_digests(data)))
        piece, digests = self._zeros[length]
        self.digests += digests
        return piece

    def _decode(self, chunk: int, stored: bytes) -> bytes:
        length = self.index.span(chunk)[1]
        if self.image.manifest.slot.compression is Compression.NONE:
            return stored
        try:
            return decompress_frame(stored, length, f"chunk {chunk}")
        except ImageRejected as exc:
            raise DeltaFailed(f"chunk {chunk} of the image: {exc.message}") from None

    @staticmethod
    def _check(cid: bytes, data: bytes) -> bytes | None:
        """The block digests of `data` when it is the chunk with id `cid`, else None."""
        digests = b"".join(block_digests(data))
        return digests if short_hash(digests) == cid else None

    def _read(self, step: Step, start: int, length: int) -> bytes:
        path = self.paths[step.source]
        assert path is not None
        offset = start if step.source is Source.IN_PLACE else step.block * self.index.block
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise OperationalError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise OperationalError(f"reading {path} at byte {offset:,} failed: {exc.strerror}") from None

    def _refetch(self, g: int, table: ChunkTable, n: int, source: Source) -> tuple[bytes, bytes]:
        role = "active" if source is Source.ACTIVE else "target"
        self.tally.stale[role] = self.tally.stale.get(role, 0) + 1
        if sum(self.tally.stale.values()) > STALE_LIMIT:
            raise DeltaFailed(f"more than {STALE_LIMIT} chunks of the {role} slot differ from "
                              "its cached digests")
        chunk = self.index.chunks(g)[n]
        at = self.image.slot.data + self.index.stored_offsets[g] + sum(table.stored[:n])
        data = self._decode(chunk, self.image.ranges.read(at, table.stored[n]))
        digests = self._check(table.id(n), data)
        if digests is None:
            raise DeltaFailed(f"chunk {chunk} of the image does not match the signed index")
        return data, digests
