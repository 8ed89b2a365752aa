"""Byte ranges of an image where it lives: a local file, an http(s) URL, an OCI registry.

`fetch` takes the ranges a delta update needs (ascending), merges those that lie close together
into one request, and yields each range's bytes in order while the response streams: memory
holds one range and one read buffer. A connection that breaks inside a request is resumed with
a Range request from the byte it reached. A server that ignores Range requests raises
RangesUnsupported, so the caller can stream the whole image instead.

Nothing here trusts the bytes: the caller checks them against the signed manifest and index.
`received` counts every byte that came over the network (merged gaps included).
"""

from __future__ import annotations

import functools
import http.client
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from abupgrade.config import RegistryConfig
from abupgrade.errors import AbupgradeError, ImageRejected, OperationalError
from abupgrade.fsutil import open_input
from abupgrade.oci.client import Registry

PIECE = 1 << 20  # bytes read from a response at a time
GAP = 1024  # ranges closer than this are fetched in one request (the gap is thrown away)
RESUMES = 5  # broken connections resumed per request before the fetch fails
BACKOFF = 0.5  # seconds, times the attempt number
TIMEOUT = 30.0
MAX_REDIRECTS = 5
USER_AGENT = "abupgrade"

Span = tuple[int, int]  # (offset, length)


class RangesUnsupported(AbupgradeError):
    """The server does not answer Range requests; stream the whole image instead."""


class RangeSource(Protocol):
    received: int
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def fetch(self, ranges: Sequence[Span], *, side: bool = False) -> Iterator[bytes]: ...

    def close(self) -> None: ...


def coalesce(ranges: Sequence[Span], gap: int = GAP) -> list[Span]:
    """Merge ascending, non-overlapping ranges whose gaps are at most `gap` bytes."""
    merged: list[Span] = []
    end = -1
    for offset, length in ranges:
        if offset < end:
            raise ValueError("ranges must ascend without overlapping")
        if merged and offset - end <= gap:
            start = merged[-1][0]
            merged[-1] = (start, offset + length - start)
        else:
            merged.append((offset, length))
        end = offset + length
    return merged


class _Ranged:
    """Shared by every source: merging, slicing responses into the asked ranges.

    A fetch streams over a connection of its own; `read` and a fetch with `side` use another
    one, so that they can run while a fetch is half way through a response."""

    size: int = 0

    def __init__(self) -> None:
        self.received = 0
        self.requests = 0
        self.gap = GAP

    def _get(self, offset: int, length: int, side: bool) -> Iterator[bytes]:
        """The bytes of [offset, offset + length), in pieces, resumed where a connection broke."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageRejected(f"image ends before byte {offset + length:,} (it has {self.size:,})")
        return b"".join(self._get(offset, length, True)) if length else b""

    def fetch(self, ranges: Sequence[Span], *, side: bool = False) -> Iterator[bytes]:
        wanted = [r for r in ranges if r[1] > 0]
        pending = iter(wanted)
        current = next(pending, None)
        for start, length in coalesce(wanted, self.gap):
            if start + length > self.size:
                raise ImageRejected(f"image ends before byte {start + length:,}")
            buffer = bytearray()
            at = start  # offset of buffer[0]
            for piece in self._get(start, length, side):
                buffer += piece
                while current is not None and current[0] + current[1] <= at + len(buffer):
                    lo = current[0] - at
                    yield bytes(buffer[lo:lo + current[1]])
                    del buffer[:lo + current[1]]
                    at = current[0] + current[1]
                    current = next(pending, None)
                if current is None or current[0] >= at + len(buffer):
                    skip = len(buffer) if current is None else min(len(buffer), current[0] - at)
                    del buffer[:skip]
                    at += skip

    def close(self) -> None:
        pass


class FileRanges(_Ranged):
    """An image file on this machine: reads cost no network."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open_input(path, "image")
        self.size = self._file.seek(0, 2)
        self.gap = 0

    def _get(self, offset: int, length: int, side: bool) -> Iterator[bytes]:
        end = offset + length
        while offset < end:
            self._file.seek(offset)
            piece = self._file.read(min(PIECE, end - offset))
            if not piece:
                raise ImageRejected(f"image ends at byte {offset:,}")
            offset += len(piece)
            yield piece

    def close(self) -> None:
        self._file.close()


class Body(Protocol):
    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


Opener = Callable[[int, int], Body]


def _resuming(opener: Opener, offset: int, length: int, what: str,
              counter: Callable[[int], None], broken: Callable[[], None]) -> Iterator[bytes]:
    """Stream [offset, offset + length) from responses `opener(at, end)` hands out; a
    connection that breaks is given up (`broken`) and a new one opened at the byte reached."""
    end = offset + length
    at = offset
    failures = 0
    while at < end:
        failure: BaseException | None = None
        try:
            response = opener(at, end)
            try:
                while at < end:
                    piece = response.read(min(PIECE, end - at))
                    if not piece:
                        break
                    at += len(piece)
                    counter(len(piece))
                    yield piece
            finally:
                response.close()
        except (OSError, http.client.HTTPException) as exc:
            failure = exc
        if at < end:
            broken()  # a kept-alive connection that broke would only fail the next request
            failures += 1
            if failures > RESUMES:
                reason = failure or ConnectionResetError("the connection closed early")
                raise OperationalError(f"{what}: the connection broke at byte {at:,} {RESUMES} times "
                                       f"({reason})", hint="retry later")
            time.sleep(BACKOFF * failures)


def _check_partial(response: http.client.HTTPResponse, at: int, end: int, total: int | None,
                   what: str) -> int:
    """The total size the server states, after checking it answered exactly [at, end)."""
    if response.status == 200 and at == 0 and end == total:
        return total  # the whole body was asked for: a plain answer is the right one
    if response.status != 206:
        response.close()
        raise RangesUnsupported(f"{what} does not answer Range requests (HTTP {response.status})")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.getheader("Content-Range") or "")
    if match is None or int(match[1]) != at or int(match[2]) != end - 1:
        response.close()
        raise OperationalError(f"{what} answered the wrong range "
                               f"({response.getheader('Content-Range')}, asked {at}-{end - 1})")
    stated = int(match[3]) if match[3] != "*" else None
    if total is not None and stated not in (None, total):
        response.close()
        raise ImageRejected(f"{what} changed while it was read ({stated} bytes, was {total})")
    return stated if stated is not None else end


Refresh = Callable[[], tuple[str, dict[str, str]]]


class HttpRanges(_Ranged):
    """Bytes at an http(s) URL, read with Range requests over one kept-alive connection.

    `size` skips the first request that learns it; `headers` go with every request to the
    URL's host; `refresh` is asked for a new (url, headers) once when the server answers 401
    or 403 (an expired token or a signed URL that timed out).
    """

    def __init__(self, url: str, *, timeout: float = TIMEOUT, headers: dict[str, str] | None = None,
                 context: ssl.SSLContext | None = None, size: int | None = None,
                 refresh: Refresh | None = None, parent: _Ranged | None = None) -> None:
        super().__init__()
        self.url = url
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.context = context
        self.refresh = refresh
        self.parent = parent
        self._conns: dict[bool, tuple[str, http.client.HTTPConnection]] = {}  # side -> netloc, conn
        self._total = size
        if size is None:
            self._count(len(self._open(0, 1, True).read(PIECE)))
            self.size = self._total or 0
            if not self.size:
                raise RangesUnsupported(f"{url} does not say how large it is")
        else:
            self.size = size

    @property
    def _what(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def _connection(self, url: str, side: bool) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        if side in self._conns and self._conns[side][0] == key:
            return self._conns[side][1]
        self._drop(side)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            context = self.context or ssl.create_default_context()
            conn = http.client.HTTPSConnection(parts.netloc, timeout=self.timeout, context=context)
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout)
        self._conns[side] = (key, conn)
        return conn

    def _drop(self, side: bool) -> None:
        if side in self._conns:
            self._conns.pop(side)[1].close()

    def _open(self, at: int, end: int, side: bool = False) -> Body:
        url = self.url
        refreshed = False
        hops = 0
        while hops <= MAX_REDIRECTS:
            parts = urllib.parse.urlsplit(url)
            conn = self._connection(url, side)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            headers = {"Range": f"bytes={at}-{end - 1}", "User-Agent": USER_AGENT}
            if parts.netloc == urllib.parse.urlsplit(self.url).netloc:
                headers.update(self.headers)  # credentials never follow a redirect elsewhere
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                self._drop(side)
                raise OperationalError(f"TLS certificate of {parts.netloc} is not trusted: "
                                       f"{exc.verify_message}") from None
            except (OSError, http.client.HTTPException):
                self._drop(side)
                raise
            self.requests += 1
            if self.parent is not None:
                self.parent.requests += 1
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                response.read()
                url = urllib.parse.urljoin(url, location)
                hops += 1
                continue
            if response.status in (401, 403) and self.refresh is not None and not refreshed:
                response.read()
                self.url, self.headers = self.refresh()
                url, refreshed, hops = self.url, True, 0
                continue
            if response.status >= 400:
                response.read()
                raise OperationalError(f"download of {self.url} failed: HTTP {response.status} "
                                       f"{response.reason}")
            self._total = _check_partial(response, at, end, self._total, self._what)
            if response.will_close:
                self._conns.pop(side, None)  # the response ends the connection: reconnect next
            return response
        raise OperationalError(f"{self.url}: more than {MAX_REDIRECTS} redirects")

    def _count(self, n: int) -> None:
        self.received += n
        if self.parent is not None:
            self.parent.received += n

    def _get(self, offset: int, length: int, side: bool) -> Iterator[bytes]:
        return _resuming(functools.partial(self._open, side=side), offset, length, self._what,
                         self._count, functools.partial(self._drop, side))

    def close(self) -> None:
        for side in list(self._conns):
            self._drop(side)


class OciRanges(_Ranged):
    """An image in an OCI registry: its layers, concatenated, are the image tar; ranges of
    it are Range requests on the blobs, over one kept-alive connection per blob (the first
    request of each goes through the registry client: authentication, redirects)."""

    def __init__(self, reference: str, settings: RegistryConfig | None = None) -> None:
        from abupgrade.oci.pull import _fetch_manifest
        from abupgrade.oci.reference import parse_reference

        super().__init__()
        self.ref = parse_reference(reference)
        self.registry = Registry(self.ref.host, settings)
        artifact, self.digest = _fetch_manifest(self.registry, self.ref)
        self.layers = artifact.layers
        self.starts: list[int] = []
        at = 0
        for layer in self.layers:
            self.starts.append(at)
            at += layer.size
        self.size = at
        self._blobs: dict[int, HttpRanges] = {}

    def _get(self, offset: int, length: int, side: bool) -> Iterator[bytes]:
        end = offset + length
        for number, layer in enumerate(self.layers):
            start = self.starts[number]
            lo, hi = max(offset, start), min(end, start + layer.size)
            if lo < hi:
                yield from self._blob(number)._get(lo - start, hi - lo, side)

    def _blob(self, number: int) -> HttpRanges:
        if number not in self._blobs:
            layer = self.layers[number]
            url, headers = self._locate(number)
            self._blobs[number] = HttpRanges(
                url, headers=headers, context=self.registry.tls(), size=layer.size,
                refresh=lambda: self._locate(number), parent=self)
        return self._blobs[number]

    def _locate(self, number: int) -> tuple[str, dict[str, str]]:
        """Where blob `number` is served and what to send there: one request through the
        registry client, which authenticates and follows redirects."""
        layer = self.layers[number]
        scope = f"repository:{self.ref.repository}:pull"
        response = self.registry.request(
            "GET", f"/v2/{self.ref.repository}/blobs/{layer.digest}", scope=scope,
            headers={"Range": "bytes=0-0"}, ok=(200, 206), stream=True,
            what=f"reading blob {layer.digest[:19]} of {self.ref}")
        self.requests += 1
        response.close()
        if response.status != 206 and layer.size > 1:
            raise RangesUnsupported(f"registry {self.ref.host} does not answer Range requests")
        headers: dict[str, str] = {}
        auth = self.registry.authorization(scope)
        if auth and urllib.parse.urlsplit(response.url).netloc.lower() == self.ref.host.lower():
            headers["Authorization"] = auth
        return response.url, headers

    def close(self) -> None:
        for blob in self._blobs.values():
            blob.close()
