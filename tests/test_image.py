"""Image format: keys, manifest, build and streaming verification round trips, sources."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from abupgrade.errors import ImageRejected, OperationalError, UsageError
from abupgrade.image import keys, manifest, reader
from abupgrade.image.build import build
from abupgrade.image.keys import Keyring
from abupgrade.image.manifest import Compression, compare_versions
from abupgrade.source import open_source

ROOTFS = os.urandom(40_000) + bytes(30_000) + b"tail"
KERNEL = os.urandom(1_500)
INITRD = os.urandom(700)


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    return keys.generate(tmp_path / "one")


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    paths = {"rootfs": tmp_path / "rootfs.img", "kernel": tmp_path / "vmlinuz"}
    paths["initrd"] = tmp_path / "initrd.img"
    paths["rootfs"].write_bytes(ROOTFS)
    paths["kernel"].write_bytes(KERNEL)
    paths["initrd"].write_bytes(INITRD)
    return paths


def make_image(
    tmp_path: Path, inputs: dict[str, Path], key_files: list[Path], compression: str = "none"
) -> Path:
    out = tmp_path / f"image-{compression}.tar"
    build(
        inputs["rootfs"],
        "1.2.3",
        "acme-box",
        key_files,
        out,
        kernel=inputs["kernel"],
        initrd=inputs["initrd"],
        compression=compression,
    )
    return out


def read_all(image: Path, keyring: Keyring) -> dict[str, bytes]:
    result: dict[str, bytes] = {}
    with image.open("rb") as stream:
        for payload, chunks in reader.ImageReader(stream, keyring).payloads():
            result[payload.name] = b"".join(bytes(c) for c in chunks)
    return result


class RecordingProgress:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def start(self, label: str, total: int) -> None:
        self.events.append((label, total))

    def advance(self, done: int) -> None:
        self.events.append(("advance", done))

    def finish(self) -> None:
        self.events.append(("finish", 0))


# --- keys -------------------------------------------------------------------------------------


def test_keygen_writes_private_0600_and_public(tmp_path: Path) -> None:
    private, public = keys.generate(tmp_path / "site")
    assert (private.name, public.name) == ("site.key", "site.pub")
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    loaded = keys.load_private(private)
    assert keys.key_id(loaded.public_key()) == keys.key_id(keys.load_public(public))
    assert keys.permission_warning(private) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.key", "site.pub"]


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    private, public = keys.generate(tmp_path / "site")
    before = private.read_bytes()
    with pytest.raises(UsageError, match="exists"):
        keys.generate(tmp_path / "site")
    assert private.read_bytes() == before
    (tmp_path / "other.pub").write_text("someone else's")
    with pytest.raises(UsageError, match="exists"):
        keys.generate(tmp_path / "other")
    assert not (tmp_path / "other.key").exists()
    assert (tmp_path / "other.pub").read_text() == "someone else's"


def test_key_id_is_sha256_prefix_of_raw_public_key(keypair: tuple[Path, Path]) -> None:
    from cryptography.hazmat.primitives import serialization

    public = keys.load_public(keypair[1])
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert keys.key_id(public) == hashlib.sha256(raw).hexdigest()[:16]


def test_loose_private_key_permissions_are_reported(keypair: tuple[Path, Path]) -> None:
    keypair[0].chmod(0o640)
    warning = keys.permission_warning(keypair[0])
    assert warning is not None and "0640" in warning


def test_wrong_key_files_are_usage_errors(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError, match="not an unencrypted PEM private key"):
        keys.load_private(keypair[1])
    with pytest.raises(UsageError, match="not a PEM public key"):
        keys.load_public(keypair[0])
    with pytest.raises(UsageError, match="does not exist"):
        keys.load_private(tmp_path / "missing.key")


def test_keyring_from_dir_reads_every_pub(tmp_path: Path) -> None:
    ring_dir = tmp_path / "ring"
    ring_dir.mkdir()
    _, pub_a = keys.generate(ring_dir / "a")
    _, pub_b = keys.generate(ring_dir / "b")
    ring = Keyring.from_dir(ring_dir)
    assert len(ring) == 2
    assert keys.key_id(keys.load_public(pub_a)) in ring
    assert keys.key_id(keys.load_public(pub_b)) in ring
    with pytest.raises(UsageError, match="not a directory"):
        Keyring.from_dir(tmp_path / "nowhere")


# --- manifest ---------------------------------------------------------------------------------


SLOT = {"name": "rootfs", "kind": "slot", "size": 10, "sha256": "0" * 64, "compression": "none"}


def good_manifest() -> dict[str, object]:
    return {
        "format": 1,
        "version": "2.0",
        "compatible": "acme-box",
        "created": "2024-05-01T12:00:00Z",
        "payloads": [
            SLOT,
            {"name": "kernel", "kind": "boot", "size": 5, "sha256": "1" * 64, "compression": "xz"},
        ],
    }


def test_manifest_round_trip_is_canonical() -> None:
    data = json.dumps(good_manifest()).encode()
    parsed = manifest.parse(data)
    assert parsed.slot.name == "rootfs"
    assert parsed.boot("kernel") is not None and parsed.boot("initrd") is None
    assert parsed.payloads[1].compression is Compression.XZ
    assert manifest.parse(parsed.serialize()) == parsed
    assert b" " not in parsed.serialize()


def _edit(path: str, value: object) -> bytes:
    doc: dict[str, object] = json.loads(json.dumps(good_manifest()))
    target: object = doc
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]  # type: ignore[index]
    assert isinstance(target, (dict, list))
    if value is KeyError:
        del target[last]  # type: ignore[arg-type]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("extra", 1, "unknown key 'extra'"),
        ("version", KeyError, "lacks key 'version'"),
        ("format", 4, "unsupported manifest format"),
        ("format", 3, "lacks its blake3 digest"),
        ("payloads.0.blake3", "ab" * 32, "has a blake3 digest, which format 1"),
        ("payloads.0.blake3", "AB" * 32, "not allowed"),
        ("payloads.0.blake3", 5, "must be a string"),
        ("format", 2, "an index and a chunks payload, right before"),
        ("format", True, "must be an integer"),
        ("version", 3, "must be a string"),
        ("version", "", "not allowed"),
        ("compatible", "a b", "not allowed"),
        ("created", "yesterday", "ISO-8601"),
        ("payloads", [], "1 to"),
        ("payloads.0.size", 0, "absurd size"),
        ("payloads.0.size", 1 << 60, "absurd size"),
        ("payloads.0.size", 1.5, "must be an integer"),
        ("payloads.0.sha256", "AB" * 32, "not allowed"),
        ("payloads.0.name", "../etc", "not allowed"),
        ("payloads.0.name", "/rootfs", "not allowed"),
        ("payloads.0.name", "manifest.json", "reserved name"),
        ("payloads.0.kind", "data", "unknown kind"),
        ("payloads.0.compression", "bzip2", "unknown compression"),
        ("payloads.1", dict(SLOT, size=3), "twice"),
        ("payloads.1.name", "bootloader", "must be named"),
        ("payloads.1", dict(SLOT, name="other"), "exactly one"),
        ("payloads.0.kind", "boot", "must be named"),
        ("payloads.0.extra", None, "unknown key 'extra'"),
    ],
)
def test_manifest_rejects(path: str, value: object, message: str) -> None:
    with pytest.raises(ImageRejected, match=message):
        manifest.parse(_edit(path, value))


@pytest.mark.parametrize(
    "data",
    [
        b'{"format": 1, "format": 1}',
        b"[1, 2]",
        b"{not json",
        b"\xff\xfe",
        b'{"format": NaN}',
    ],
)
def test_manifest_rejects_malformed_json(data: bytes) -> None:
    with pytest.raises(ImageRejected):
        manifest.parse(data)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("1.0", "1.0", 0),
        ("1.2", "1.2.0", 0),
        ("1.10", "1.9", 1),
        ("1.9", "1.10", -1),
        ("2", "10", -1),
        ("2.0-rc1", "2.0", -1),
        ("2.0-rc2", "2.0-rc10", -1),
        ("2.0+build7", "2.0", 0),
        ("1.2a", "1.2", 1),
        ("1.2b", "1.2a", 1),
        ("2024.05.01", "2024.4.30", 1),
    ],
)
def test_compare_versions(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


# --- build and read ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "xz", "zstd"])
def test_round_trip(
    tmp_path: Path, inputs: dict[str, Path], keypair: tuple[Path, Path], compression: str
) -> None:
    image = make_image(tmp_path, inputs, [keypair[0]], compression)
    ring = Keyring.from_files([keypair[1]])
    assert read_all(image, ring) == {"rootfs": ROOTFS, "kernel": KERNEL, "initrd": INITRD}
    with image.open("rb") as stream:
        verified = reader.verify(stream, ring)
    assert verified.size == image.stat().st_size
    assert [s.trusted for s in verified.signatures] == [True]
    slot = verified.manifest.slot
    assert (slot.size, slot.sha256) == (len(ROOTFS), hashlib.sha256(ROOTFS).hexdigest())
    assert slot.compression == compression
    assert verified.manifest.boot("kernel") is not None
    if compression != "none":
        assert image.stat().st_size < len(ROOTFS), "the zeros should compress"


def test_build_writes_no_partial_output(
    tmp_path: Path, inputs: dict[str, Path], keypair: tuple[Path, Path]
) -> None:
    out = tmp_path / "image.tar"
    with pytest.raises(UsageError, match="does not exist"):
        build(tmp_path / "missing", "1", "acme-box", [keypair[0]], out)
    with pytest.raises(UsageError, match="version"):
        build(inputs["rootfs"], "1 0", "acme-box", [keypair[0]], out)
    with pytest.raises(UsageError, match="signing key"):
        build(inputs["rootfs"], "1", "acme-box", [], out)
    with pytest.raises(UsageError, match="compression"):
        build(inputs["rootfs"], "1", "acme-box", [keypair[0]], out, compression="lz4")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["one.key", "one.pub", "rootfs.img", "vmlinuz", "initrd.img"]
    )


def test_image_lists_with_standard_tar(
    tmp_path: Path, inputs: dict[str, Path], keypair: tuple[Path, Path]
) -> None:
    import tarfile

    image = make_image(tmp_path, inputs, [keypair[0]], "zstd")
    with tarfile.open(image) as archive:
        assert archive.getnames() == ["manifest.json", "manifest.sig", "rootfs.index",
                                      "rootfs.chunks", "rootfs", "kernel", "initrd"]
    assert image.read_bytes().endswith(bytes(1024))


def test_two_signatures_each_key_alone_suffices(tmp_path: Path, inputs: dict[str, Path]) -> None:
    old = keys.generate(tmp_path / "old")
    new = keys.generate(tmp_path / "new")
    image = make_image(tmp_path, inputs, [old[0], new[0]])
    for pair in (old, new):
        ring = Keyring.from_files([pair[1]])
        with image.open("rb") as stream:
            verified = reader.verify(stream, ring)
        trust = {s.key_id: s.trusted for s in verified.signatures}
        assert trust == {
            keys.key_id(keys.load_public(old[1])): pair is old,
            keys.key_id(keys.load_public(new[1])): pair is new,
        }


def test_untrusted_key_is_rejected_before_any_payload(
    tmp_path: Path, inputs: dict[str, Path], keypair: tuple[Path, Path]
) -> None:
    image = make_image(tmp_path, inputs, [keypair[0]])
    stranger = keys.generate(tmp_path / "stranger")
    with image.open("rb") as stream, pytest.raises(ImageRejected, match="no trusted signature"):
        reader.ImageReader(stream, Keyring.from_files([stranger[1]]))
    with image.open("rb") as stream, pytest.raises(ImageRejected, match="no trusted signature"):
        reader.ImageReader(stream, Keyring())


def test_reader_reads_only_the_head_before_payloads(
    tmp_path: Path, inputs: dict[str, Path], keypair: tuple[Path, Path]
) -> None:
    image = make_image(tmp_path, inputs, [keypair[0]])
    with image.open("rb") as stream:
        image_reader = reader.ImageReader(stream, Keyring.from_files([keypair[1]]))
        head = image_reader.offset
        assert head < 4096 and stream.tell() == head
        payloads = image_reader.payloads()
        payload, chunks = next(payloads)
        assert payload.name == "rootfs"
        first = bytes(next(chunks))
        assert ROOTFS.startswith(first)
        # Leaving a payload unfinished: the reader still reads and checks it before the next.
        payload, chunks = next(payloads)
        assert payload.name == "kernel" and b"".join(bytes(c) for c in chunks) == KERNEL


def test_verify_reports_progress(tmp_path: Path, inputs: dict[str, Path], keypair: tuple[Path, Path]) -> None:
    image = make_image(tmp_path, inputs, [keypair[0]], "gzip")
    progress = RecordingProgress()
    with image.open("rb") as stream:
        reader.verify(stream, Keyring.from_files([keypair[1]]), progress)
    total = len(ROOTFS) + len(KERNEL) + len(INITRD)
    assert progress.events[0] == ("verify", total)
    assert sum(n for label, n in progress.events if label == "advance") == total
    assert progress.events[-1] == ("finish", 0)


def test_apply_checks_blake3_and_verify_every_digest() -> None:
    """A format 3 image is read for a slot with one hash, its BLAKE3 (what keeps apply at the
    disk's speed); `image verify` checks every digest the manifest gives. Signed with a
    SHA-256 that does not match, the image streams but does not verify."""
    from dataclasses import replace

    from abupgrade.image.tar import END_MARKER
    from fixtures.hostile_images import BLAKE3_PAYLOADS, BOOT_MEMBERS, RING, ROOT, head, member

    wrong = (replace(BLAKE3_PAYLOADS[0], sha256="0" * 64), *BLAKE3_PAYLOADS[1:])
    image = head(wrong) + member("rootfs", ROOT) + BOOT_MEMBERS + END_MARKER
    streamed = reader.ImageReader(io.BytesIO(image), RING)
    assert streamed.manifest.format == 3
    got = {p.name: b"".join(bytes(c) for c in chunks) for p, chunks in streamed.payloads()}
    assert got["rootfs"] == ROOT
    with pytest.raises(ImageRejected, match="'rootfs' does not match its sha256"):
        reader.verify(io.BytesIO(image), RING)
    good = head(BLAKE3_PAYLOADS) + member("rootfs", ROOT) + BOOT_MEMBERS + END_MARKER
    assert reader.verify(io.BytesIO(good), RING).manifest.format == 3


def test_inspect_without_and_with_keyring(
    tmp_path: Path, inputs: dict[str, Path], keypair: tuple[Path, Path]
) -> None:
    image = make_image(tmp_path, inputs, [keypair[0]], "xz")
    kid = keys.key_id(keys.load_public(keypair[1]))
    with image.open("rb") as stream:
        info = reader.inspect(stream, None).to_json()
        assert stream.tell() < 4096, "inspect reads only manifest and signatures"
    assert info["version"] == "1.2.3" and info["compatible"] == "acme-box"
    assert info["signatures"] == [{"key_id": kid, "trusted": None, "revoked": None}]
    assert [p["name"] for p in info["payloads"]] == ["rootfs", "kernel", "initrd"]
    assert set(info["payloads"][0]) >= {"name", "size", "sha256", "compression"}
    json.dumps(info)
    stranger = keys.generate(tmp_path / "stranger")
    with image.open("rb") as stream:
        info = reader.inspect(stream, Keyring.from_files([stranger[1]])).to_json()
    assert info["signatures"] == [{"key_id": kid, "trusted": False, "revoked": False}]


# --- sources ----------------------------------------------------------------------------------


def test_source_path_and_errors(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"abc")
    with open_source(str(tmp_path / "img")) as stream:
        assert stream.read() == b"abc"
    with pytest.raises(UsageError, match="does not exist"), open_source(str(tmp_path / "nope")):
        pass
    with pytest.raises(UsageError, match="is a directory"), open_source(str(tmp_path)):
        pass
    with pytest.raises(UsageError, match="unsupported"), open_source("ftp://host/img.tar"):
        pass


def test_source_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    with open_source("-") as stream:
        assert stream.read() == b"from stdin"


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_source_http_streams_an_image(
    tmp_path: Path,
    inputs: dict[str, Path],
    keypair: tuple[Path, Path],
    http_root: tuple[str, Path],
) -> None:
    url, root = http_root
    image = make_image(tmp_path, inputs, [keypair[0]], "zstd")
    (root / "image.tar").write_bytes(image.read_bytes())
    with open_source(f"{url}/image.tar") as stream:
        verified = reader.verify(stream, Keyring.from_files([keypair[1]]))
    assert verified.manifest.version == "1.2.3"
    with pytest.raises(OperationalError, match="HTTP 404"), open_source(f"{url}/missing.tar"):
        pass


def test_source_http_unreachable() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        pytest.raises(OperationalError, match="cannot reach"),
        open_source(f"http://127.0.0.1:{port}/image.tar", timeout=5),
    ):
        pass


class _FailingStream(io.RawIOBase):
    """Hands out the first `good` bytes of a good image, then raises `error`."""

    def __init__(self, good: int, error: BaseException) -> None:
        from fixtures.hostile_images import GOOD

        self.data, self.at, self.left, self.error = GOOD, 0, good, error

    def readable(self) -> bool:
        return True

    def readinto(self, view: memoryview) -> int:  # type: ignore[override]
        if not self.left:
            raise self.error
        n = min(self.left, len(view))
        view[:n] = self.data[self.at:self.at + n]
        self.at += n
        self.left -= n
        return n


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"),
                                   http.client.IncompleteRead(b"")])
def test_a_failed_read_is_one_operational_error_with_its_offset(error: Exception) -> None:
    with pytest.raises(OperationalError, match="reading the image failed at byte 700"):
        reader.inspect(cast(BinaryIO, _FailingStream(700, error)), None)


def test_other_errors_of_a_stream_are_not_called_read_failures() -> None:
    with pytest.raises(ValueError, match="not a read failure"):
        reader.inspect(cast(BinaryIO, _FailingStream(700, ValueError("not a read failure"))), None)
