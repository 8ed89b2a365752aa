"""Build a signed image: hash the inputs, then write manifest, signatures and payloads."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from abupgrade.delta import index as index_mod
from abupgrade.delta.index import BLOCK, CHUNK_BLOCKS, chunk_id
from abupgrade.errors import ImageRejected, OperationalError, UsageError
from abupgrade.fsutil import atomic_writer, open_input
from abupgrade.image import signature
from abupgrade.image.compress import compress_chunks, encoder
from abupgrade.image.keys import load_private
from abupgrade.image.manifest import (
    MANIFEST_NAME,
    SIGNATURES_NAME,
    Compression,
    Manifest,
    Payload,
    PayloadKind,
    blake3_hasher,
)
from abupgrade.image.tar import END_MARKER, encode_header, padding
from abupgrade.progress import NullProgress, Progress

SLOT_PAYLOAD = "rootfs"
INDEX_SUFFIX = ".index"
CHUNKS_SUFFIX = ".chunks"
CHUNK = 1 << 20
BATCH = 1 << 22  # bytes of chunks compressed at once (on every core)


@dataclass(frozen=True)
class _Input:
    name: str
    kind: PayloadKind
    path: Path
    compression: Compression


def build(
    rootfs: Path,
    version: str,
    compatible: str,
    keys: Sequence[Path],
    out: Path,
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    compression: str | Compression = Compression.ZSTD,
    index: bool = True,
    progress: Progress | None = None,
    security_floor: str | None = None,
    force: bool = False,
    blake3: bool = True,
) -> Manifest:
    """Write a signed image of `rootfs` (plus optional kernel and initrd) to `out` atomically.

    `compression` applies to the slot payload; kernel and initrd are stored as they are (they
    come compressed already). With `index` (and compression none or zstd), a chunk index goes
    before the slot payload and a zstd payload is stored chunk by chunk, so that `apply` can
    build the slot from what the machine holds and fetch only the rest (see abupgrade.delta).
    `security_floor`: once this image is committed on a machine, the machine accepts no image
    older than that version any more. With `blake3` (format 3), every payload gets a BLAKE3
    digest beside its SHA-256, and readers check that one (about three times as fast);
    without, SHA-256 only, for machines whose abupgrade reads formats 1 and 2 only.
    """
    sink: Progress = progress or NullProgress()
    codec = compression if isinstance(compression, Compression) else Compression.parse(compression)
    if not keys:
        raise UsageError("an image needs at least one signing key", hint="pass --key K.key")
    private_keys = [load_private(path) for path in keys]
    _check_output(out, [rootfs, *keys, *(p for p in (kernel, initrd) if p is not None)],
                  force=force)
    indexed = index and codec in (Compression.NONE, Compression.ZSTD)
    inputs = [_Input(SLOT_PAYLOAD, PayloadKind.SLOT, rootfs, codec)]
    for name, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None:
            inputs.append(_Input(name, PayloadKind.BOOT, path, Compression.NONE))

    with contextlib.ExitStack() as stack:
        if not indexed:
            payloads = tuple(_hash(item, sink, blake3) for item in inputs)
            return _write(out, version, compatible, private_keys, inputs, payloads, {}, sink,
                          security_floor)
        stored = stack.enter_context(tempfile.TemporaryFile(dir=out.parent))
        slot, index_bytes, tables = _chunked(inputs[0], stored, sink, blake3)
        sources: dict[str, bytes | BinaryIO] = {}
        extra = []
        for suffix, kind, data in ((INDEX_SUFFIX, PayloadKind.INDEX, index_bytes),
                                   (CHUNKS_SUFFIX, PayloadKind.CHUNKS, tables)):
            name = SLOT_PAYLOAD + suffix
            hashes = _Hashes(blake3)
            hashes.update(data)
            extra.append((_Input(name, kind, rootfs, Compression.NONE),
                          hashes.payload(name, kind, len(data), Compression.NONE)))
            sources[name] = data
        if slot.compression is Compression.ZSTD:
            sources[SLOT_PAYLOAD] = stored  # the frames made while indexing
        payloads = (*(p for _, p in extra), slot,
                    *(_hash(item, sink, blake3) for item in inputs[1:]))
        return _write(out, version, compatible, private_keys, [*(i for i, _ in extra), *inputs],
                      payloads, sources, sink, security_floor)


def _write(out: Path, version: str, compatible: str, private_keys: Sequence[Ed25519PrivateKey],
           inputs: Sequence[_Input], payloads: tuple[Payload, ...],
           sources: dict[str, bytes | BinaryIO], sink: Progress,
           security_floor: str | None) -> Manifest:
    """Sign the manifest of `payloads` and write the image. A payload named in `sources` is
    written from those bytes (or that file of stored bytes), the others from their input."""
    try:
        manifest = Manifest.create(version, compatible, payloads, security_floor=security_floor)
    except ImageRejected as e:
        raise UsageError(e.message, hint=e.hint) from None
    manifest_bytes = manifest.serialize()
    sig_bytes = signature.sign(manifest_bytes, private_keys)
    mtime = int(datetime.datetime.fromisoformat(manifest.created).timestamp())

    sink.start("write", sum(p.size for p in payloads))
    try:
        with atomic_writer(out) as dest:
            _write_member(dest, MANIFEST_NAME, manifest_bytes, mtime)
            _write_member(dest, SIGNATURES_NAME, sig_bytes, mtime)
            for item, payload in zip(inputs, payloads, strict=True):
                source = sources.get(payload.name)
                if isinstance(source, bytes):
                    _write_member(dest, payload.name, source, mtime)
                elif source is not None:
                    _copy_member(dest, payload.name, source, mtime)
                    sink.advance(payload.size)
                else:
                    _write_payload(dest, item, payload, mtime, sink)
            dest.write(END_MARKER)
    except OSError as e:
        raise OperationalError(f"writing {out} failed: {e.strerror or e}") from None
    finally:
        sink.finish()
    return manifest


def rootfs_warnings(rootfs: Path, compression: str | Compression, index: bool = True) -> list[str]:
    """What makes delta updates of this rootfs poor: said by `image build`, never fatal."""
    warnings = []
    codec = compression if isinstance(compression, Compression) else Compression.parse(compression)
    if index and codec not in (Compression.NONE, Compression.ZSTD):
        warnings.append(f"{codec} payloads cannot be fetched in parts: this image gets no chunk "
                        "index and every update downloads it whole (use --compress zstd)")
    try:
        with rootfs.open("rb") as f:
            f.seek(1024)
            superblock = f.read(1024)
    except OSError:
        return warnings
    if len(superblock) == 1024 and superblock[0x38:0x3A] == b"\x53\xef":
        block = 1024 << int.from_bytes(superblock[0x18:0x1C], "little")
        if block != BLOCK:
            warnings.append(f"{rootfs} is an ext2/3/4 filesystem with {block}-byte blocks: files "
                            "do not stay 4 KiB-aligned across releases and delta updates reuse "
                            "little (make it with mkfs.ext4 -b 4096)")
    return warnings


def _check_output(out: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that is one of the inputs, that exists (unless `force`), or that is
    not a regular file."""
    if not out.parent.is_dir():
        raise UsageError(f"output directory {out.parent} does not exist")
    for path in inputs:
        same = os.path.realpath(path) == os.path.realpath(out)
        if not same and out.exists() and path.exists():
            same = os.path.samefile(path, out)
        if same:
            raise UsageError(f"the output {out} is also an input ({path})",
                             hint="write the image to another file")
    if out.is_symlink() or out.exists():
        if not out.is_file() or out.is_symlink():
            raise UsageError(f"the output {out} exists and is not a regular file")
        if not force:
            raise UsageError(f"{out} exists", hint="pass --force to replace it")


def _open(path: Path) -> io.BufferedReader:
    handle = open_input(path)
    mode = os.fstat(handle.fileno()).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        handle.close()
        raise UsageError(f"{path} is neither a regular file nor a block device")
    return handle


def _blocks(handle: io.BufferedReader, path: Path) -> Iterator[memoryview]:
    buffer = memoryview(bytearray(CHUNK))
    while True:
        try:
            n = handle.readinto(buffer)
        except OSError as e:
            raise OperationalError(f"reading {path} failed: {e.strerror}") from None
        if not n:
            return
        yield buffer[:n]


class _Hashes:
    """A payload's digests, taken in one pass: SHA-256, and BLAKE3 for format 3."""

    def __init__(self, blake3: bool) -> None:
        self.sha256 = hashlib.sha256()
        self.blake3 = blake3_hasher() if blake3 else None

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self.blake3 is not None:
            self.blake3.update(data)

    def payload(self, name: str, kind: PayloadKind, size: int, compression: Compression
                ) -> Payload:
        return Payload(name, kind, size, self.sha256.hexdigest(), compression,
                       None if self.blake3 is None else self.blake3.hexdigest())


def _hash(item: _Input, sink: Progress, blake3: bool) -> Payload:
    digest = _Hashes(blake3)
    size = 0
    with _open(item.path) as handle:
        sink.start(f"hash {item.name}", _size(handle))
        for block in _blocks(handle, item.path):
            digest.update(block)
            size += len(block)
            sink.advance(len(block))
        sink.finish()
    if size == 0:
        raise UsageError(f"{item.path} is empty")
    return digest.payload(item.name, item.kind, size, item.compression)


def _chunked(item: _Input, stored: BinaryIO, sink: Progress, blake3: bool
             ) -> tuple[Payload, bytes, bytes]:
    """Cut the slot input into chunks, compress each into its own zstd frame in `stored` (an
    uncompressed payload stores nothing here); the payload entry, the index and the chunk
    tables."""
    digest = _Hashes(blake3)
    ids: list[bytes] = []
    sizes: list[int] = []
    size = 0
    chunk = BLOCK * CHUNK_BLOCKS
    with _open(item.path) as handle:
        sink.start(f"index {item.name}", _size(handle))
        while batch := _read_full(handle, item.path, BATCH):
            digest.update(batch)
            pieces = [batch[at:at + chunk] for at in range(0, len(batch), chunk)]
            ids += [chunk_id(piece) for piece in pieces]
            if item.compression is Compression.ZSTD:
                frames = compress_chunks(pieces)
                stored.writelines(frames)
                sizes += [len(frame) for frame in frames]
            else:  # stored as it is: written from the input like any plain payload
                sizes += [len(piece) for piece in pieces]
            size += len(batch)
            sink.advance(len(batch))
        sink.finish()
    if size == 0:
        raise UsageError(f"{item.path} is empty")
    index, tables = index_mod.build(size, ids, sizes)
    stored.flush()
    stored.seek(0)
    payload = digest.payload(item.name, item.kind, size, item.compression)
    return payload, index.serialize(), tables


def _read_full(handle: io.BufferedReader, path: Path, n: int) -> bytes:
    try:
        return handle.read(n)
    except OSError as e:
        raise OperationalError(f"reading {path} failed: {e.strerror}") from None


def _copy_member(dest: BinaryIO, name: str, source: BinaryIO, mtime: int) -> None:
    size = source.seek(0, os.SEEK_END)
    source.seek(0)
    dest.write(encode_header(name, size, mtime))
    while data := source.read(CHUNK):
        dest.write(data)
    dest.write(bytes(padding(size)))


def _size(handle: BinaryIO) -> int:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    return size


def _write_member(dest: BinaryIO, name: str, data: bytes, mtime: int) -> None:
    dest.write(encode_header(name, len(data), mtime))
    dest.write(data)
    dest.write(bytes(padding(len(data))))


def _write_payload(dest: BinaryIO, item: _Input, payload: Payload, mtime: int, sink: Progress) -> None:
    """Stream one payload; a compressed member's header is patched once its size is known."""
    start = dest.tell()
    dest.write(encode_header(payload.name, payload.size, mtime))
    codec = encoder(payload.compression, payload.size)
    digest = payload.hasher()
    stored = 0
    with _open(item.path) as handle:
        for block in _blocks(handle, item.path):
            digest.update(block)
            if payload.compression is Compression.NONE:
                stored += dest.write(block)
            else:
                stored += dest.write(codec.compress(block))
            sink.advance(len(block))
    stored += dest.write(codec.flush())
    if digest.hexdigest() != payload.digest:
        raise OperationalError(
            f"{item.path} changed while the image was being built", hint="build from a quiet file"
        )
    if stored != payload.size or payload.compression is not Compression.NONE:
        end = dest.tell()
        dest.seek(start)
        dest.write(encode_header(payload.name, stored, mtime))
        dest.seek(end)
    dest.write(bytes(padding(stored)))
