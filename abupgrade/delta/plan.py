"""Where each part of the new slot comes from, cheapest first.

1. all zeros: nothing to read or fetch;
2. in place: the target slot already holds it at the same position (nothing to write);
3. the active slot, anywhere in it (a read);
4. the target slot, at a position the update has not overwritten yet (a read);
5. the image: fetched, the only source that costs network.

Whole groups (512 KiB) are looked up first, by their ids in the group index; only for the
groups not found whole are the chunk tables fetched and each chunk looked up alone. A plan is
only a guess made from cached digests: the assembler checks everything it reads before using
it and fetches what did not check out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from abupgrade.delta.blocks import SlotBlocks
from abupgrade.delta.index import BLOCK, ChunkTable, Index, chunk_id, short_hash


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
class GroupPlan:
    """A whole group from one place (`step`), or chunk by chunk from its `table`."""

    step: Step | None
    table: ChunkTable | None = None
    chunks: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Plan:
    index: Index
    groups: tuple[GroupPlan, ...]

    def fetches(self) -> Iterator[tuple[int, int, int]]:
        """(chunk, offset in the payload member, stored bytes) of every chunk to fetch."""
        index = self.index
        for g, group in enumerate(self.groups):
            if group.table is None:
                continue
            at = index.stored_offsets[g]
            for n, chunk in enumerate(index.chunks(g)):
                if group.chunks[n].source is Source.FETCH:
                    yield chunk, at, group.table.stored[n]
                at += group.table.stored[n]

    def bytes_from(self, source: Source) -> int:
        """Uncompressed payload bytes the plan takes from `source`."""
        total = 0
        for g, group in enumerate(self.groups):
            if group.step is not None:
                total += self.index.group_span(g)[1] if group.step.source is source else 0
                continue
            total += sum(self.index.span(c)[1] for n, c in enumerate(self.index.chunks(g))
                         if group.chunks[n].source is source)
        return total

    @property
    def fetch_bytes(self) -> int:
        """Stored bytes of the chunks to fetch."""
        return sum(stored for _, _, stored in self.fetches())

    def summary(self) -> dict[str, int]:
        return {**{f"{s.value}_bytes": self.bytes_from(s) for s in Source},
                "fetch_stored_bytes": self.fetch_bytes}


Tables = Callable[[list[int]], dict[int, ChunkTable]]


def zero_ids(index: Index) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The ids of all-zero chunks and groups, by their length."""
    chunks = {length: chunk_id(bytes(length)) for length in
              {index.span(c)[1] for c in (0, index.chunk_count - 1)}}
    groups = {}
    for g in {0, index.count - 1}:
        ids = b"".join(chunks[index.span(c)[1]] for c in index.chunks(g))
        groups[index.group_span(g)[1]] = short_hash(ids)
    return chunks, groups


def make_plan(index: Index, tables: Tables, *, target: SlotBlocks | None,
              active: SlotBlocks | None, target_is_active: bool = False) -> Plan:
    """The cheapest source of every group, or of every chunk of the groups not found whole
    (`tables` fetches and checks their chunk tables). With `target_is_active` (both slots hold
    the same image) the target is not searched beyond the blocks in place."""
    k, n = index.chunk_blocks, index.group_chunks
    zero_chunks, zero_groups = zero_ids(index)
    runs = {role: slot.run_ids(k) for role, slot in (("target", target), ("active", active))
            if slot is not None}
    search: list[str] = [role for role in ("active", "target") if role in runs
              and not (role == "target" and target_is_active and "active" in runs)]
    steps: dict[int, Step] = {}
    wanted: dict[bytes, list[int]] = {}
    firsts: set[bytes] = set()
    for g in range(index.count):
        start, length = index.group_span(g)
        first = start // BLOCK
        if index.id(g) == zero_groups.get(length):
            steps[g] = Step(Source.ZERO)
        elif length == index.group_size and "target" in runs and \
                _group_id(runs["target"], first, k, n) == index.id(g):
            steps[g] = Step(Source.IN_PLACE)
        elif length == index.group_size:
            wanted.setdefault(index.id(g), []).append(g)
            firsts.add(index.first(g))
    _find(wanted, steps, {role: runs[role] for role in search}, k, n, index.group_size // BLOCK,
          firsts)
    detail = [g for g in range(index.count) if g not in steps]
    fetched = tables(detail) if detail else {}
    chunk_steps = _chunks(index, {g: fetched[g] for g in detail}, runs, search, zero_chunks)
    groups = tuple(GroupPlan(steps[g]) if g in steps else
                   GroupPlan(None, fetched[g], chunk_steps[g]) for g in range(index.count))
    return Plan(index, groups)


def _group_id(run_ids: list[bytes], first: int, k: int, n: int) -> bytes | None:
    if first + k * (n - 1) >= len(run_ids):
        return None
    return short_hash(b"".join(run_ids[first + k * j] for j in range(n)))


def _find(wanted: dict[bytes, list[int]], steps: dict[int, Step], runs: dict[str, list[bytes]],
          k: int, n: int, blocks: int, firsts: set[bytes] | None = None) -> None:
    """Runs of `n` chunks (`blocks` blocks) in the active slot, then in the target slot where
    the update has not written yet, for the wanted ids (id -> the groups or chunks wanting it).
    Where a group's id is hashed, `firsts` (the ids its first chunk may have) says first."""
    for role, source in (("active", Source.ACTIVE), ("target", Source.TARGET)):
        if role not in runs or not wanted:
            continue
        ids = runs[role]
        for first in range(0, len(ids) - k * (n - 1)):
            if n == 1:
                key = ids[first]
            elif firsts is not None and ids[first] not in firsts:
                continue
            else:
                key = short_hash(b"".join(ids[first + k * j] for j in range(n)))
            parts = wanted.get(key)
            if not parts:
                continue
            usable = parts if source is Source.ACTIVE else [p for p in parts if first >= p * blocks]
            for part in usable:
                steps[part] = Step(source, first)
            wanted[key] = [p for p in parts if p not in usable]
            if not wanted[key]:
                del wanted[key]
                if not wanted:
                    return


def _chunks(index: Index, tables: dict[int, ChunkTable], runs: dict[str, list[bytes]],
            search: list[str], zero_chunks: dict[int, bytes]) -> dict[int, tuple[Step, ...]]:
    k = index.chunk_blocks
    steps: dict[int, Step] = {}
    wanted: dict[bytes, list[int]] = {}
    for g, table in tables.items():
        for n, chunk in enumerate(index.chunks(g)):
            start, length = index.span(chunk)
            cid = table.id(n)
            if cid == zero_chunks.get(length):
                steps[chunk] = Step(Source.ZERO)
            elif length == index.chunk_size and "target" in runs and \
                    start // BLOCK < len(runs["target"]) and runs["target"][start // BLOCK] == cid:
                steps[chunk] = Step(Source.IN_PLACE)
            elif length == index.chunk_size:
                wanted.setdefault(cid, []).append(chunk)
    _find(wanted, steps, {role: runs[role] for role in search}, k, 1, k)
    return {g: tuple(steps.get(c, Step(Source.FETCH)) for c in index.chunks(g)) for g in tables}
