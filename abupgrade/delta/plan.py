"""Where each chunk of the new slot comes from, cheapest first.

1. all zeros: nothing to read or fetch;
2. in place: the target slot already holds it at the same position (nothing to write);
3. the active slot, anywhere in it (a read);
4. the target slot, at a position the update has not overwritten yet (a read);
5. the image: fetched, the only source that costs network.

A plan is only a guess made from cached digests: the assembler hashes every chunk it reads
before using it and fetches the ones that did not check out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from abupgrade.delta.blocks import SlotBlocks
from abupgrade.delta.index import BLOCK, ChunkIndex, zero_id


class Source(enum.Enum):
    ZERO = "zero"
    IN_PLACE = "in-place"
    ACTIVE = "active"
    TARGET = "target"
    FETCH = "fetch"


@dataclass(frozen=True)
class Step:
    source: Source
    block: int = 0  # first block in the slot it is read from (ACTIVE, TARGET)


@dataclass(frozen=True)
class Plan:
    index: ChunkIndex
    steps: tuple[Step, ...]  # one per chunk, in order

    def chunks(self, source: Source) -> list[int]:
        return [c for c, step in enumerate(self.steps) if step.source is source]

    def bytes_from(self, source: Source) -> int:
        """Uncompressed bytes of the payload the plan takes from `source`."""
        return sum(self.index.span(c)[1] for c in self.chunks(source))

    @property
    def fetch_bytes(self) -> int:
        """Stored bytes of the chunks to fetch."""
        return sum(self.index.stored[c] for c in self.chunks(Source.FETCH))

    def summary(self) -> dict[str, int]:
        return {**{f"{s.value}_bytes": self.bytes_from(s) for s in Source},
                "fetch_stored_bytes": self.fetch_bytes}


def make_plan(index: ChunkIndex, *, target: SlotBlocks | None,
              active: SlotBlocks | None) -> Plan:
    """The cheapest source of each chunk, from what the cached digests say."""
    k = index.chunk_blocks
    steps: list[Step | None] = [None] * index.count
    wanted: dict[bytes, list[int]] = {}
    zeros = {index.chunk_size: zero_id(index.chunk_size)}
    for c in range(index.count):
        start, length = index.span(c)
        chunk_id = index.id(c)
        if length not in zeros:
            zeros[length] = zero_id(length)
        if chunk_id == zeros[length]:
            steps[c] = Step(Source.ZERO)
        elif length % BLOCK == 0 and target is not None and \
                target.run_id(start // BLOCK, length // BLOCK) == chunk_id:
            steps[c] = Step(Source.IN_PLACE)
        elif length == index.chunk_size:
            wanted.setdefault(chunk_id, []).append(c)
    if active is not None and wanted:
        for first, run in active.runs(k):
            for c in wanted.pop(run, ()):
                steps[c] = Step(Source.ACTIVE, first)
            if not wanted:
                break
    if target is not None and wanted:
        for first, run in target.runs(k):
            chunks = wanted.get(run)
            if not chunks:
                continue
            # only where the update has not written yet when the chunk is needed
            usable = [c for c in chunks if first >= c * k]
            for c in usable:
                steps[c] = Step(Source.TARGET, first)
                chunks.remove(c)
    return Plan(index, tuple(step or Step(Source.FETCH) for step in steps))
