"""Delta updates through `apply` on loop disks: over oci:// and https://, with a target slot
changed behind abupgrade's back, a block cache that is corrupt or lies, and the fallback to
the whole image. Every run must leave the target slot byte for byte equal to the image."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from abupgrade import oci
from abupgrade.delta.blocks import BlockCache, SlotBlocks
from abupgrade.delta.index import block_digests
from abupgrade.model import Slot
from abupgrade.partitions import read_table
from fixtures.files import FileServer, serve
from fixtures.images import KeyPair, keypair, release_image, signed_image
from fixtures.machine import Machine, run_cli, running_machine
from fixtures.registry import CuttingProxy, TestCA, available, make_ca, registry
from fixtures.tiers import needs, needs_registry

pytestmark = pytest.mark.loop

SIZE = 24 << 20
COMPATIBLE = "test-box"


@dataclass(frozen=True)
class Releases:
    key: KeyPair
    v1: Path  # signed images
    v2: Path
    v2_rootfs: bytes  # what slot B must hold after an update to v2


def _tree(root: Path, rng: random.Random, files: int) -> None:
    for n in range(files):
        folder = root / f"usr/lib/pkg{n % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"lib{n}.so").write_bytes(rng.randbytes(rng.randrange(2000, 300_000)))


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    """v1, and v2 = v1 with a few files changed, one grown, one gone and a directory added."""
    needs(root=True, tools=["mkfs.ext4"])
    work = tmp_path_factory.mktemp("releases")
    rng = random.Random(15)
    tree = work / "tree"
    _tree(tree, rng, 60)
    key = keypair(work / "keys")
    v1 = signed_image(work / "v1.tar", release_image(work / "v1.ext4", tree, SIZE), key,
                      version="1.0", compatible=COMPATIBLE, compression="zstd")
    (tree / "usr/lib/pkg3/lib3.so").write_bytes(rng.randbytes(150_000))
    with (tree / "usr/lib/pkg5/lib5.so").open("ab") as f:
        f.write(rng.randbytes(50_000))
    (tree / "usr/lib/pkg1/lib8.so").unlink()
    _tree(tree / "opt/new", rng, 3)
    rootfs = release_image(work / "v2.ext4", tree, SIZE)
    v2 = signed_image(work / "v2.tar", rootfs, key, version="2.0", compatible=COMPATIBLE,
                      compression="zstd")
    return Releases(key, v1, v2, rootfs.read_bytes())


@contextlib.contextmanager
def new_machine(folder: Path, releases: Releases) -> Iterator[Machine]:
    """A disk with v1 committed in slot A, running from A; slot B never written."""
    needs(loop=True)
    folder.mkdir(parents=True, exist_ok=True)
    disk = folder / "disk.img"
    proc = run_cli("disk", "init", str(disk), "--bootloader", "grub", "--size", "512M",
                   "--slot-size", "32M", "--image", str(releases.v1),
                   "--pubkey", str(releases.key.public))
    assert proc.returncode == 0, proc.stderr
    with running_machine(disk, folder / "machine", booted=Slot.A) as running:
        yield running


@pytest.fixture
def machine(tmp_path: Path, releases: Releases) -> Iterator[Machine]:
    with new_machine(tmp_path / "first", releases) as running:
        yield running


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def https_image(releases: Releases, tmp_path: Path, tls: TestCA,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FileServer]]:
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(releases.v2, served / "v2.tar")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))  # the CLI trusts the test CA
    with serve(served, tls=tls) as server:
        yield f"{server.url}/v2.tar", server


@pytest.fixture(scope="module")
def oci_image(tmp_path_factory: pytest.TempPathFactory, releases: Releases) -> Iterator[str]:
    needs_registry(available())
    with registry(tmp_path_factory.mktemp("registry")) as server:
        reference = server.reference("delta/os", "2.0")
        oci.push(releases.v2, reference)
        yield reference


def apply(machine: Machine, spec: str) -> dict[str, Any]:
    proc = machine.cli("apply", "--json", spec)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def oci_first(tmp_path_factory: pytest.TempPathFactory, releases: Releases,
              oci_image: str) -> Iterator[tuple[Machine, dict[str, Any]]]:
    """A machine right after its first delta over oci:// (v1 in slot A, slot B never
    written before), and what `apply --json` said: the figure a delta from scratch costs."""
    with new_machine(tmp_path_factory.mktemp("oci-first"), releases) as running:
        yield running, apply(running, oci_image)


def slot_b(machine: Machine, length: int) -> bytes:
    """What slot B holds, read from the disk image file behind the loop device (what a machine
    booting that disk reads), not through the partition device the command wrote."""
    table = read_table(machine.disk)
    assert table is not None
    part = next(p for p in table.partitions if p.name == "rootfs_b")
    with machine.disk.open("rb") as f:
        f.seek(part.start)
        return f.read(length)


def end_trial(machine: Machine) -> None:
    assert machine.cli("mark-bad", "B").returncode == 0


@pytest.mark.parametrize("source", ["oci", "https"])
def test_delta_apply_lands_the_exact_slot_and_fetches_little(
        releases: Releases, source: str, request: pytest.FixtureRequest) -> None:
    machine: Machine
    if source == "oci":
        spec = request.getfixturevalue("oci_image")
        machine, result = request.getfixturevalue("oci_first")
    else:
        spec, _server = request.getfixturevalue("https_image")
        machine = request.getfixturevalue("machine")
        result = apply(machine, spec)
    assert result["update"] == "delta"
    assert slot_b(machine, len(releases.v2_rootfs)) == releases.v2_rootfs
    image_bytes = releases.v2.stat().st_size
    assert 0 < result["bytes_downloaded"] < image_bytes // 3
    assert result["bytes_copied_from_active"] > SIZE // 4  # most of v2 was in slot A
    history = json.loads(machine.cli("history", "--json").stdout)
    assert [e["event"] for e in history[-2:]] == ["installed", "trial-armed"]

    # again, over a slot B that holds v2 but was changed behind abupgrade's back
    end_trial(machine)
    with machine.device(Slot.B).open("r+b") as f:
        for at in (1 << 20, 9 << 20, 17 << 20):
            f.seek(at)
            f.write(os.urandom(40_000))
        f.flush()
        os.fsync(f.fileno())
    again = apply(machine, spec)
    assert again["update"] == "delta"
    assert slot_b(machine, len(releases.v2_rootfs)) == releases.v2_rootfs
    assert again["bytes_reused_from_target"] > SIZE // 2  # what was not changed stayed
    assert again["bytes_written"] < 1 << 20  # only what was changed behind its back
    assert again["bytes_downloaded"] < result["bytes_downloaded"]


def _cache(machine: Machine) -> tuple[BlockCache, str]:
    """The block cache of the machine and the sha256 of the image slot A holds."""
    state = json.loads((machine.config.state_dir / "state.json").read_text())
    return BlockCache(machine.config.state_dir / "blocks"), state["slots"]["A"]["sha256"]


def test_a_corrupt_block_cache_is_rebuilt(machine: Machine, releases: Releases,
                                          oci_image: str) -> None:
    first = apply(machine, oci_image)  # builds slot A's cache (read once)
    end_trial(machine)
    cache, sha_a = _cache(machine)
    path = cache.folder / f"{sha_a}.blocks"
    assert path.exists() and first["update"] == "delta"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(raw)
    result = apply(machine, oci_image)
    assert result["update"] == "delta"
    assert slot_b(machine, len(releases.v2_rootfs)) == releases.v2_rootfs
    assert cache.load(sha_a) is not None  # read from the slot again and kept


def test_a_block_cache_that_lies_falls_back_to_the_whole_image(
        machine: Machine, releases: Releases, oci_image: str) -> None:
    cache, sha_a = _cache(machine)
    # says slot A holds v2 (with a good checksum): every chunk is planned from slot A
    cache.save(sha_a, SlotBlocks(len(releases.v2_rootfs),
                                 b"".join(block_digests(releases.v2_rootfs))))
    result = apply(machine, oci_image)
    assert result["update"].startswith("full: more than"), result["update"]
    assert slot_b(machine, len(releases.v2_rootfs)) == releases.v2_rootfs
    events = [e["event"] for e in json.loads(machine.cli("history", "--json").stdout)]
    assert events[-3:] == ["delta-fallback", "installed", "trial-armed"]
    assert cache.load(sha_a) is None  # forgotten: the next delta reads slot A again
    end_trial(machine)
    assert apply(machine, oci_image)["update"] == "delta"


def test_a_server_without_range_requests_gets_the_whole_image(
        machine: Machine, releases: Releases, tmp_path: Path) -> None:
    served = tmp_path / "plain"
    served.mkdir()
    shutil.copy(releases.v2, served / "v2.tar")
    with serve(served, ranges=False) as server:
        result = apply(machine, f"{server.url}/v2.tar")
    assert result["update"].startswith("full: ")
    assert result["bytes_downloaded"] >= releases.v2.stat().st_size
    assert slot_b(machine, len(releases.v2_rootfs)) == releases.v2_rootfs


def test_bytes_the_update_does_not_need_are_not_read(machine: Machine, releases: Releases,
                                                     tmp_path: Path) -> None:
    """A delta reads only the chunks it lacks: damage elsewhere in the image file changes
    nothing, because what lands in the slot is checked against the signed manifest."""
    import tarfile

    with tarfile.open(releases.v2) as archive:
        at = archive.getmember("rootfs").offset_data + archive.getmember("rootfs").size - 1
    damaged = tmp_path / "damaged.tar"
    data = bytearray(releases.v2.read_bytes())
    data[at] ^= 0xFF  # the last stored byte: the end of the empty space, zeros in slot A too
    damaged.write_bytes(data)
    proc = machine.cli("apply", str(damaged))  # what people read says what it cost
    assert proc.returncode == 0, proc.stderr
    assert "\ndelta: 0.0 MiB downloaded, " in proc.stdout, proc.stdout  # a local file
    assert "copied from the running slot" in proc.stdout
    assert slot_b(machine, len(releases.v2_rootfs)) == releases.v2_rootfs


def test_an_apply_that_failed_halfway_is_finished_by_the_next(
        machine: Machine, releases: Releases, oci_image: str,
        oci_first: tuple[Machine, dict[str, Any]]) -> None:
    """Connections that keep breaking end the first apply (nothing armed); the next one finds
    what the first wrote in slot B and fetches only the rest."""
    whole = oci_first[1]["bytes_downloaded"]  # a delta from the same start
    host, _, path = oci_image.removeprefix("oci://").partition("/")
    # the registry answers, then a connection breaks after 400 KB and the server is gone
    with CuttingProxy(int(host.rsplit(":", 1)[1]), after=400_000, then_refuse=True) as proxy:
        proc = machine.cli("apply", f"oci://{proxy.host}/{path}")
    assert proc.returncode == 1 and "broke" in proc.stderr, proc.stderr
    assert json.loads(machine.cli("status", "--json").stdout)["trial"] is None
    again = apply(machine, oci_image)
    assert again["update"] == "delta"
    assert slot_b(machine, len(releases.v2_rootfs)) == releases.v2_rootfs
    assert again["bytes_downloaded"] < whole
