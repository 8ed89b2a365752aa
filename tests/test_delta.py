"""Delta updates on plain files: the chunk index, the block cache, the planner, range fetching
(a local file, an HTTP server with and without Range, a broken connection, a real registry) and
the assembler, including slots that changed behind abupgrade's back and servers that lie."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from abupgrade import oci
from abupgrade.delta import index as index_mod
from abupgrade.delta.assemble import STALE_LIMIT, Assembler, DeltaFailed
from abupgrade.delta.blocks import BlockCache, SlotBlocks, read_slot
from abupgrade.delta.image import IndexedImage
from abupgrade.delta.index import BLOCK, CHUNK_BLOCKS, chunk_id
from abupgrade.delta.plan import Plan, Source, make_plan
from abupgrade.delta.remote import (
    FileRanges,
    HttpRanges,
    OciRanges,
    RangeSource,
    RangesUnsupported,
    coalesce,
)
from abupgrade.errors import ImageRejected, OperationalError
from abupgrade.image import build
from abupgrade.image.keys import Keyring
from abupgrade.image.manifest import Compression, PayloadKind
from abupgrade.image.reader import ImageReader
from abupgrade.writer import SlotWriter
from fixtures.files import serve
from fixtures.images import KeyPair, keypair
from fixtures.registry import CuttingProxy, available, registry
from fixtures.tiers import needs_registry

CHUNK = BLOCK * CHUNK_BLOCKS


@dataclass(frozen=True)
class Releases:
    """v1 in both slots, v2 as a signed image; v2 differs by a few blocks, a shifted region and
    a block that appears nowhere in v1."""

    v1: bytes
    v2: bytes
    key: KeyPair
    image: Path
    target: Path
    active: Path

    @property
    def ring(self) -> Keyring:
        return Keyring.from_files([self.key.public])


def make_releases(tmp: Path, compression: str = "zstd") -> Releases:
    rng = random.Random(15)
    v1 = bytearray(rng.randbytes(1 << 20) + bytes(1 << 20) + rng.randbytes(512 << 10))
    v2 = bytearray(v1)
    v2[10 * BLOCK:12 * BLOCK] = rng.randbytes(2 * BLOCK)  # changed in place
    v2[100 * BLOCK:200 * BLOCK] = v1[101 * BLOCK:201 * BLOCK]  # moved by a block (a file shrank)
    v2[300 * BLOCK:301 * BLOCK] = bytes(BLOCK)  # zeroed
    key = keypair(tmp / "keys")
    (tmp / "v2.img").write_bytes(v2)
    image = tmp / f"v2-{compression}.tar"
    build.build(tmp / "v2.img", "2.0", "box", [key.private], image, compression=compression)
    (tmp / "target.img").write_bytes(v1)
    (tmp / "active.img").write_bytes(v1)
    return Releases(bytes(v1), bytes(v2), key, image, tmp / "target.img", tmp / "active.img")


def run_delta(rel: Releases, ranges: RangeSource, *, target_blocks: SlotBlocks | None = None,
              active_blocks: SlotBlocks | None = None) -> tuple[Assembler, int]:
    """Assemble v2 into the target like apply does: streamed into the real writer, which
    writes only the blocks that differ while the assembler still reads the target ahead of
    it, then reads the whole slot back."""
    image = IndexedImage(ranges, rel.ring)
    assert image.index is not None
    plan = make_plan(image.index, image.tables,
                     target=target_blocks or read_slot(rel.target, len(rel.v2)),
                     active=active_blocks or read_slot(rel.active, len(rel.v1)))
    payload = image.manifest.slot
    with Assembler(plan, image, target=rel.target, active=rel.active) as assembler, \
            SlotWriter(rel.target) as writer:
        stats = writer.write_payload(payload.size, payload.sha256, assembler.pieces(),
                                     compare=True)
    return assembler, stats.written


# ------------------------------------------------------------------ the index


def test_index_round_trip_and_its_checks() -> None:
    data = os.urandom(3 * CHUNK + 100)
    ids = [chunk_id(data[at:at + CHUNK]) for at in range(0, len(data), CHUNK)]
    index, tables = index_mod.build(len(data), ids, [5, 6, 7, 8], group_chunks=3)
    raw = index.serialize()
    back = index_mod.parse(raw, payload_size=len(data))
    assert (back.count, list(back.stored), list(back.stored_offsets)) == (2, [18, 8], [0, 18])
    assert back.span(3) == (3 * CHUNK, 100) and back.chunks(1) == range(3, 4)
    first = back.table(0, tables[:back.table_sizes[0]])
    assert (first.ids, list(first.stored)) == (b"".join(ids[:3]), [5, 6, 7])
    assert back.id(0) == index_mod.short_hash(b"".join(ids[:3]))
    with pytest.raises(ImageRejected, match="does not match the index"):
        back.table(1, tables[:back.table_sizes[0]])  # another group's table
    with pytest.raises(ImageRejected, match="describes"):
        index_mod.parse(raw, payload_size=len(data) + 1)
    with pytest.raises(ImageRejected, match="unknown format"):
        index_mod.parse(b"X" + raw[1:], payload_size=len(data))
    with pytest.raises(ImageRejected):
        index_mod.parse(raw[:-1], payload_size=len(data))
    absurd, _ = index_mod.build(len(data), ids, [5, 6, 7, 2 * CHUNK], group_chunks=3)
    with pytest.raises(ImageRejected, match="group 1 claims"):
        index_mod.parse(absurd.serialize(), payload_size=len(data))


def test_chunk_id_is_over_block_digests() -> None:
    data = os.urandom(CHUNK)
    digests = b"".join(hashlib.sha256(data[i:i + BLOCK]).digest() for i in range(0, CHUNK, BLOCK))
    assert chunk_id(data) == hashlib.sha256(digests).digest()[:8]
    assert SlotBlocks(len(data), digests).run_ids(CHUNK_BLOCKS) == [chunk_id(data)]


def test_built_image_carries_an_index_that_reads_like_any_image(tmp_path: Path) -> None:
    rel = make_releases(tmp_path)
    with rel.image.open("rb") as f:
        reader = ImageReader(f, rel.ring)
        kinds = [p.kind for p in reader.manifest.payloads]
        got = {p.name: b"".join(bytes(c) for c in chunks) for p, chunks in reader.payloads()}
    assert reader.manifest.format == 3  # BLAKE3 digests too
    assert kinds == [PayloadKind.INDEX, PayloadKind.CHUNKS, PayloadKind.SLOT]
    assert reader.manifest.slot.compression is Compression.ZSTD  # in frames, one per chunk
    assert got == {"rootfs": rel.v2}  # the index is checked, not handed out
    gz = build.build(tmp_path / "v2.img", "2.0", "box", [rel.key.private], tmp_path / "gz.tar",
                     compression="gzip")
    assert gz.format == 3 and gz.index is None  # gzip cannot be fetched in parts: no index
    old = build.build(tmp_path / "v2.img", "2.0", "box", [rel.key.private], tmp_path / "old.tar",
                      compression="zstd", blake3=False)
    assert old.format == 2 and old.index is not None  # what abupgrade before BLAKE3 reads
    assert all(p.blake3 is None for p in old.payloads)


# ------------------------------------------------------------------ the block cache


def test_block_cache_round_trip_and_corruption(tmp_path: Path) -> None:
    slot = tmp_path / "slot.img"
    slot.write_bytes(os.urandom(5 * BLOCK + 10))
    blocks = read_slot(slot, 5 * BLOCK + 10)
    assert blocks.count == 6
    cache = BlockCache(tmp_path / "state" / "blocks")
    sha = "a" * 64
    assert cache.load(sha) is None
    cache.save(sha, blocks)
    assert cache.load(sha) == blocks
    path = tmp_path / "state" / "blocks" / f"{sha}.blocks"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    assert cache.load(sha) is None  # corrupt: ignored, to be rebuilt
    path.write_bytes(raw[:40])
    assert cache.load(sha) is None
    cache.save("b" * 64, blocks)
    cache.prune(["b" * 64, None])
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{'b' * 64}.blocks"]


# ------------------------------------------------------------------ the planner


def digests_of(data: bytes) -> SlotBlocks:
    return SlotBlocks(len(data), b"".join(index_mod.block_digests(data)))


@dataclass(frozen=True)
class Indexed:
    index: index_mod.Index
    tables: bytes

    def fetch(self, groups: list[int]) -> dict[int, index_mod.ChunkTable]:
        offsets = self.index.table_offsets
        return {g: self.index.table(g, self.tables[offsets[g]:offsets[g] + self.index.table_sizes[g]])
                for g in groups}


def index_of(data: bytes, group_chunks: int) -> Indexed:
    ids = [chunk_id(data[at:at + CHUNK]) for at in range(0, len(data), CHUNK)]
    sizes = [len(data[at:at + CHUNK]) for at in range(0, len(data), CHUNK)]
    return Indexed(*index_mod.build(len(data), ids, sizes, group_chunks=group_chunks))


def plan_of(new: bytes, target: bytes | None, active: bytes | None,
            group_chunks: int = 6) -> tuple[Plan, list[int]]:
    """The plan, and the groups whose chunk tables it fetched."""
    indexed = index_of(new, group_chunks)
    asked: list[int] = []

    def tables(groups: list[int]) -> dict[int, index_mod.ChunkTable]:
        asked.extend(groups)
        return indexed.fetch(groups)

    plan = make_plan(indexed.index, tables, target=digests_of(target) if target else None,
                     active=digests_of(active) if active else None)
    return plan, asked


def test_plan_takes_the_cheapest_source() -> None:
    a, b, c, d, e = (os.urandom(CHUNK) for _ in range(5))
    zero = bytes(CHUNK)
    new = a + zero + b + c + d + e
    target = a + b + zero + zero + zero + c  # a in place; c further on (not yet overwritten)
    active = zero + e + b  # b and e, moved
    plan, asked = plan_of(new, target, active)
    (group,) = plan.groups
    assert asked == [0] and group.step is None
    assert [s.source for s in group.chunks] == [Source.IN_PLACE, Source.ZERO, Source.ACTIVE,
                                                Source.TARGET, Source.FETCH, Source.ACTIVE]
    assert group.chunks[2].block == 2 * CHUNK_BLOCKS and group.chunks[3].block == 5 * CHUNK_BLOCKS
    assert plan.fetch_bytes == CHUNK and plan.bytes_from(Source.ACTIVE) == 2 * CHUNK


def test_plan_finds_whole_groups_without_their_chunk_tables() -> None:
    chunks = [os.urandom(CHUNK) for _ in range(6)]
    zero = bytes(2 * CHUNK)
    new = b"".join(chunks[:2]) + zero + b"".join(chunks[2:4]) + os.urandom(CHUNK) + chunks[4]
    target = b"".join(chunks[:2])  # group 0 in place
    active = os.urandom(BLOCK) + b"".join(chunks[2:5])  # group 2 at a block offset, chunk 4
    plan, asked = plan_of(new, target, active, group_chunks=2)
    assert [g.step.source if g.step else None for g in plan.groups] == [
        Source.IN_PLACE, Source.ZERO, Source.ACTIVE, None]
    assert plan.groups[2].step is not None and plan.groups[2].step.block == 1
    assert asked == [3]  # only the group that is not anywhere whole
    assert [s.source for s in plan.groups[3].chunks] == [Source.FETCH, Source.ACTIVE]


def test_plan_never_reads_target_blocks_already_overwritten() -> None:
    a, b = os.urandom(CHUNK), os.urandom(CHUNK)
    plan, _ = plan_of(b + a, a + b, None)
    # a sits at chunk 0 of the target, which the update writes (with b) before it needs a
    assert [s.source for s in plan.groups[0].chunks] == [Source.TARGET, Source.FETCH]


def test_plan_finds_runs_at_any_block_offset() -> None:
    payload = os.urandom(2 * CHUNK)
    active = os.urandom(BLOCK) + payload[CHUNK:] + os.urandom(BLOCK) + payload[:CHUNK]
    plan, _ = plan_of(payload, None, active)  # shifted by a block, not by a chunk
    assert [(s.source, s.block) for s in plan.groups[0].chunks] == [
        (Source.ACTIVE, 2 + CHUNK_BLOCKS), (Source.ACTIVE, 1)]


# ------------------------------------------------------------------ fetching ranges


def test_coalesce_merges_close_ranges() -> None:
    assert coalesce([(0, 10), (10, 5), (100, 5), (4202, 1)], gap=4096) == [(0, 105), (4202, 1)]
    assert coalesce([(0, 10), (4106, 1)], gap=4096) == [(0, 4107)]
    assert coalesce([(0, 10), (20, 5)], gap=0) == [(0, 10), (20, 5)]
    with pytest.raises(ValueError):
        coalesce([(10, 10), (5, 1)])


def test_file_ranges_yield_exactly_what_was_asked(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    ranges = FileRanges(tmp_path / "f")
    ranges.gap = 1 << 20
    asked = [(0, 3), (5, 0), (5, 7), (2 << 20, 5), ((2 << 20) + 10, (1 << 20) - 10)]
    assert list(ranges.fetch(asked)) == [data[o:o + n] for o, n in asked if n]
    with pytest.raises(ImageRejected):
        ranges.read(len(data) - 1, 2)


def test_http_ranges_merge_requests_and_resume_a_broken_connection(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    (tmp_path / "image.tar").write_bytes(data)
    asked = [(at, 5000) for at in range(0, len(data) - 5000, 9000)]
    with serve(tmp_path) as server:
        ranges = HttpRanges(f"{server.url}/image.tar")
        ranges.gap = 4096
        assert ranges.size == len(data)
        assert list(ranges.fetch(asked)) == [data[o:o + n] for o, n in asked]
        assert ranges.requests == 2  # the probe, then one merged request (gaps of 4000 bytes)
        ranges.gap = 0
        assert list(ranges.fetch(asked[:3])) == [data[o:o + n] for o, n in asked[:3]]
        assert ranges.requests == 5
        with CuttingProxy(server.port, after=1 << 20, cuts=2) as proxy:
            cut = HttpRanges(f"http://{proxy.host}/image.tar")
            assert list(cut.fetch([(10, len(data) - 20)])) == [data[10:-10]]
            assert proxy.cut == 2
        ranges.close()


def test_http_reads_while_a_fetch_streams(tmp_path: Path) -> None:
    """A chunk read alone (a stale one) while the merged fetch is half way through its
    response: each has a connection of its own, nothing is resumed or sent twice."""
    data = os.urandom(3 << 20)
    (tmp_path / "image.tar").write_bytes(data)
    with serve(tmp_path) as server:
        ranges = HttpRanges(f"{server.url}/image.tar")
        stream = ranges.fetch([(0, 1000), (1 << 20, 1000), (2 << 20, 1000)])
        assert next(stream) == data[:1000]
        assert ranges.read(500_000, 10) == data[500_000:500_010]
        assert list(stream) == [data[1 << 20:(1 << 20) + 1000], data[2 << 20:(2 << 20) + 1000]]
        assert ranges.requests == 5  # probe, three spans, one read
        assert ranges.received == 1 + 3000 + 10


def test_http_without_range_support_is_told_apart(tmp_path: Path) -> None:
    (tmp_path / "image.tar").write_bytes(os.urandom(100000))
    with serve(tmp_path, ranges=False) as server, pytest.raises(RangesUnsupported):
        HttpRanges(f"{server.url}/image.tar")


def test_http_ranges_ask_for_new_credentials_once(tmp_path: Path) -> None:
    data = os.urandom(100000)
    (tmp_path / "blob").write_bytes(data)
    with serve(tmp_path) as server:
        asked = []

        def refresh() -> tuple[str, dict[str, str]]:
            asked.append(1)
            return f"{server.url}/blob", {"Authorization": "Bearer fresh"}

        ranges = HttpRanges(f"{server.url}/blob", size=len(data),
                            headers={"Authorization": "Bearer expired"}, refresh=refresh)
        server.forbid = "Bearer fresh"
        assert ranges.read(10, 20) == data[10:30] and len(asked) == 1
        server.forbid = "Bearer newer"
        with pytest.raises(OperationalError, match="HTTP 403"):
            ranges.read(0, 5)  # refreshed once per request, not forever


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    needs_registry(available())
    with registry(tmp_path_factory.mktemp("registry")) as server:
        yield server.host


def test_oci_ranges_read_the_pushed_image_across_blobs(tmp_path: Path, plain_registry: str) -> None:
    rel = make_releases(tmp_path)
    reference = f"oci://{plain_registry}/delta/os:2.0"
    oci.push(rel.image, reference)
    data = rel.image.read_bytes()
    ranges = OciRanges(reference)
    ranges.gap = 0
    assert ranges.size == len(data) and len(ranges.layers) >= 4
    asked = [(0, 100), (ranges.starts[1] - 50, 100), (len(data) - 1024, 1024)]  # one straddles blobs
    assert list(ranges.fetch(asked)) == [data[o:o + n] for o, n in asked]
    assert ranges.received == sum(n for _, n in asked)


# ------------------------------------------------------------------ assembling


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_delta_from_a_file_builds_the_exact_payload(tmp_path: Path, compression: str) -> None:
    rel = make_releases(tmp_path, compression)
    assembler, written = run_delta(rel, FileRanges(rel.image))
    assert rel.target.read_bytes()[:len(rel.v2)] == rel.v2
    tally = assembler.tally
    assert tally.fetched == CHUNK  # the chunk with new blocks; the rest is local
    assert tally.in_place + tally.from_active + tally.zeros + tally.fetched == len(rel.v2)
    changed = [i for i in range(0, len(rel.v2), BLOCK) if rel.v1[i:i + BLOCK] != rel.v2[i:i + BLOCK]]
    assert written == len(changed) * BLOCK
    assert assembler.blocks == digests_of(rel.v2)  # what the block cache keeps for the slot


def test_delta_over_http_downloads_only_the_missing_chunk(tmp_path: Path) -> None:
    rel = make_releases(tmp_path)
    with serve(tmp_path) as server:
        ranges = HttpRanges(f"{server.url}/{rel.image.name}")
        assembler, _ = run_delta(rel, ranges)
    assert rel.target.read_bytes()[:len(rel.v2)] == rel.v2
    assert assembler.tally.fetched == CHUNK
    # the signed head and the index (read ahead 64 KiB), the member headers, one chunk
    assert ranges.received < 100 << 10 < rel.image.stat().st_size // 10


@pytest.mark.parametrize("where", ["file", "http"])
def test_a_slot_changed_behind_abupgrades_back_is_fetched_instead(tmp_path: Path,
                                                                   where: str) -> None:
    rel = make_releases(tmp_path)
    cached = read_slot(rel.active, len(rel.v1))  # digests taken, then the slot changes
    with rel.active.open("r+b") as f:
        for at in (520, 580):  # two places: the second refetch comes while chunks stream
            f.seek(at * BLOCK)
            f.write(os.urandom(3 * CHUNK))
    with serve(tmp_path) as server:
        ranges: RangeSource = (FileRanges(rel.image) if where == "file"
                               else HttpRanges(f"{server.url}/{rel.image.name}"))
        assembler, _ = run_delta(rel, ranges, active_blocks=cached,
                                 target_blocks=SlotBlocks(0, b""))
    assert rel.target.read_bytes()[:len(rel.v2)] == rel.v2
    assert assembler.tally.stale["active"] >= 6


def test_a_slot_changed_everywhere_gives_the_delta_up(tmp_path: Path) -> None:
    rel = make_releases(tmp_path)
    cached = read_slot(rel.active, len(rel.v1))
    rel.active.write_bytes(os.urandom(len(rel.v1)))
    with pytest.raises(DeltaFailed, match=f"more than {STALE_LIMIT} chunks of the active slot"):
        run_delta(rel, FileRanges(rel.image), active_blocks=cached, target_blocks=SlotBlocks(0, b""))
    assert rel.target.read_bytes() == rel.v1  # nothing was written


def test_a_server_that_sends_other_bytes_gives_the_delta_up(tmp_path: Path) -> None:
    rel = make_releases(tmp_path, "none")
    image = IndexedImage(FileRanges(rel.image), rel.ring)
    assert image.index is not None
    plan = make_plan(image.index, image.tables, target=read_slot(rel.target, len(rel.v2)),
                     active=read_slot(rel.active, len(rel.v1)))
    _, at, _ = next(plan.fetches())
    data = bytearray(rel.image.read_bytes())
    data[image.slot.data + at + 7] ^= 1  # unsigned bytes, changed
    tampered = tmp_path / "tampered.tar"
    tampered.write_bytes(data)
    lying = IndexedImage(FileRanges(tampered), rel.ring)  # the head is still good
    with Assembler(plan, lying, target=rel.target, active=rel.active) as assembler, \
            pytest.raises(DeltaFailed, match="does not match the signed index"):
        list(assembler.pieces())


def test_a_plan_from_wrong_digests_cannot_pass_a_wrong_payload(tmp_path: Path) -> None:
    """Digests that lie about the slots only cost fetches: every chunk is checked by its id."""
    rel = make_releases(tmp_path)
    liar = digests_of(rel.v2)  # says the target already holds v2 everywhere
    assembler, _ = run_delta(rel, FileRanges(rel.image), target_blocks=liar, active_blocks=liar)
    assert rel.target.read_bytes()[:len(rel.v2)] == rel.v2
    assert assembler.tally.stale.get("target", 0) > 0


def test_tampered_index_is_rejected_before_any_chunk(tmp_path: Path) -> None:
    rel = make_releases(tmp_path)
    image = IndexedImage(FileRanges(rel.image), rel.ring)
    member = image.members["rootfs.index"]
    data = bytearray(rel.image.read_bytes())
    data[member.data + member.stored - 1] ^= 1  # the group index
    (tmp_path / "bad.tar").write_bytes(data)
    with pytest.raises(ImageRejected, match="does not match its blake3"):
        IndexedImage(FileRanges(tmp_path / "bad.tar"), rel.ring)


def test_image_build_warns_about_what_defeats_deltas(tmp_path: Path) -> None:
    from fixtures.guest import make_ext4_image

    small = make_ext4_image(tmp_path / "1k.img", None, 8 << 20, "r", block_size=1024)
    good = make_ext4_image(tmp_path / "4k.img", None, 8 << 20, "r", block_size=4096)
    assert any("1024-byte blocks" in w for w in build.rootfs_warnings(small, "zstd"))
    assert build.rootfs_warnings(good, "zstd") == []
    assert any("cannot be fetched in parts" in w for w in build.rootfs_warnings(good, "xz"))
    assert build.rootfs_warnings(good, "xz", index=False) == []


def test_https_ranges_with_a_private_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures.registry import make_ca

    ca = make_ca(tmp_path / "ca")
    data = os.urandom(50000)
    (tmp_path / "image.tar").write_bytes(data)
    with serve(tmp_path, tls=ca) as server:
        with pytest.raises(OperationalError):
            HttpRanges(f"{server.url}/image.tar")  # not trusted
        monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca))
        ranges = HttpRanges(f"{server.url}/image.tar")
        assert list(ranges.fetch([(5, 10), (40000, 100)])) == [data[5:15], data[40000:40100]]


def test_a_slot_smaller_than_the_payload_is_read_as_far_as_it_goes(tmp_path: Path) -> None:
    slot = tmp_path / "small.img"
    slot.write_bytes(os.urandom(3 * BLOCK))
    blocks = read_slot(slot, 10 * BLOCK)
    assert (blocks.size, blocks.count) == (3 * BLOCK, 3)


def test_plan_does_not_search_a_target_that_holds_the_active_image() -> None:
    a, b = os.urandom(CHUNK), os.urandom(CHUNK)
    indexed = index_of(b + a, 6)
    same = digests_of(a + b)
    plan = make_plan(indexed.index, indexed.fetch, target=same, active=None,
                     target_is_active=True)
    assert [s.source for s in plan.groups[0].chunks] == [Source.TARGET, Source.FETCH]
    plan = make_plan(indexed.index, indexed.fetch, target=same, active=same,
                     target_is_active=True)  # found in the active slot, the target not read
    assert [s.source for s in plan.groups[0].chunks] == [Source.ACTIVE, Source.ACTIVE]
