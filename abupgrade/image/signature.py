"""manifest.sig: Ed25519 signatures over the exact manifest bytes; one trusted one suffices."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from abupgrade.errors import ImageRejected
from abupgrade.image.keys import KEY_ID_RE, Keyring, key_id
from abupgrade.image.manifest import canonical_json, strict_json

MAX_SIGNATURES = 16
MAX_SIGNATURES_BYTES = 64 << 10


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes


@dataclass(frozen=True)
class SignatureStatus:
    key_id: str
    trusted: bool | None  # None: no keyring was given, nothing was checked
    revoked: bool | None = None  # the keyring's revocation list names the key

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "trusted": self.trusted, "revoked": self.revoked}


def sign(manifest_bytes: bytes, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The manifest.sig member for `manifest_bytes`, one entry per key."""
    entries = [
        {
            "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
        }
        for key in keys
    ]
    return canonical_json(entries)


def parse(data: bytes) -> tuple[Signature, ...]:
    """The entries of a manifest.sig member; strict, so no two encodings mean the same thing."""
    if len(data) > MAX_SIGNATURES_BYTES:
        raise ImageRejected(f"manifest.sig is {len(data)} bytes, over the {MAX_SIGNATURES_BYTES} limit")
    doc = strict_json(data, "manifest.sig")
    if not isinstance(doc, list) or not doc:
        raise ImageRejected("image has no signature", hint="sign it with `abupgrade image build --key`")
    if len(doc) > MAX_SIGNATURES:
        raise ImageRejected(f"manifest.sig has {len(doc)} signatures, over the {MAX_SIGNATURES} limit")
    if canonical_json(doc) != data:
        raise ImageRejected("manifest.sig is not in canonical form")
    result: list[Signature] = []
    for entry in doc:
        if not isinstance(entry, dict) or set(entry) != {"key_id", "signature"}:
            raise ImageRejected("manifest.sig entries must be {key_id, signature} objects")
        kid, text = entry["key_id"], entry["signature"]
        if not isinstance(kid, str) or not KEY_ID_RE.fullmatch(kid):
            raise ImageRejected(f"manifest.sig has a malformed key id {str(kid)[:40]!r}")
        if not isinstance(text, str):
            raise ImageRejected(f"signature by key {kid} is not a string")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageRejected(f"signature by key {kid} is not base64") from None
        if len(raw) != 64 or base64.b64encode(raw).decode("ascii") != text:
            raise ImageRejected(f"signature by key {kid} is not a 64-byte Ed25519 signature")
        if any(s.key_id == kid for s in result):
            raise ImageRejected(f"manifest.sig holds two signatures by key {kid}")
        result.append(Signature(kid, raw))
    return tuple(result)


def check(
    manifest_bytes: bytes, signatures: Sequence[Signature], keyring: Keyring | None, *, strict: bool
) -> tuple[SignatureStatus, ...]:
    """Each signature's trust. With `strict`, demand one trusted signature and no bad one.

    A signature by a revoked key is never trusted and never checked: the key may be in the
    hands of anyone by now, so what it signed means nothing.
    """
    if keyring is None:
        return tuple(SignatureStatus(s.key_id, None) for s in signatures)
    statuses: list[SignatureStatus] = []
    for sig in signatures:
        revoked = keyring.is_revoked(sig.key_id)
        public = keyring.get(sig.key_id)
        trusted = False
        if public is not None:
            try:
                public.verify(sig.signature, manifest_bytes)
                trusted = True
            except InvalidSignature:
                if strict:
                    raise ImageRejected(
                        f"bad signature by trusted key {sig.key_id}: the manifest was altered"
                    ) from None
        statuses.append(SignatureStatus(sig.key_id, trusted, revoked))
    if strict and not any(s.trusted for s in statuses):
        revoked_ids = [s.key_id for s in statuses if s.revoked]
        unknown_ids = [s.key_id for s in statuses if not s.revoked]
        if not unknown_ids:
            raise ImageRejected(
                f"image is signed only by revoked key(s) {', '.join(revoked_ids)}",
                hint=f"{keyring.revocation_list or 'the revocation list'} revokes them; "
                     "use an image signed by a key that is still trusted")
        what = f"key(s) {', '.join(unknown_ids)}, none in the keyring"
        if revoked_ids:
            what += f", and by revoked key(s) {', '.join(revoked_ids)}"
        raise ImageRejected(f"no trusted signature: image is signed by {what}",
                            hint=keyring.describe())
    return tuple(statuses)
