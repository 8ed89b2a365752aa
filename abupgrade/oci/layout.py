"""How an image tar maps onto OCI blobs, and the OCI manifest that lists them.

The tar is cut at the edges of each payload's stored bytes:

    framing  manifest.json, manifest.sig (members with padding) + the first payload's header
    payload  the first payload's stored bytes
    framing  its zero padding + the next payload's header
    ...
    framing  the last payload's padding + the end-of-archive marker (+ any trailing zeros)

Concatenating the layers in order gives back the tar byte for byte, so the ordinary reader
verifies it; a payload whose stored bytes did not change is the same blob as before.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from abupgrade.errors import ImageRejected, UsageError
from abupgrade.image.manifest import MAX_MANIFEST_BYTES, MAX_PAYLOADS, Manifest, canonical_json
from abupgrade.image.reader import inspect
from abupgrade.image.signature import MAX_SIGNATURES_BYTES
from abupgrade.image.tar import BLOCK, decode_header, padding

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.abupgrade.image.v1"
CONFIG_TYPE = "application/vnd.abupgrade.config.v1+json"
FRAMING_TYPE = "application/vnd.abupgrade.image.framing.v1"
PAYLOAD_TYPE = "application/vnd.abupgrade.image.payload.v1"
VERSION_KEY = "org.opencontainers.image.version"
CREATED_KEY = "org.opencontainers.image.created"
COMPATIBLE_KEY = "vnd.abupgrade.compatible"
PAYLOAD_KEY = "vnd.abupgrade.payload"

MAX_LAYERS = 2 * MAX_PAYLOADS + 1
MAX_FRAMING = MAX_MANIFEST_BYTES + MAX_SIGNATURES_BYTES + (1 << 20) + 8 * BLOCK
MAX_MANIFEST = 1 << 20  # the OCI manifest, as registries cap it too
MAX_CONFIG = 1 << 20
CHUNK = 1 << 20

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class Segment:
    """A byte range of the image file that becomes one blob."""

    media_type: str
    offset: int
    size: int
    payload: str | None = None  # the payload's name for payload segments


def split(image: Path) -> tuple[Manifest, list[Segment]]:
    """The image's manifest (read, not trusted) and its segments in order."""
    try:
        with image.open("rb") as f:
            manifest = inspect(f, None).manifest
            f.seek(0)
            segments = _segments(f, manifest)
            end = f.seek(0, 2)
    except FileNotFoundError:
        raise UsageError(f"image {image} does not exist") from None
    last = segments[-1]
    segments.append(Segment(FRAMING_TYPE, last.offset + last.size, end - last.offset - last.size))
    if segments[-1].size < 2 * BLOCK:
        raise ImageRejected(f"image {image} ends without the end-of-archive marker")
    return manifest, _merge_framing(segments)


def _segments(f: BinaryIO, manifest: Manifest) -> list[Segment]:
    position = 0
    for _ in range(2):  # manifest.json and manifest.sig, checked by inspect already
        header = decode_header(f.read(BLOCK), position)
        assert header is not None
        position += BLOCK + header.size + padding(header.size)
        f.seek(position)
    segments: list[Segment] = []
    framing_start = 0
    for payload in manifest.payloads:
        header = decode_header(f.read(BLOCK), position)
        if header is None or header.name != payload.name:
            raise ImageRejected(f"payload {payload.name!r} is not where the manifest puts it "
                                f"(byte {position})")
        data = position + BLOCK
        segments.append(Segment(FRAMING_TYPE, framing_start, data - framing_start))
        segments.append(Segment(PAYLOAD_TYPE, data, header.size, payload.name))
        framing_start = data + header.size
        position = framing_start + padding(header.size)
        f.seek(position)
    return segments


def _merge_framing(segments: list[Segment]) -> list[Segment]:
    """Empty payloads leave framing next to framing: one blob is enough for both."""
    merged: list[Segment] = []
    for segment in segments:
        if segment.size == 0 and segment.payload is not None:
            continue
        if merged and merged[-1].payload is None and segment.payload is None:
            merged[-1] = Segment(FRAMING_TYPE, merged[-1].offset, merged[-1].size + segment.size)
        else:
            merged.append(segment)
    return merged


def config_blob(manifest: Manifest) -> bytes:
    """A small, unsigned summary for registries and `check`; the signed manifest is in the head."""
    return canonical_json({"version": manifest.version, "compatible": manifest.compatible,
                           "created": manifest.created,
                           "payloads": [p.to_json() for p in manifest.payloads]})


def oci_manifest(manifest: Manifest, config: Descriptor, layers: list[Descriptor]) -> bytes:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
        "annotations": {VERSION_KEY: manifest.version, COMPATIBLE_KEY: manifest.compatible,
                        CREATED_KEY: manifest.created},
    }, indent=2, sort_keys=False).encode()


@dataclass(frozen=True)
class Artifact:
    """An abupgrade image as a registry lists it."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def parse_oci_manifest(data: bytes, where: str) -> Artifact:
    """Parse and check an OCI manifest that should list an abupgrade image."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ImageRejected(f"{where}: the registry's manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise ImageRejected(f"{where}: not an OCI image manifest")
    if doc.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE:
        raise ImageRejected(f"{where} is a {doc.get('mediaType')}, not an abupgrade image",
                            hint="multi-platform indexes and container images cannot be applied")
    config = _descriptor(doc.get("config"), where)
    if doc.get("artifactType", config.media_type) != ARTIFACT_TYPE and config.media_type != CONFIG_TYPE:
        raise ImageRejected(f"{where} is not an abupgrade image "
                            f"(artifact type {doc.get('artifactType') or config.media_type})",
                            hint="publish images with `abupgrade image push`")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or not 1 <= len(raw_layers) <= MAX_LAYERS:
        raise ImageRejected(f"{where}: an abupgrade image has 1 to {MAX_LAYERS} layers")
    layers = tuple(_descriptor(layer, where) for layer in raw_layers)
    for index, layer in enumerate(layers):
        if layer.media_type not in (FRAMING_TYPE, PAYLOAD_TYPE):
            raise ImageRejected(f"{where}: layer {index} has the unknown type {layer.media_type}")
        if layer.media_type == FRAMING_TYPE and layer.size > MAX_FRAMING:
            raise ImageRejected(f"{where}: framing layer {index} is {layer.size} bytes, too large")
    if layers[0].media_type != FRAMING_TYPE:
        raise ImageRejected(f"{where}: the first layer must hold the signed head")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ImageRejected(f"{where}: annotations must be an object")
    return Artifact(config, layers, {str(k): str(v) for k, v in annotations.items()})


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ImageRejected(f"{where}: a descriptor is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ImageRejected(f"{where}: a descriptor lacks a media type or a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageRejected(f"{where}: descriptor {digest} has no valid size")
    return Descriptor(media_type, digest, size)


def sha256_of(f: BinaryIO, offset: int, size: int) -> str:
    """The digest of a byte range of a file."""
    digest = hashlib.sha256()
    f.seek(offset)
    left = size
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise ImageRejected(f"image ends inside the range at byte {offset} (size {size})")
        digest.update(chunk)
        left -= len(chunk)
    return f"sha256:{digest.hexdigest()}"
