"""Test tiers: unit (default), `loop` (root + loop devices), `boot` (QEMU).

Where the machine has what a tier needs (scripts/test sets ABUPGRADE_REQUIRE_ALL_TIERS when run
as root, and CI runs it so), a `loop` or `boot` test that skips fails instead: CI never passes
a tier silently.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from abupgrade.bootloader import BootloaderKind
from fixtures.grubemu import EmuUnavailable, GrubEmu
from fixtures.images import KeyPair, keypair, rootfs_image, signed_image
from fixtures.machine import run_cli
from fixtures.tiers import EVERY_TIER, needs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (
        report.skipped
        and os.environ.get(EVERY_TIER) == "1"
        and (item.get_closest_marker("loop") or item.get_closest_marker("boot"))
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every tier must run: {reason}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """QEMU boots first, the modules with the most boots before the others, in file order
    otherwise: with the tiers in several processes (scripts/test), the long boot modules
    start at once and the short ones fill in after."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    boots = Counter(module(item) for item in items if item.get_closest_marker("boot"))
    items.sort(key=lambda item: (item.get_closest_marker("boot") is None, -boots[module(item)]))


# ------------------------------------------------------------------ shared loop-tier fixtures



COMPATIBLE = "test-box"


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrubEmu]:
    """GRUB itself (grub-emu, fixtures/grubemu.py); skipped with the reason where it is missing."""
    try:
        yield GrubEmu(tmp_path_factory.mktemp("emu"))
    except EmuUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def signer(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def make_image(tmp_path_factory: pytest.TempPathFactory, signer: KeyPair) -> Callable[..., Path]:
    """make_image(version, **options) -> a signed image with a small rootfs, kernel and initrd
    (stand-ins: the loop tier never boots them; the kernel has the PE header of an EFI
    executable, which systemd-boot disks check for), cached by its arguments."""
    base = tmp_path_factory.mktemp("images")
    kernel = base / "vmlinuz"
    pe_header = b"MZ" + bytes(0x3A) + (0x40).to_bytes(4, "little") + b"PE\0\0"
    kernel.write_bytes(pe_header + b"not a real kernel\n" * 1000)
    initrd = base / "initrd.img"
    initrd.write_bytes(b"not a real initrd\n" * 500)
    made: dict[tuple[object, ...], Path] = {}

    def make(version: str, *, compatible: str = COMPATIBLE, size: int = 16 << 20,
             compression: str = "none", key: KeyPair | None = None) -> Path:
        args = (version, compatible, size, compression, key)
        if args not in made:
            name = f"{version}-{compatible}-{size}-{compression}-{len(made)}"
            rootfs = rootfs_image(base / f"{name}.ext4", tag=version, size=size)
            made[args] = signed_image(base / f"{name}.tar", rootfs, key or signer,
                                      version=version, compatible=compatible, kernel=kernel,
                                      initrd=initrd, compression=compression)
        return made[args]

    return make


@pytest.fixture(scope="session")
def disk_template(tmp_path_factory: pytest.TempPathFactory, signer: KeyPair,
                  make_image: Callable[..., Path]) -> Callable[[BootloaderKind], Path]:
    """An A/B disk per bootloader made by `disk init --image` (version 1.0 committed in A)."""
    made: dict[BootloaderKind, Path] = {}

    def template(kind: BootloaderKind) -> Path:
        needs(loop=True)
        if kind not in made:
            disk = tmp_path_factory.mktemp(f"template-{kind}") / "disk.img"
            proc = run_cli("disk", "init", str(disk), "--bootloader", str(kind),
                             "--size", "768M", "--slot-size", "64M",
                             "--image", str(make_image("1.0")), "--pubkey", str(signer.public))
            assert proc.returncode == 0, proc.stderr
            made[kind] = disk
        return made[kind]

    return template


@pytest.fixture(params=list(BootloaderKind), ids=str)
def ab_disk(request: pytest.FixtureRequest, tmp_path: Path,
            disk_template: Callable[[BootloaderKind], Path]) -> Path:
    """A fresh copy of the template disk, for each bootloader."""
    disk = tmp_path / f"{request.param}.img"
    subprocess.run(["cp", "--sparse=always", str(disk_template(request.param)), str(disk)],
                   check=True)
    return disk
