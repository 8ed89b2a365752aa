"""Where an image comes from: a path, `-` for stdin, an http(s) URL or an oci:// reference,
always as a stream."""

from __future__ import annotations

import contextlib
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

from abupgrade.config import RegistryConfig
from abupgrade.errors import OperationalError, UsageError
from abupgrade.fsutil import open_input

TIMEOUT = 30.0  # seconds without progress before a download is given up


@contextlib.contextmanager
def open_source(spec: str, *, timeout: float = TIMEOUT,
                registry: RegistryConfig | None = None) -> Iterator[BinaryIO]:
    """Open an image for streaming; the stream is closed when the block ends (stdin is not).

    `registry` says how oci:// references reach their registry (TLS, insecure hosts, credentials).
    """
    if spec == "-":
        yield sys.stdin.buffer
        return
    scheme = urllib.parse.urlsplit(spec).scheme.lower()
    if scheme in ("http", "https"):
        with _open_url(spec, timeout) as response:
            yield response
        return
    if scheme == "oci":
        from abupgrade.oci import open_image

        with open_image(spec, settings=registry) as layers:
            yield layers
        return
    if "://" in spec:
        raise UsageError(f"unsupported image source {spec!r}",
                         hint="use a path, -, an http(s) URL or an oci:// reference")
    with open_input(Path(spec), "image") as handle:
        yield handle


def source_is_remote(spec: str) -> bool:
    """Whether reading the image at `spec` costs network (stdin counts: it came from outside)."""
    return spec == "-" or urllib.parse.urlsplit(spec).scheme.lower() in ("http", "https", "oci")


def _open_url(url: str, timeout: float) -> BinaryIO:
    import http.client  # here: a local image needs no HTTP (start-up time)
    import urllib.error
    import urllib.request

    host = urllib.parse.urlsplit(url).netloc
    request = urllib.request.Request(url, headers={"User-Agent": "abupgrade"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise OperationalError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise OperationalError(
            f"cannot reach {host}: {e.reason}", hint="check the URL and the network"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise OperationalError(f"download of {url} failed: {e}") from None
    return cast(BinaryIO, response)
