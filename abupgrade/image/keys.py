"""Ed25519 signing keys: generate, load, identify, and the keyring of trusted public keys.

A keyring folder holds the trusted keys (every `*.pub`) and, optionally, the revocation list
`revoked`: one key id per line (16 hex digits, as `image inspect` shows them), `#` starts a
comment. A revoked key signs nothing any more, whether its `.pub` is still there or not, so a
key is revoked on a machine before (or without) its file being removed everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from abupgrade import trust
from abupgrade.errors import OperationalError, UsageError
from abupgrade.fsutil import fsync_dir, open_input

REVOKED_NAME = "revoked"  # the revocation list, in the keyring folder
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def key_paths(prefix: Path) -> tuple[Path, Path]:
    """PREFIX.key and PREFIX.pub."""
    return prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")


def generate(prefix: Path) -> tuple[Path, Path]:
    """Write a new key pair to PREFIX.key (mode 0600) and PREFIX.pub; never overwrite either."""
    private_path, public_path = key_paths(prefix)
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path} exists", hint="choose another prefix; keys are never overwritten")
    if not prefix.parent.is_dir():
        raise UsageError(f"directory {prefix.parent} does not exist")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create_exclusive(private_path, private_pem, 0o600)
    try:
        _create_exclusive(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink()
        raise
    fsync_dir(private_path.parent)
    return private_path, public_path


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write a complete file, then link it into place: all or nothing, and never over a file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OperationalError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"{path} exists", hint="keys are never overwritten") from None
    except OSError as e:
        raise OperationalError(f"cannot write {path}: {e.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def key_id(public: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read(path: Path, what: str) -> bytes:
    with open_input(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise OperationalError(f"cannot read {what} {path}: {e.strerror}") from None


def load_private(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (unencrypted PKCS8)."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UsageError(
            f"{path} is not an unencrypted PEM private key", hint="make one with `abupgrade keygen`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 key", hint="make one with `abupgrade keygen`")
    return key


def permission_warning(path: Path) -> str | None:
    """A warning to show when the private key file is readable by group or others, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode_text = f"{stat.S_IMODE(mode):04o}"
        return f"private key {path} is readable by others (mode {mode_text}); chmod 600 it"
    return None


def load_public(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (SubjectPublicKeyInfo)."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UsageError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path} is not an Ed25519 public key")
    return key


def load_revoked(path: Path) -> frozenset[str]:
    """The key ids of a revocation list; a line that is not one is an error, never skipped."""
    revoked: set[str] = set()
    for number, line in enumerate(_read(path, "revocation list").decode(errors="replace")
                                  .splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not KEY_ID_RE.fullmatch(text):
            raise UsageError(
                f"revocation list {path} line {number}: {text[:40]!r} is not a key id",
                hint="one key id per line (16 hex digits, as `abupgrade image inspect` shows); "
                     "# starts a comment")
        revoked.add(text)
    return frozenset(revoked)


@dataclass(frozen=True)
class Keyring:
    """The trusted public keys, by key id, and the ids of revoked keys."""

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    sources: Mapping[str, Path] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()
    revocation_list: Path | None = None

    @classmethod
    def from_files(cls, paths: Iterable[Path], *, revoked: frozenset[str] = frozenset(),
                   revocation_list: Path | None = None) -> Keyring:
        keys: dict[str, Ed25519PublicKey] = {}
        sources: dict[str, Path] = {}
        for path in paths:
            public = load_public(path)
            kid = key_id(public)
            keys[kid] = public
            sources.setdefault(kid, path)
        return cls(keys, sources, revoked, revocation_list)

    @classmethod
    def from_dir(cls, directory: Path) -> Keyring:
        """Every *.pub in `directory`, less the keys its revocation list names. The folder, each
        key and the list must pass the strict-mode checks: whoever writes them decides trust."""
        real = trust.check(directory, "keyring", trust.Kind.FOLDER)
        if real is None:
            raise UsageError(
                f"keyring {directory} is not a directory",
                hint="set `keyring` in the configuration or pass --pubkey",
            )
        checked = (trust.check(path, "key", trust.Kind.FILE) for path in sorted(real.glob("*.pub")))
        keys = [path for path in checked if path is not None]
        listed = trust.check(real / REVOKED_NAME, "revocation list", trust.Kind.FILE)
        revoked = load_revoked(listed) if listed is not None else frozenset()
        return cls.from_files(keys, revoked=revoked, revocation_list=directory / REVOKED_NAME)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        """The key with id `kid` when it is trusted: in the keyring and not revoked."""
        return None if kid in self.revoked else self.keys.get(kid)

    def is_revoked(self, kid: str) -> bool:
        return kid in self.revoked

    def __contains__(self, kid: object) -> bool:
        return kid in self.keys and kid not in self.revoked

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self) -> str:
        """Where the keys came from, for hints."""
        trusted = {k: p for k, p in self.sources.items() if k not in self.revoked}
        text = ("trusted: " + ", ".join(f"{k} ({p.name})" for k, p in sorted(trusted.items()))
                if trusted else "the keyring is empty" if not self.sources
                else "every key of the keyring is revoked")
        if self.revoked:
            text += f"; revoked by {self.revocation_list}: " + ", ".join(sorted(self.revoked))
        return text
