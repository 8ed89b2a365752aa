"""A delta install, from the image's address to the verified slot.

    ranges = open_ranges(spec, registry)      # None: the image can only be streamed
    image = IndexedImage(ranges, keyring)     # signature, members, index: checked first
    ... the caller's policy checks on image.manifest; the target made unbootable ...
    delta = Delta(image, BlockCache(state_dir / "blocks"), target=..., active=...)
    plan = delta.plan(progress)               # cached digests, or the slots read once
    for piece in delta.pieces(): ...          # verified chunks, in order, for the writer
    delta.done()                              # the new slot's digests cached, old ones pruned

DeltaFailed from `pieces` (a slot that changed too much, a server that lies, a payload that
does not add up) means: apply the whole image instead; the target is still unbootable.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from abupgrade.config import RegistryConfig
from abupgrade.delta.assemble import Assembler
from abupgrade.delta.blocks import BlockCache, SlotBlocks, read_slot
from abupgrade.delta.image import IndexedImage
from abupgrade.delta.plan import Plan, make_plan
from abupgrade.delta.remote import FileRanges, HttpRanges, OciRanges, RangeSource, RangesUnsupported
from abupgrade.progress import NullProgress, Progress

BLOCKS_FOLDER = "blocks"  # in state_dir


def open_ranges(spec: str, registry: RegistryConfig | None = None) -> RangeSource | None:
    """Random access to the image at `spec`, or None where it can only be streamed (stdin,
    a server that ignores Range requests)."""
    if spec == "-":
        return None
    scheme = urllib.parse.urlsplit(spec).scheme.lower()
    if scheme in ("http", "https"):
        try:
            return HttpRanges(spec)
        except RangesUnsupported:
            return None
    if scheme == "oci":
        return OciRanges(spec, registry)
    if "://" in spec:
        return None  # the streaming path says what is wrong with it
    return FileRanges(Path(spec))


@dataclass(frozen=True)
class SlotSource:
    """A slot the delta reads: its device, the sha256 of the image the state says it holds,
    and whether to read it when that is not known (it may hold part of an install that
    stopped; a slot never written holds nothing worth a read)."""

    device: Path
    sha256: str | None
    read_unknown: bool = True


class Delta:
    def __init__(self, image: IndexedImage, cache: BlockCache, *, target: SlotSource,
                 active: SlotSource | None) -> None:
        if image.index is None:
            raise ValueError("a delta needs an image with a chunk index")
        self.image = image
        self.index = image.index
        self.cache = cache
        self.target = target
        self.active = active
        self._assembler: Assembler | None = None

    def _blocks(self, slot: SlotSource, progress: Progress) -> SlotBlocks | None:
        """The slot's cached digests, or its digests read now (and cached when the state
        says what the slot holds), or None where it is not worth a read."""
        if slot.sha256 is not None:
            cached = self.cache.load(slot.sha256)
            if cached is not None:
                return cached
        elif not slot.read_unknown:
            return None
        blocks = read_slot(slot.device, self.index.size, progress)
        if slot.sha256 is not None and slot is self.active:
            self.cache.save(slot.sha256, blocks)
        return blocks

    def plan(self, progress: Progress | None = None) -> Plan:
        sink: Progress = progress or NullProgress()
        active = self._blocks(self.active, sink) if self.active is not None else None
        same = self.active is not None and self.active.sha256 == self.target.sha256 is not None
        return make_plan(self.index, self.image.tables, target=self._blocks(self.target, sink),
                         active=active, target_is_active=same)

    def pieces(self, plan: Plan, progress: Progress | None = None) -> Iterator[bytes]:
        active = self.active.device if self.active is not None else None
        with Assembler(plan, self.image, target=self.target.device, active=active,
                       progress=progress) as assembler:
            self._assembler = assembler
            yield from assembler.pieces()

    @property
    def assembler(self) -> Assembler:
        assert self._assembler is not None, "pieces() first"
        return self._assembler

    def forget_stale(self) -> None:
        """After the delta gave up: drop the cached digests of a slot that proved stale."""
        stale = self._assembler.tally.stale if self._assembler is not None else {}
        if "active" in stale and self.active is not None and self.active.sha256:
            self.cache.forget(self.active.sha256)

    def done(self) -> None:
        """After the slot was written and read back: keep its digests, forget stale ones."""
        assembler = self.assembler
        new = self.image.manifest.slot.sha256
        self.cache.save(new, assembler.blocks)
        keep = {new}
        if self.active is not None and self.active.sha256 and "active" not in assembler.tally.stale:
            keep.add(self.active.sha256)  # a slot that proved stale is read again next time
        self.cache.prune(keep)
