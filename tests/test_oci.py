"""OCI registries: push, pull byte-exact, check, dedup, tampering, broken connections, auth, TLS.

Against a real registry (Debian's docker-registry) started per module on 127.0.0.1; the apply
tests write loop disks through the command line like a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abupgrade import oci
from abupgrade.config import RegistryConfig
from abupgrade.errors import ImageRejected, NothingNewer, OperationalError, PolicyRefusal, UsageError
from abupgrade.image.keys import Keyring
from abupgrade.image.reader import ImageReader
from abupgrade.oci.layout import FRAMING_TYPE, PAYLOAD_TYPE, split
from abupgrade.source import open_source
from fixtures.images import KeyPair
from fixtures.machine import run_cli, status_json
from fixtures.registry import (
    CuttingProxy,
    RegistryServer,
    TokenService,
    auth_file,
    available,
    make_ca,
    registry,
)
from fixtures.tiers import needs, needs_registry


def require_registry() -> None:
    needs_registry(available())


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    require_registry()
    with registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`abupgrade ARGS` with extra environment variables."""
    return subprocess.run([sys.executable, "-m", "abupgrade", *args], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, **env})


def pulled(reference: str, settings: RegistryConfig | None = None) -> bytes:
    with oci.open_image(reference, settings=settings) as stream:
        return stream.read()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ without a registry


@pytest.mark.parametrize("text", [
    "oci://127.0.0.1:5000/os:1.0",
    "oci://registry.example/acme/box-os:2.1-rc1",
    "oci://host/repo@sha256:" + "a" * 64,
    "oci://host:443/a/b/c:tag@sha256:" + "0" * 64,
])
def test_reference_round_trip(text: str) -> None:
    assert str(oci.parse_reference(text)) == text


@pytest.mark.parametrize("text", [
    "oci://host/repo",  # no tag, no digest: never a silent 'latest'
    "oci://host/Repo:1",  # repositories are lower case
    "oci://host/repo:1@sha256:abc",
    "oci://host:99999/repo:1",
    "oci://host/../x:1",
    "http://host/repo:1",
])
def test_reference_refused(text: str) -> None:
    with pytest.raises(UsageError):
        oci.parse_reference(text)


def test_split_concatenates_back(make_image: Callable[..., Path]) -> None:
    image = make_image("1.0", compression="zstd")
    manifest, segments = split(image)
    data = image.read_bytes()
    joined = b"".join(data[s.offset:s.offset + s.size] for s in segments)
    assert joined == data
    kinds = [s.media_type for s in segments]
    assert kinds[0] == FRAMING_TYPE and kinds[-1] == FRAMING_TYPE
    assert [s.payload for s in segments if s.media_type == PAYLOAD_TYPE] == [
        p.name for p in manifest.payloads]


# ------------------------------------------------------------------ push, pull, check


def test_push_pull_is_byte_exact_and_uploads_only_new_blobs(
        plain: RegistryServer, make_image: Callable[..., Path], signer: KeyPair) -> None:
    first, second = make_image("1.0"), make_image("2.0")
    ref = plain.reference("dedup/os", "1.0")
    pushed = oci.push(first, ref, keyring=Keyring.from_files([signer.public]))
    assert pushed.uploaded_blobs >= 3 and pushed.version == "1.0"
    assert pulled(ref) == first.read_bytes()
    assert pulled(pushed.reference) == first.read_bytes()  # by digest

    again = oci.push(first, ref)
    assert again.uploaded_blobs == 0 and again.digest == pushed.digest

    newer = oci.push(second, plain.reference("dedup/os", "2.0"))
    # kernel and initrd are the same bytes in both images: not sent again
    assert newer.reused_bytes >= (first.stat().st_size - (16 << 20)) // 2
    assert newer.uploaded_bytes < second.stat().st_size
    data = pulled(plain.reference("dedup/os", "2.0"))
    assert sha(data) == sha(second.read_bytes())
    with open_source(plain.reference("dedup/os", "2.0")) as stream:
        reader = ImageReader(stream, Keyring.from_files([signer.public]))
        assert reader.manifest.version == "2.0"
        for _payload, chunks in reader.payloads():
            for _ in chunks:
                pass


def test_check_follows_a_moving_tag(plain: RegistryServer, make_image: Callable[..., Path]) -> None:
    ref = plain.reference("channel/os", "stable")
    oci.push(make_image("1.0"), ref)
    assert oci.check(ref, None) == "1.0"
    with pytest.raises(NothingNewer):
        oci.check(ref, "1.0")
    old = oci.describe(ref)
    oci.push(make_image("2.0"), ref)
    assert oci.check(ref, "1.0") == "2.0"
    with pytest.raises(NothingNewer):
        oci.check(ref, "2.0")
    moved = oci.describe(ref)
    assert moved.digest != old.digest and moved.compatible == "test-box"
    pinned = f"oci://{plain.host}/channel/os@{old.digest}"
    assert oci.describe(pinned).version == "1.0"
    with pytest.raises(PolicyRefusal):
        oci.check(ref, "1.0", compatible="other-box")
    with pytest.raises(UsageError, match="has no missing"):
        oci.check(plain.reference("channel/os", "missing"), None)


def test_unreachable_registry_is_one_line(signer: KeyPair) -> None:
    proc = run_cli("image", "verify", "oci://127.0.0.1:9/os:1.0", "--pubkey", str(signer.public))
    assert proc.returncode == 1, proc.stderr
    assert "cannot reach registry 127.0.0.1:9" in proc.stderr


# ------------------------------------------------------------------ tampering and broken links


def test_tampered_blobs_are_rejected(tmp_path: Path, make_image: Callable[..., Path],
                                     signer: KeyPair) -> None:
    require_registry()
    image = make_image("1.0")
    with registry(tmp_path / "registry") as server:
        ref = server.reference("evil/os", "1.0")
        pushed = oci.push(image, ref)
        manifest = json.loads(server.storage.joinpath(
            "docker/registry/v2/blobs/sha256", pushed.digest[7:9], pushed.digest[7:], "data").read_bytes())
        rootfs = next(layer for layer in manifest["layers"] if layer["mediaType"] == PAYLOAD_TYPE)
        blob = server.blob_path(rootfs["digest"])
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        with pytest.raises(ImageRejected, match="does not match its digest"):
            pulled(ref)
        proc = run_cli("image", "verify", ref, "--pubkey", str(signer.public))
        assert proc.returncode == 3, proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2 and "digest" in proc.stderr

        head = server.blob_path(manifest["layers"][0]["digest"])
        head_data = bytearray(head.read_bytes())
        head_data[100] ^= 0x01
        head.write_bytes(bytes(head_data))
        with pytest.raises(ImageRejected), oci.open_image(ref) as stream:
            stream.read(1)  # not even the first byte of a bad head is handed out


def test_a_cut_connection_resumes_with_range(plain: RegistryServer,
                                             make_image: Callable[..., Path]) -> None:
    image = make_image("1.0")
    oci.push(image, plain.reference("cut/os", "1.0"))
    port = int(plain.host.rsplit(":", 1)[1])
    with CuttingProxy(port, after=3 << 20, cuts=2) as proxy:
        data = pulled(proxy_ref := f"oci://{proxy.host}/cut/os:1.0")
        assert proxy.cut == 2, "the proxy never cut a download"
    assert sha(data) == sha(image.read_bytes()), proxy_ref


# ------------------------------------------------------------------ apply from a registry


@pytest.mark.loop
def test_apply_from_registry(ab_disk: Path, plain: RegistryServer,
                             make_image: Callable[..., Path]) -> None:
    needs(loop=True)
    ref = plain.reference("fleet/os", "2.0")
    oci.push(make_image("2.0"), ref)
    proc = run_cli("--disk", str(ab_disk), "apply", ref)
    assert proc.returncode == 0, proc.stderr
    status = status_json("--disk", str(ab_disk))
    assert status["trial"] == "B"
    assert status["slots"]["B"]["version"] == "2.0"  # type: ignore[index]


@pytest.mark.loop
def test_push_check_apply_through_the_command_line(
        ab_disk: Path, plain: RegistryServer, make_image: Callable[..., Path], signer: KeyPair) -> None:
    """The fleet loop as a cron job runs it: push a release, poll the channel, apply it."""
    needs(loop=True)
    channel = plain.reference("cli/os", "stable")
    proc = run_cli("image", "push", str(make_image("2.0")), channel, "--pubkey", str(signer.public))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("--disk", str(ab_disk), "check", channel)
    assert (proc.returncode, proc.stdout.strip()) == (0, "2.0"), proc.stderr
    assert run_cli("--disk", str(ab_disk), "apply", channel).returncode == 0
    assert run_cli("--disk", str(ab_disk), "mark-bad", "B").returncode == 0
    # the committed version (1.0 in A) is what counts: 2.0 is still newer
    assert run_cli("--disk", str(ab_disk), "check", channel).returncode == 0
    proc = run_cli("image", "push", str(make_image("0.5")), channel)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("--disk", str(ab_disk), "check", channel)
    assert proc.returncode == 6 and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.loop
def test_apply_fails_cleanly_when_the_registry_cannot_resume(
        ab_disk: Path, plain: RegistryServer, make_image: Callable[..., Path]) -> None:
    needs(loop=True)
    oci.push(make_image("2.0"), plain.reference("norange/os", "2.0"))
    port = int(plain.host.rsplit(":", 1)[1])
    with CuttingProxy(port, after=3 << 20, strip_range=True) as proxy:
        proc = run_cli("--disk", str(ab_disk), "apply", f"oci://{proxy.host}/norange/os:2.0")
        assert proxy.cut == 1
    assert proc.returncode == 1, proc.stderr
    assert "cannot resume" in proc.stderr
    status = status_json("--disk", str(ab_disk))
    assert status["trial"] is None and status["next_boot"] == "A"
    assert status["slots"]["B"]["state"] in ("empty", "bad")  # type: ignore[index]
    history = json.loads(run_cli("--disk", str(ab_disk), "history", "--json").stdout)
    assert history[-1]["event"] == "install-failed"


# ------------------------------------------------------------------ auth and TLS


def test_basic_auth(tmp_path: Path, make_image: Callable[..., Path], signer: KeyPair) -> None:
    require_registry()
    image = make_image("1.0")
    with registry(tmp_path / "registry", users={"ci": "s3cret"}) as server:
        ref = server.reference("private/os", "1.0")
        elsewhere = auth_file(tmp_path / "elsewhere.json", "elsewhere:1", "x", "y")
        with pytest.raises(OperationalError, match="requires credentials"):
            oci.push(image, ref, settings=RegistryConfig(auth_file=elsewhere))
        good = RegistryConfig(auth_file=auth_file(tmp_path / "good.json", server.host, "ci", "s3cret"))
        oci.push(image, ref, settings=good)
        assert pulled(ref, good) == image.read_bytes()
        bad = RegistryConfig(auth_file=auth_file(tmp_path / "bad.json", server.host, "ci", "wrong"))
        with pytest.raises(OperationalError, match="refused the credentials of 'ci'"):
            oci.describe(ref, settings=bad)
        # through the command line: one line, the password nowhere
        env = {"REGISTRY_AUTH_FILE": str(tmp_path / "bad.json")}
        proc = cli("image", "verify", ref, "--pubkey", str(signer.public), env=env)
        assert proc.returncode == 1 and "refused the credentials" in proc.stderr
        assert "wrong" not in proc.stderr + proc.stdout
        env = {"REGISTRY_AUTH_FILE": str(tmp_path / "good.json")}
        proc = cli("image", "verify", ref, "--pubkey", str(signer.public), env=env)
        assert proc.returncode == 0, proc.stderr


def test_bearer_token_auth(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    require_registry()
    image = make_image("1.0")
    with TokenService(tmp_path / "token", {"robot": "t0ken"}) as tokens, \
            registry(tmp_path / "registry", token=tokens) as server:
        ref = server.reference("tokens/os", "1.0")
        good = RegistryConfig(auth_file=auth_file(tmp_path / "good.json", server.host, "robot", "t0ken"))
        oci.push(image, ref, settings=good)
        assert tokens.issued >= 1
        assert pulled(ref, good) == image.read_bytes()
        bad = RegistryConfig(auth_file=auth_file(tmp_path / "bad.json", server.host, "robot", "nope"))
        with pytest.raises(OperationalError, match="refused the credentials"):
            pulled(ref, bad)


def test_tls_with_a_ca_file(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    require_registry()
    image = make_image("1.0")
    ca = make_ca(tmp_path / "ca")
    with registry(tmp_path / "registry", tls=ca) as server:
        ref = server.reference("tls/os", "1.0")
        with pytest.raises(OperationalError, match="not trusted"):
            oci.push(image, ref)  # loopback may use plain HTTP, but never skips TLS checks
        trusted = RegistryConfig(ca_file=ca.ca)
        oci.push(image, ref, settings=trusted)
        assert pulled(ref, trusted) == image.read_bytes()


def test_registry_configuration() -> None:
    from abupgrade.config import parse

    base = {"compatible": "box", "bootloader": "grub",
            "slots": {"A": {"device": "/dev/a"}, "B": {"device": "/dev/b"}}}
    assert parse(base).registry == RegistryConfig()
    cfg = parse({**base, "registry": {"insecure": ["10.0.0.5:5000"], "ca_file": "/etc/ca.pem",
                                      "auth_file": "/etc/auth.json"}})
    assert cfg.registry == RegistryConfig(("10.0.0.5:5000",), Path("/etc/ca.pem"), Path("/etc/auth.json"))
    for bad in ({"insecure": "10.0.0.5"}, {"ca_file": "relative.pem"}, {"token": "x"}):
        with pytest.raises(UsageError):
            parse({**base, "registry": bad})
