"""The distribution HTTP API, over http.client: TLS with an extra CA, plain HTTP only for
loopback and hosts configured insecure, anonymous, basic and bearer-token auth.

Credentials come from a docker-style config.json ("auths"), never from the command line, and
never appear in messages. Redirects (blob storage behind a CDN) are followed without the
Authorization header when they leave the registry's host.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from abupgrade import trust
from abupgrade.config import RegistryConfig
from abupgrade.errors import OperationalError, UsageError

TIMEOUT = 30.0  # seconds without progress before a request is given up
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 << 10
MAX_BODY = 4 << 20  # of a response read whole (manifests, tokens): anything larger is refused
USER_AGENT = "abupgrade"
REDIRECTS = (301, 302, 303, 307, 308)

Body = bytes | Callable[[], BinaryIO] | None


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def default_auth_file() -> Path | None:
    """Where tools that talk to registries keep credentials: REGISTRY_AUTH_FILE, then
    $DOCKER_CONFIG/config.json, then ~/.docker/config.json."""
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return Path(os.environ["REGISTRY_AUTH_FILE"])
    docker = Path(os.environ["DOCKER_CONFIG"]) if os.environ.get("DOCKER_CONFIG") else (
        Path.home() / ".docker")
    path = docker / "config.json"
    return path if path.is_file() else None


def load_credentials(path: Path | None, host: str) -> Credentials | None:
    """The credentials for `host` in a docker-style config.json, or None."""
    if path is None:
        return None
    # whoever can write it decides which registry account the machine uses (strict modes)
    real = trust.check(path, "registry credentials", trust.Kind.FILE)
    try:
        if real is None:
            raise FileNotFoundError(path)
        data = json.loads(real.read_text())
    except FileNotFoundError:
        raise UsageError(f"registry auth file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read registry auth file {path}: {exc}") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        name = urllib.parse.urlsplit(key).netloc if "://" in key else key.split("/")[0]
        if name.lower() != host.lower() or not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str):
            try:
                user, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise UsageError(f"registry auth file {path}: the entry for {host} is not "
                                 "base64 of user:password") from None
        if isinstance(user, str) and isinstance(password, str):
            return Credentials(user, password)
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="..."` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m[1].lower(): m[2] if m[2] is not None else m[3]
              for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^\s,]+))', rest)}
    return scheme.lower(), params


def is_loopback(host: str) -> bool:
    name = urllib.parse.urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes = b""
    raw: http.client.HTTPResponse | None = None  # an open body to stream (stream=True)
    conn: http.client.HTTPConnection | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Registry:
    """One registry host. Requests take a path under it (or an absolute URL it handed out)."""

    def __init__(self, host: str, settings: RegistryConfig | None = None, *,
                 timeout: float = TIMEOUT) -> None:
        self.host = host
        self.settings = settings or RegistryConfig()
        self.timeout = timeout
        self._scheme: str | None = None
        self._auth: dict[str, str] = {}
        self._context: ssl.SSLContext | None = None
        self._credentials: Credentials | None | bool = False  # False: not loaded yet
        self.auth_file = self.settings.auth_file or default_auth_file()

    # ------------------------------------------------------------ transport

    @property
    def plain_http_allowed(self) -> bool:
        return is_loopback(self.host) or self.host.lower() in (h.lower() for h in self.settings.insecure)

    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context()
            if self.settings.ca_file is not None:
                # whoever can write it decides who the registry is (strict modes)
                trust.check(self.settings.ca_file, "registry CA file", trust.Kind.FILE)
                try:
                    context.load_verify_locations(cafile=str(self.settings.ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise UsageError(f"cannot load registry CA file {self.settings.ca_file}: {exc}") from None
            self._context = context
        return self._context

    def _open(self, method: str, url: str, headers: Mapping[str, str],
              body: bytes | BinaryIO | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request; connection errors are raised as they are (OSError, HTTPException)."""
        parts = urllib.parse.urlsplit(url)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.netloc, timeout=self.timeout, context=self._tls(),
                                               blocksize=1 << 20)
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout, blocksize=1 << 20)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, path or "/", body=body, headers=dict(headers))
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def unreachable(self, exc: BaseException, host: str | None = None) -> OperationalError:
        """The one-line error for a connection that failed or broke."""
        host = host or self.host
        if isinstance(exc, ssl.SSLCertVerificationError):
            return OperationalError(f"TLS certificate of {host} is not trusted: {exc.verify_message}",
                                    hint="set [registry] ca_file to the CA that signed it")
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        if isinstance(exc, socket.timeout | TimeoutError):
            reason = f"no answer within {self.timeout:g} s"
        return OperationalError(f"cannot reach registry {host}: {reason}",
                                hint="check the reference and the network")

    def base(self) -> str:
        """https://host, or http://host where plain HTTP is allowed and the host does not speak TLS."""
        if self._scheme is None:
            try:
                conn, response = self._open("GET", f"https://{self.host}/v2/", {"User-Agent": USER_AGENT},
                                            None)
                conn.close()
                self._scheme = "https"
            except ssl.SSLCertVerificationError as exc:
                raise self.unreachable(exc) from None
            except (ssl.SSLError, ConnectionResetError, http.client.HTTPException) as exc:
                if not self.plain_http_allowed:
                    raise OperationalError(
                        f"registry {self.host} does not speak TLS ({exc})",
                        hint=f'to allow plain HTTP, add "{self.host}" to [registry] insecure') from None
                self._scheme = "http"
            except OSError as exc:
                raise self.unreachable(exc) from None
        return f"{self._scheme}://{self.host}"

    # ------------------------------------------------------------ requests

    def request(self, method: str, path: str, *, scope: str, headers: Mapping[str, str] | None = None,
                body: Body = None, ok: tuple[int, ...] = (200,), stream: bool = False,
                what: str = "") -> Response:
        """Send a request with the auth `scope` needs; a status outside `ok` is an error.

        `path` is under the registry ("/v2/...") or an absolute URL it returned (an upload
        Location). With `stream`, the body is left open in `Response.raw` (close the response).
        A 401 is answered once by authenticating for `scope`; GET and HEAD follow redirects.
        """
        url = urllib.parse.urljoin(self.base() + "/", path)
        what = what or f"{method} {urllib.parse.urlsplit(url).path}"
        for attempt in range(2):
            response = self._follow(method, url, scope, dict(headers or {}), body, what)
            if response.status != 401 or attempt:
                break
            challenge = response.header("WWW-Authenticate") or ""
            response.close()
            self._auth[scope] = self._authorize(challenge, scope)
        if response.status == 401:
            response.close()
            raise self._refused()
        if response.status not in ok:
            try:
                detail = _error_text(response)
            finally:
                response.close()
            raise self._failed(response.status, detail, what)
        if not stream:
            try:
                response.body = response.raw.read(MAX_BODY + 1) if response.raw is not None else b""
            except (OSError, http.client.HTTPException) as exc:
                raise self.unreachable(exc) from None
            finally:
                response.close()
            response.raw = None
            if len(response.body) > MAX_BODY:
                raise OperationalError(f"registry {self.host}: {what}: the answer is over {MAX_BODY} bytes")
        return response

    def _follow(self, method: str, url: str, scope: str, headers: dict[str, str], body: Body,
                what: str) -> Response:
        headers.setdefault("User-Agent", USER_AGENT)
        for _hop in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            host = urllib.parse.urlsplit(url).netloc
            if scope in self._auth and host.lower() == self.host.lower():
                sent["Authorization"] = self._auth[scope]
            data = body() if callable(body) else body
            try:
                conn, raw = self._open(method, url, sent, data)
            except (OSError, http.client.HTTPException) as exc:
                raise self.unreachable(exc, host) from None
            response = Response(raw.status, raw.headers, raw=raw, conn=conn)
            location = raw.getheader("Location")
            if raw.status not in REDIRECTS or method not in ("GET", "HEAD") or not location:
                return response
            response.close()
            url = urllib.parse.urljoin(url, location)
        raise OperationalError(f"{what}: more than {MAX_REDIRECTS} redirects at {self.host}")

    # ------------------------------------------------------------ auth

    def credentials(self) -> Credentials | None:
        if self._credentials is False:
            self._credentials = load_credentials(self.auth_file, self.host)
        assert not isinstance(self._credentials, bool)
        return self._credentials

    def _needs_login(self) -> OperationalError:
        where = str(self.auth_file) if self.auth_file else "a docker-style config.json ([registry] auth_file)"
        return OperationalError(f"registry {self.host} requires credentials",
                                hint=f"add an entry for {self.host} to {where}")

    def _refused(self) -> OperationalError:
        creds = self.credentials()
        if creds is None:
            return self._needs_login()
        return OperationalError(f"registry {self.host} refused the credentials of {creds.username!r}",
                                hint=f"check the entry for {self.host} in {self.auth_file}")

    def _authorize(self, challenge: str, scope: str) -> str:
        kind, params = parse_challenge(challenge)
        creds = self.credentials()
        if kind == "basic":
            if creds is None:
                raise self._needs_login()
            return creds.basic()
        if kind != "bearer" or "realm" not in params:
            raise OperationalError(f"registry {self.host} asks for unsupported authentication {kind!r}")
        query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        if urllib.parse.urlsplit(url).scheme != "https" and not (
                is_loopback(urllib.parse.urlsplit(url).netloc) or self.plain_http_allowed):
            raise OperationalError(f"registry {self.host} sends credentials to a plain HTTP token "
                                   f"service {realm}", hint="the token realm must use https")
        headers = {"User-Agent": USER_AGENT}
        if creds is not None:
            headers["Authorization"] = creds.basic()
        token_host = urllib.parse.urlsplit(url).netloc
        try:
            conn, raw = self._open("GET", url, headers, None)
        except (OSError, http.client.HTTPException) as exc:
            raise self.unreachable(exc, token_host) from None
        try:
            body = raw.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException) as exc:
            raise self.unreachable(exc, token_host) from None
        finally:
            conn.close()
        if raw.status in (401, 403):
            raise self._refused()
        if raw.status != 200:
            raise OperationalError(f"token service {token_host} answered HTTP {raw.status}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise OperationalError(f"token service {token_host} sent no token")
        return f"Bearer {token}"

    def _failed(self, status: int, detail: str, what: str) -> OperationalError:
        if status == 403:
            return OperationalError(f"registry {self.host} denied {what}: {detail or 'forbidden'}",
                                    hint="the account lacks the permission")
        return OperationalError(f"registry {self.host}: {what} failed: HTTP {status}"
                                + (f" {detail}" if detail else ""))


def _error_text(response: Response) -> str:
    """The registry's error codes and messages from an error response, briefly."""
    if response.raw is None:
        return ""
    try:
        data: Any = json.loads(response.raw.read(MAX_ERROR_BODY) or b"{}")
    except (OSError, ValueError, http.client.HTTPException):
        return ""
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
             for e in errors if isinstance(e, dict)]
    return "; ".join(p for p in parts if p)[:300]
