"""`oci://HOST[:PORT]/REPO:TAG` and `oci://HOST[:PORT]/REPO@sha256:HEX`, parsed strictly."""

from __future__ import annotations

import re
from dataclasses import dataclass

from abupgrade.errors import UsageError

SCHEME = "oci://"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_RE = re.compile(
    r"oci://(?P<host>(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?)"
    rf"/(?P<repository>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)


@dataclass(frozen=True)
class Reference:
    host: str  # host[:port], as the registry is addressed and as credentials are looked up
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag or ""

    def __str__(self) -> str:
        return (f"{SCHEME}{self.host}/{self.repository}" + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))


def parse_reference(text: str, *, need_tag: bool = False) -> Reference:
    """Parse a reference; it must name a tag or a digest (with `need_tag`, a tag)."""
    match = _RE.fullmatch(text)
    if match is None:
        raise UsageError(f"{text!r} is not an OCI reference",
                         hint="write oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:DIGEST")
    port = match["port"]
    if port is not None and not 0 < int(port) < 65536:
        raise UsageError(f"{text!r}: port {port} is out of range")
    ref = Reference(match["host"], match["repository"], match["tag"], match["digest"])
    if need_tag and ref.tag is None:
        raise UsageError(f"{text!r} names no tag", hint="add :TAG, e.g. oci://host/repo:2.1")
    if ref.tag is None and ref.digest is None:
        raise UsageError(f"{text!r} names neither a tag nor a digest",
                         hint="add :TAG or @sha256:DIGEST; abupgrade never guesses 'latest'")
    return ref
