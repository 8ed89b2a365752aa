"""`abupgrade image push IMAGE oci://HOST/REPO:TAG`: blobs the registry lacks, then the manifest."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from abupgrade.config import RegistryConfig
from abupgrade.errors import OperationalError
from abupgrade.image.keys import Keyring
from abupgrade.image.reader import verify
from abupgrade.oci.client import Body, Registry
from abupgrade.oci.layout import (
    CONFIG_TYPE,
    MANIFEST_TYPE,
    PAYLOAD_KEY,
    Descriptor,
    Segment,
    config_blob,
    oci_manifest,
    sha256_of,
    split,
)
from abupgrade.oci.reference import Reference, parse_reference
from abupgrade.progress import NullProgress, Progress


@dataclass(frozen=True)
class PushResult:
    reference: str  # oci://host/repo@sha256:... : pins exactly what was pushed
    digest: str  # of the OCI manifest
    version: str
    uploaded_blobs: int
    uploaded_bytes: int
    reused_blobs: int  # already in the registry: not sent again
    reused_bytes: int

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


class _Slice(io.RawIOBase):
    """A byte range of an open file, read as a stream (an upload body)."""

    def __init__(self, f: BinaryIO, offset: int, size: int, progress: Progress) -> None:
        super().__init__()
        self._f, self._left, self._progress = f, size, progress
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._left if size < 0 else min(size, self._left)
        data = self._f.read(n) if n else b""
        if len(data) != n:
            raise OperationalError("the image file changed while it was uploaded")
        self._left -= n
        self._progress.advance(n)
        return data


def push(image: Path, target: str, *, settings: RegistryConfig | None = None,
         keyring: Keyring | None = None, progress: Progress | None = None) -> PushResult:
    """Publish `image` as `target` (oci://HOST/REPO:TAG). With a keyring, verify it first."""
    ref = parse_reference(target, need_tag=True)
    sink: Progress = progress or NullProgress()
    if keyring is not None:
        with image.open("rb") as f:
            verify(f, keyring)
    manifest, segments = split(image)
    registry = Registry(ref.host, settings)
    scope = f"repository:{ref.repository}:pull,push"
    uploaded = [0, 0]
    reused = [0, 0]

    def put(descriptor: Descriptor, body: bytes | None, segment: Segment | None, f: BinaryIO | None) -> None:
        if _exists(registry, ref, descriptor.digest, scope):
            reused[0] += 1
            reused[1] += descriptor.size
            return
        if segment is not None and f is not None:
            sink.start(segment.payload or "framing", segment.size)
            try:
                _upload(registry, ref, descriptor, scope,
                        lambda: cast(BinaryIO, _Slice(f, segment.offset, segment.size, sink)))
            finally:
                sink.finish()
        else:
            _upload(registry, ref, descriptor, scope, body or b"")
        uploaded[0] += 1
        uploaded[1] += descriptor.size

    layers: list[Descriptor] = []
    with image.open("rb") as f:
        for segment in segments:
            annotations = ((PAYLOAD_KEY, segment.payload),) if segment.payload else ()
            descriptor = Descriptor(segment.media_type, sha256_of(f, segment.offset, segment.size),
                                    segment.size, annotations)
            put(descriptor, None, segment, f)
            layers.append(descriptor)
    config_bytes = config_blob(manifest)
    config = Descriptor(CONFIG_TYPE, "sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes))
    put(config, config_bytes, None, None)

    document = oci_manifest(manifest, config, layers)
    digest = "sha256:" + hashlib.sha256(document).hexdigest()
    response = registry.request("PUT", f"/v2/{ref.repository}/manifests/{ref.tag}", scope=scope,
                                headers={"Content-Type": MANIFEST_TYPE}, body=document, ok=(201,),
                                what=f"storing the manifest of {ref}")
    stored = response.header("Docker-Content-Digest")
    if stored and stored != digest:
        raise OperationalError(f"registry {ref.host} stored the manifest as {stored}, not {digest}")
    pinned = Reference(ref.host, ref.repository, None, digest)
    return PushResult(str(pinned), digest, manifest.version, uploaded[0], uploaded[1], reused[0],
                      reused[1])


def _exists(registry: Registry, ref: Reference, digest: str, scope: str) -> bool:
    response = registry.request("HEAD", f"/v2/{ref.repository}/blobs/{digest}", scope=scope,
                                ok=(200, 404), what=f"looking for blob {digest}")
    return response.status == 200


def _upload(registry: Registry, ref: Reference, descriptor: Descriptor, scope: str,
            body: Body) -> None:
    """A monolithic upload: POST for a session, then one PUT with the bytes and the digest."""
    started = registry.request("POST", f"/v2/{ref.repository}/blobs/uploads/", scope=scope,
                               headers={"Content-Length": "0"}, body=b"", ok=(202,),
                               what=f"starting the upload of {descriptor.digest}")
    location = started.header("Location")
    if not location:
        raise OperationalError(f"registry {ref.host} opened an upload without a Location")
    separator = "&" if "?" in location else "?"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(descriptor.size)}
    registry.request("PUT", f"{location}{separator}digest={descriptor.digest}", scope=scope,
                     headers=headers, body=body, ok=(201,),
                     what=f"uploading blob {descriptor.digest}")
