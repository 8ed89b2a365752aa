"""Trust boundaries through the command line on loop disks: strict modes refuse what another
user could have written (the boot hook fails a refused check, never skips it), a revoked key
signs nothing through `apply` from a file, a URL or a registry, and the security floor holds
even with --allow-downgrade, and rises only when an image that declares it is committed."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abupgrade import config as configuration
from abupgrade import oci
from abupgrade.image import build, keys
from abupgrade.model import Slot
from fixtures.images import KeyPair, keypair, rootfs_image
from fixtures.machine import Machine, running_machine
from fixtures.registry import RegistryServer, available, registry
from tests.conftest import any_bootloader, require_loop

pytestmark = [pytest.mark.loop, any_bootloader]


# ------------------------------------------------------------------ helpers


@pytest.fixture
def machine(ab_disk: Path, tmp_path: Path) -> Iterator[Machine]:
    with running_machine(ab_disk, tmp_path / "machine", booted=Slot.A, health_timeout=5) as m:
        yield m


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, signer: KeyPair) -> dict[str, KeyPair]:
    """`signer` is the key the test disks trust; `new` and `thief` are keys of their own."""
    base = tmp_path_factory.mktemp("security-keys")
    return {"signer": signer, "new": keypair(base, "new"), "thief": keypair(base, "thief")}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory,
           pairs: dict[str, KeyPair]) -> Callable[..., Path]:
    """images(version, *signers, floor=None) -> a signed image; signers by name (see pairs)."""
    base = tmp_path_factory.mktemp("security-images")
    made: dict[tuple[object, ...], Path] = {}

    def make(version: str, *signers: str, floor: str | None = None) -> Path:
        key = (version, signers or ("signer",), floor)
        if key not in made:
            name = f"{version}-{'-'.join(key[1])}-{floor}"
            rootfs = rootfs_image(base / f"{name}.ext4", tag=version, size=8 << 20)
            made[key] = base / f"{name}.tar"
            build.build(rootfs, version, "test-box", [pairs[s].private for s in key[1]],
                        made[key], compression="none", security_floor=floor)
        return made[key]

    return make


def kid(pair: KeyPair) -> str:
    return keys.key_id(keys.load_public(pair.public))


def refused_with(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert "\n" not in line, line
    for word in words:
        assert word in line, line
    return line


def status(m: Machine) -> dict[str, object]:
    proc = m.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def events(m: Machine) -> list[dict[str, str]]:
    data: list[dict[str, str]] = json.loads(m.cli("history", "--json").stdout)
    return data


def reconfigure(m: Machine, **changes: object) -> None:
    m.config = dataclasses.replace(m.config, **changes)  # type: ignore[arg-type]
    m.config_path.write_text(configuration.render(m.config))


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer | None]:
    """A local registry, or None where none can run (the tests then fail where every tier
    must run, else skip the oci:// part saying why)."""
    if available() is not None:
        yield None
        return
    with registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


def sources(image: Path, web: str, server: RegistryServer | None) -> list[str]:
    """The same image as a path, an http URL and an oci:// reference."""
    found = [str(image), f"{web}/{image.name}"]
    if server is None:
        why = available()
        if os.environ.get("ABUPGRADE_REQUIRE_ALL_TIERS") == "1":
            pytest.fail(f"no registry where every tier must run: {why}")
        return found
    ref = server.reference("security/os", image.name.removesuffix(".tar").replace("+", "_"))
    oci.push(image, ref)
    return [*found, ref]
