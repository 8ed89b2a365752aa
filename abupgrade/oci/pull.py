"""Stream an image out of a registry, and tell what a tag holds without downloading it.

The layers are read one after another as one stream. Each blob's bytes are hashed as they pass
and the last byte of a blob is handed out only after its digest matched (ImageRejected if not).
Small blobs (the signed head, framing) are fetched whole and checked before any of their bytes
is handed out. A connection that breaks inside a blob is resumed with an HTTP Range request;
a registry that cannot resume fails the read with OperationalError.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

from abupgrade.config import RegistryConfig
from abupgrade.errors import ImageRejected, NothingNewer, OperationalError, PolicyRefusal, UsageError
from abupgrade.image.manifest import compare_versions, strict_json
from abupgrade.oci.client import Registry, Response
from abupgrade.oci.layout import (
    COMPATIBLE_KEY,
    MANIFEST_TYPE,
    MAX_CONFIG,
    MAX_FRAMING,
    MAX_MANIFEST,
    VERSION_KEY,
    Artifact,
    Descriptor,
    parse_oci_manifest,
)
from abupgrade.oci.reference import Reference, parse_reference

RESUMES = 5  # broken connections resumed per blob before the read fails
BACKOFF = 0.5  # seconds, times the attempt number


@dataclass(frozen=True)
class Tagged:
    """What a reference points at, from the OCI manifest (and the config blob if needed)."""

    reference: str
    digest: str  # of the OCI manifest: `apply oci://host/repo@<digest>` gets exactly this
    version: str
    compatible: str | None
    size: int  # bytes a pull transfers


def _fetch_manifest(registry: Registry, ref: Reference) -> tuple[Artifact, str]:
    response = registry.request("GET", f"/v2/{ref.repository}/manifests/{ref.target}",
                                scope=f"repository:{ref.repository}:pull",
                                headers={"Accept": MANIFEST_TYPE}, ok=(200, 404),
                                what=f"reading the manifest of {ref}")
    if response.status == 404:
        raise UsageError(f"registry {ref.host} has no {ref.target} in {ref.repository}",
                         hint="check the reference")
    data = response.body
    if len(data) > MAX_MANIFEST:
        raise ImageRejected(f"{ref}: the manifest is {len(data)} bytes, too large")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        raise ImageRejected(f"{ref}: the registry sent a manifest with digest {digest}")
    return parse_oci_manifest(data, str(ref)), digest


def describe(reference: str, *, settings: RegistryConfig | None = None) -> Tagged:
    """Version, compatible and digest of what `reference` holds; no payload is downloaded."""
    ref = parse_reference(reference)
    registry = Registry(ref.host, settings)
    artifact, digest = _fetch_manifest(registry, ref)
    version = artifact.annotations.get(VERSION_KEY)
    compatible = artifact.annotations.get(COMPATIBLE_KEY)
    if version is None:
        config = _read_small(registry, ref, artifact.config, MAX_CONFIG)
        summary = strict_json(config, f"{ref}: config")
        if not isinstance(summary, dict) or not isinstance(summary.get("version"), str):
            raise ImageRejected(f"{ref}: neither annotations nor config name a version")
        version = summary["version"]
        compatible = summary.get("compatible") if isinstance(summary.get("compatible"), str) else None
    assert version is not None
    return Tagged(str(ref), digest, version, compatible, artifact.size)


def check(reference: str, committed_version: str | None, *, compatible: str | None = None,
          settings: RegistryConfig | None = None) -> str:
    """The version `reference` holds when it is newer than `committed_version`.

    Raises NothingNewer (exit 6) when it is not, PolicyRefusal when `compatible` is given and
    the tag holds an image for another machine. Nothing is verified here (the registry's
    annotations say it): `abupgrade check` then reads the signed head (ops.check).
    """
    tagged = describe(reference, settings=settings)
    if compatible is not None and tagged.compatible not in (None, compatible):
        raise PolicyRefusal(f"{reference} holds an image for {tagged.compatible!r}, "
                            f"this machine is {compatible!r}")
    check_newer(reference, tagged.version, committed_version)
    return tagged.version


def check_newer(reference: str, version: str, committed_version: str | None) -> None:
    """NothingNewer (exit 6) unless `version`, which `reference` holds, is newer."""
    if committed_version is not None and compare_versions(version, committed_version) <= 0:
        raise NothingNewer(f"{reference} holds {version}; the committed version is "
                           f"{committed_version}: nothing newer")


@contextlib.contextmanager
def open_image(reference: str, *, settings: RegistryConfig | None = None) -> Iterator[BinaryIO]:
    """The image tar `reference` holds, as one stream of its layers (see the module's doc)."""
    ref = parse_reference(reference)
    registry = Registry(ref.host, settings)
    artifact, _digest = _fetch_manifest(registry, ref)
    stream = _LayerStream(registry, ref, artifact.layers)
    try:
        yield cast(BinaryIO, io.BufferedReader(stream, buffer_size=1 << 20))
    finally:
        stream.close()


def _read_small(registry: Registry, ref: Reference, descriptor: Descriptor, limit: int) -> bytes:
    if descriptor.size > limit:
        raise ImageRejected(f"{ref}: blob {descriptor.digest} is {descriptor.size} bytes, over {limit}")
    blob = _Blob(registry, ref, descriptor)
    data = bytearray(descriptor.size)
    view = memoryview(data)
    got = 0
    while got < len(data):
        n = blob.readinto(view[got:])
        if not n:
            break
        got += n
    blob.readinto(memoryview(bytearray(1)))  # checks the digest of an empty blob too
    return bytes(data)


class _Blob:
    """One blob, read exactly once through, resumed with Range, checked against its digest."""

    def __init__(self, registry: Registry, ref: Reference, descriptor: Descriptor) -> None:
        self.registry, self.ref, self.descriptor = registry, ref, descriptor
        self.offset = 0
        self.resumes = 0
        self._hash = hashlib.sha256()
        self._response: Response | None = None
        self._checked = False
        self._small: memoryview | None = None

    @property
    def _name(self) -> str:
        return f"blob {self.descriptor.digest[:19]} of {self.ref}"

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def readinto(self, view: memoryview) -> int:
        size = self.descriptor.size
        if self.offset == size:
            self._check()
            return 0
        if size <= MAX_FRAMING:
            if self._small is None:
                self._small = memoryview(self._fetch_whole())
            n = min(len(view), size - self.offset)
            view[:n] = self._small[self.offset:self.offset + n]
            self.offset += n
            return n
        want = view[:min(len(view), size - self.offset)]
        n = self._read_some(want)
        self._hash.update(want[:n])
        self.offset += n
        if self.offset == size:
            self._check()
        return n

    def _fetch_whole(self) -> bytearray:
        data = bytearray(self.descriptor.size)
        view = memoryview(data)
        got = 0
        while got < len(data):
            n = self._read_some(view[got:], start=got)
            got += n
        self._hash.update(data)
        self.close()
        self._check()
        return data

    def _check(self) -> None:
        if self._checked:
            return
        self.close()
        digest = "sha256:" + self._hash.hexdigest()
        if digest != self.descriptor.digest:
            raise ImageRejected(f"{self._name} does not match its digest: the registry served "
                                f"other bytes ({digest[:19]})")
        self._checked = True

    def _read_some(self, view: memoryview, start: int | None = None) -> int:
        """Read at least one byte at `start` (default: the offset), resuming a broken connection."""
        at = self.offset if start is None else start
        while True:
            failure: BaseException | None = None
            try:
                if self._response is None:
                    self._response = self._open(at)
                assert self._response.raw is not None
                n = self._response.raw.readinto(view)
                if n:
                    return n
            except (OSError, http.client.HTTPException) as exc:
                failure = exc
            self.close()
            self.resumes += 1
            if self.resumes > RESUMES:
                cause = failure or ConnectionResetError("the connection closed early")
                raise OperationalError(
                    f"{self._name}: the connection broke at byte {at} of {self.descriptor.size} "
                    f"{RESUMES} times", hint=f"{self.registry.unreachable(cause).message}; retry later")
            time.sleep(BACKOFF * self.resumes)

    def _open(self, at: int) -> Response:
        headers = {"Range": f"bytes={at}-"} if at else {}
        response = self.registry.request(
            "GET", f"/v2/{self.ref.repository}/blobs/{self.descriptor.digest}",
            scope=f"repository:{self.ref.repository}:pull", headers=headers, ok=(200, 206, 404),
            stream=True, what=f"reading {self._name}")
        size = self.descriptor.size
        if response.status == 404:
            response.close()
            raise OperationalError(f"registry {self.ref.host} lacks {self._name}",
                                   hint="the image was deleted from the registry; push it again")
        if at and response.status != 206:
            response.close()
            raise OperationalError(
                f"{self._name}: the connection broke at byte {at} and the registry cannot resume",
                hint="the registry ignores HTTP Range requests; retry the whole download")
        length = response.header("Content-Length")
        if response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.header("Content-Range") or "")
            if match is None or int(match[1]) != at or match[3] not in ("*", str(size)):
                response.close()
                raise OperationalError(f"{self._name}: the registry resumed at the wrong place "
                                       f"({response.header('Content-Range')})")
        elif length is not None and int(length) != size:
            response.close()
            raise ImageRejected(f"{self._name} is {length} bytes at the registry; the manifest says {size}")
        return response


class _LayerStream(io.RawIOBase):
    """The layers, one after another, as one raw stream."""

    def __init__(self, registry: Registry, ref: Reference, layers: tuple[Descriptor, ...]) -> None:
        super().__init__()
        self._blobs = iter([_Blob(registry, ref, d) for d in layers])
        self._current: _Blob | None = next(self._blobs, None)
        self.resumes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while self._current is not None:
            n = self._current.readinto(view)
            if n:
                return n
            self.resumes += self._current.resumes
            self._current = next(self._blobs, None)
        return 0

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        super().close()
