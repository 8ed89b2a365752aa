"""The signed manifest: what an image holds, parsed strictly, serialized canonically."""

from __future__ import annotations

import datetime
import enum
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from abupgrade.errors import ImageRejected
from abupgrade.image.tar import NAME_RE

FORMAT = 1  # images without a chunk index, SHA-256 digests: every abupgrade reads them
FORMAT_INDEXED = 2  # a chunk index before the slot payload, for delta updates
FORMAT_BLAKE3 = 3  # every payload has a BLAKE3 digest too, which readers check; index optional
FORMATS = (FORMAT, FORMAT_INDEXED, FORMAT_BLAKE3)
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20
MAX_PAYLOAD_SIZE = 1 << 44  # 16 TiB: more than any slot, less than absurd
MAX_PAYLOADS = 8
BOOT_NAMES = ("kernel", "initrd")

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")
_COMPATIBLE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_BLAKE3_RE = _SHA256_RE  # 32 bytes, lower-case hex


if TYPE_CHECKING:  # a class made at import time costs the boot hook's start-up
    from typing import Protocol

    class Hasher(Protocol):
        def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
        def hexdigest(self) -> str: ...


class PayloadKind(enum.StrEnum):
    SLOT = "slot"  # the root filesystem image, written to the whole slot
    BOOT = "boot"  # a kernel or initrd the bootloader loads for this slot
    INDEX = "index"  # the group index of the slot payload (delta updates), then:
    CHUNKS = "chunks"  # its chunk tables; both come right before the slot payload


class Compression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"  # with a chunk index (format 2): one frame per chunk, each decodes alone

    @classmethod
    def parse(cls, text: str) -> Compression:
        from abupgrade.errors import UsageError

        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(c.value for c in cls)
            raise UsageError(f"unknown compression {text!r}", hint=f"use one of {choices}") from None


@dataclass(frozen=True)
class Payload:
    """One payload of an image, as the manifest lists it."""

    name: str
    kind: PayloadKind
    size: int  # of the uncompressed bytes
    sha256: str  # of the uncompressed bytes, lower-case hex
    compression: Compression
    blake3: str | None = None  # of the uncompressed bytes (format 3); what readers check

    @property
    def digest_name(self) -> str:
        """The digest readers check: BLAKE3 where the manifest gives one (about three times
        SHA-256's speed, so hashing keeps up with the disk), else SHA-256. Both are signed."""
        return "sha256" if self.blake3 is None else "blake3"

    @property
    def digest(self) -> str:
        return self.sha256 if self.blake3 is None else self.blake3

    def hasher(self) -> Hasher:
        """A fresh hash of the kind `digest` is."""
        if self.blake3 is not None:
            return blake3_hasher()
        import hashlib  # here: the boot hook imports this module, and never hashes

        return hashlib.sha256()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind.value,
            "size": self.size,
            "sha256": self.sha256,
            "compression": self.compression.value,
        }
        if self.blake3 is not None:
            doc["blake3"] = self.blake3
        return doc


def blake3_hasher() -> Hasher:
    """BLAKE3, hashing each large update on every core (it is a tree hash)."""
    from blake3 import blake3  # a compiled module: imported by what reads images only

    return blake3(max_threads=blake3.AUTO)


@dataclass(frozen=True)
class Manifest:
    """An image's signed manifest."""

    format: int
    version: str
    compatible: str
    created: str  # ISO-8601, UTC
    payloads: tuple[Payload, ...]
    # Once this image is committed, no image older than this version is accepted any more.
    security_floor: str | None = None

    @property
    def slot(self) -> Payload:
        return next(p for p in self.payloads if p.kind is PayloadKind.SLOT)

    def boot(self, name: str) -> Payload | None:
        return next((p for p in self.payloads if p.kind is PayloadKind.BOOT and p.name == name), None)

    @property
    def index(self) -> Payload | None:
        """The group index of the slot payload, in images made for delta updates."""
        return next((p for p in self.payloads if p.kind is PayloadKind.INDEX), None)

    @property
    def chunk_tables(self) -> Payload | None:
        return next((p for p in self.payloads if p.kind is PayloadKind.CHUNKS), None)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "compatible": self.compatible,
            "created": self.created,
            "payloads": [p.to_json() for p in self.payloads],
        }
        if self.security_floor is not None:
            doc["security_floor"] = self.security_floor
        return doc

    def serialize(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, ASCII. These bytes are what is signed."""
        return canonical_json(self.to_json())

    @classmethod
    def create(cls, version: str, compatible: str, payloads: tuple[Payload, ...], *,
               security_floor: str | None = None) -> Manifest:
        """A new manifest, checked by the same rules the reader applies."""
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        created = now.isoformat().replace("+00:00", "Z")
        manifest = cls(format_for(payloads), version, compatible, created, payloads,
                       security_floor)
        return parse(manifest.serialize())


def format_for(payloads: tuple[Payload, ...]) -> int:
    """The oldest format that holds these payloads: 3 where each has a BLAKE3 digest, else 2
    with a chunk index, else 1."""
    if all(p.blake3 is not None for p in payloads):
        return FORMAT_BLAKE3
    return FORMAT_INDEXED if any(p.kind is PayloadKind.INDEX for p in payloads) else FORMAT


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def strict_json(data: bytes, what: str) -> Any:
    """json.loads that refuses duplicate keys, NaN/Infinity and non-UTF-8 input."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result:
                raise ImageRejected(f"{what}: duplicate key {key!r}")
            result[key] = value
        return result

    def constant(name: str) -> Any:
        raise ImageRejected(f"{what}: {name} is not allowed")

    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ImageRejected(f"{what} is not valid JSON: {e}") from None


def parse(data: bytes) -> Manifest:
    """The manifest in `data`, or ImageRejected naming the first problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ImageRejected(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    doc = _object(
        strict_json(data, "manifest"),
        "manifest",
        {"format", "version", "compatible", "created", "payloads"},
        optional=("security_floor",),
    )
    fmt = _int(doc["format"], "manifest format")
    if fmt not in FORMATS:
        raise ImageRejected(
            f"unsupported manifest format {doc['format']}",
            hint=f"this abupgrade reads formats {', '.join(map(str, FORMATS))}; upgrade "
                 "abupgrade first",
        )
    version = _text(doc["version"], "version", _VERSION_RE)
    compatible = _text(doc["compatible"], "compatible", _COMPATIBLE_RE)
    created = _str(doc["created"], "created")
    try:
        datetime.datetime.fromisoformat(created)
    except ValueError:
        raise ImageRejected(f"manifest created {created!r} is not an ISO-8601 time") from None
    items = doc["payloads"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_PAYLOADS:
        raise ImageRejected(f"manifest payloads must be a list of 1 to {MAX_PAYLOADS} entries")
    payloads = tuple(_payload(item, i) for i, item in enumerate(items))
    for payload in payloads:
        if fmt == FORMAT_BLAKE3 and payload.blake3 is None:
            raise ImageRejected(f"payload {payload.name!r} lacks its blake3 digest (format 3 "
                                "gives one for every payload)")
        if fmt != FORMAT_BLAKE3 and payload.blake3 is not None:
            raise ImageRejected(f"payload {payload.name!r} has a blake3 digest, which format "
                                f"{fmt} does not have")
    names = [p.name for p in payloads]
    for name in names:
        if names.count(name) > 1:
            raise ImageRejected(f"manifest names payload {name!r} twice")
    slots = [p for p in payloads if p.kind is PayloadKind.SLOT]
    if len(slots) != 1:
        raise ImageRejected(f"manifest has {len(slots)} slot payloads; exactly one is required")
    floor = doc.get("security_floor")
    if floor is not None:
        floor = _text(floor, "security_floor", _VERSION_RE)
        if compare_versions(floor, version) > 0:
            raise ImageRejected(f"manifest security_floor {floor} is above the image's own "
                                f"version {version}")
    _check_index(fmt, payloads)
    return Manifest(fmt, version, compatible, created, payloads, floor)


def _check_index(fmt: int, payloads: tuple[Payload, ...]) -> None:
    """Format 2 has an index and chunk tables, right before the slot payload they describe;
    format 1 neither; format 3 either both or neither."""
    kinds = [p.kind for p in payloads]
    slot = kinds.index(PayloadKind.SLOT)
    indexes = (PayloadKind.INDEX, PayloadKind.CHUNKS)
    if fmt == FORMAT_BLAKE3 and not any(kind in kinds for kind in indexes):
        return
    if fmt == FORMAT:
        if any(kind in kinds for kind in indexes):
            raise ImageRejected("a format 1 manifest has no chunk index")
        return
    if (kinds.count(PayloadKind.INDEX) != 1 or kinds.count(PayloadKind.CHUNKS) != 1
            or tuple(kinds[slot - 2:slot]) != indexes):
        raise ImageRejected(f"a format {fmt} manifest has an index and a chunks payload, right "
                            "before the slot payload")
    for index in payloads[slot - 2:slot]:
        if index.compression is not Compression.NONE:
            raise ImageRejected(f"payload {index.name!r} must be stored as it is")
    if payloads[slot].compression not in (Compression.NONE, Compression.ZSTD):
        raise ImageRejected(f"slot payload {payloads[slot].name!r}: an indexed payload is stored "
                            "uncompressed or as zstd chunks")


def _payload(item: Any, index: int) -> Payload:
    what = f"manifest payload {index}"
    doc = _object(item, what, {"name", "kind", "size", "sha256", "compression"},
                  optional=("blake3",))
    name = _text(doc["name"], f"{what} name", NAME_RE)
    if name in (MANIFEST_NAME, SIGNATURES_NAME):
        raise ImageRejected(f"{what} uses the reserved name {name!r}")
    try:
        kind = PayloadKind(_str(doc["kind"], f"{what} kind"))
    except ValueError:
        raise ImageRejected(f"{what} has unknown kind {doc['kind']!r}") from None
    if kind is PayloadKind.BOOT and name not in BOOT_NAMES:
        raise ImageRejected(f"boot payload {name!r} must be named one of {', '.join(BOOT_NAMES)}")
    if kind is not PayloadKind.BOOT and name in BOOT_NAMES:
        raise ImageRejected(f"{kind} payload may not be named {name!r}")
    size = _int(doc["size"], f"{what} size")
    if not 1 <= size <= MAX_PAYLOAD_SIZE:
        raise ImageRejected(f"payload {name!r} has an absurd size {size}")
    sha256 = _text(doc["sha256"], f"{what} sha256", _SHA256_RE)
    blake3 = doc.get("blake3")
    if blake3 is not None:
        blake3 = _text(blake3, f"{what} blake3", _BLAKE3_RE)
    try:
        compression = Compression(_str(doc["compression"], f"{what} compression"))
    except ValueError:
        raise ImageRejected(f"payload {name!r} has unknown compression {doc['compression']!r}") from None
    return Payload(name, kind, size, sha256, compression, blake3)


def _object(value: Any, what: str, keys: set[str], optional: Collection[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageRejected(f"{what} must be a JSON object")
    unknown = sorted(set(value) - keys - set(optional))
    missing = sorted(keys - set(value))
    if unknown:
        raise ImageRejected(f"{what} has unknown key {unknown[0]!r}")
    if missing:
        raise ImageRejected(f"{what} lacks key {missing[0]!r}")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImageRejected(f"{what} must be an integer")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ImageRejected(f"{what} must be a string")
    return value


def _text(value: Any, what: str, pattern: re.Pattern[str]) -> str:
    text = _str(value, what)
    if not pattern.fullmatch(text):
        raise ImageRejected(f"{what} {text[:80]!r} is not allowed (expected {pattern.pattern})")
    return text


def is_version(text: str) -> bool:
    """Whether `text` may be an image version (and so a security floor)."""
    return _VERSION_RE.fullmatch(text) is not None


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` is older than, equal to, or newer than `b`.

    Dot-separated parts compare numerically where numeric ("1.10" > "1.9"); missing parts count
    as zero ("1.2" == "1.2.0"); letters within a part compare after its digits, alphabetically
    ("1.2a" > "1.2"). A pre-release sorts before its release: everything after the first `~`
    (Debian) or `-` (semver) is a pre-release tag ("2.0~rc1" == "2.0-rc1" < "2.0"), compared
    by the same rules, so "2.0~rc1~git3" < "2.0~rc1" and "2.1-beta.2" < "2.1-beta.11" <
    "2.1-rc.1". "+build" metadata is ignored.
    """
    ka, kb = _version_key(a.split("+", 1)[0]), _version_key(b.split("+", 1)[0])
    return (ka > kb) - (ka < kb)


_Part = tuple[tuple[int, int, str], ...]
_Key = tuple[tuple[_Part, ...], int, tuple[object, ...]]


def _version_key(version: str) -> _Key:
    """(release parts, 1 for a release or 0 for a pre-release, the pre-release's own key)."""
    match = re.search(r"[~-]", version)
    main = version if match is None else version[:match.start()]
    parts = [_part(p) for p in main.split(".")]
    while parts and parts[-1] == _part("0"):
        parts.pop()
    if match is None:
        return tuple(parts), 1, ()
    return tuple(parts), 0, _version_key(version[match.end():])


def _part(text: str) -> _Part:
    runs = re.findall(r"\d+|[^\d]+", text)
    return tuple((1, int(r), "") if r.isdigit() else (0, 0, r) for r in runs) or ((1, 0, ""),)
