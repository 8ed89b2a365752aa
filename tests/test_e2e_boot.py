"""The whole story in QEMU, for every bootloader (U-Boot: its x86 build, which boots the same
x86 guest): a disk made by the real `abupgrade disk init`,
updated from the host with `abupgrade --disk ... apply`, booted with a Debian guest that runs
the real abupgrade (Python 3.11) through the shipped busybox init integration. What happened
is read twice: from the guest's serial console and from the disk afterwards (`--disk`).

Boots per bootloader: v1 on A (shared), update (shared with the manual rollback), failing
check (2 boots), kernel panic (GRUB, U-Boot: tries + 1 boots, syslinux: 2), manual rollback."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from abupgrade.bootloader import BootloaderKind, backend_class
from abupgrade.bootloader.base import Firmware
from fixtures import pyguest
from fixtures.guest import QEMU, qemu_boot
from fixtures.images import KeyPair, keypair
from fixtures.machine import run_cli
from fixtures.pyguest import BootReport, reports
from fixtures.tiers import guest_skips, needs
from fixtures.uboot import boot as uboot_boot

pytestmark = [pytest.mark.boot, pytest.mark.loop]

COMPATIBLE = "test-box"
TRIES = 3  # the default [grub] tries, as `disk init` writes it: a panicking trial costs 3 boots
ONE_BOOT = 150  # seconds QEMU may take for one boot of the Python guest under TCG
TOOLS = (QEMU, "debootstrap", "losetup", "partx", "sfdisk", "mkfs.ext4", "mount", "extlinux",
         "grub-mkimage", "modprobe")


@dataclass(frozen=True)
class Images:
    key: KeyPair
    v1: Path  # healthy
    v2: Path  # healthy
    failing: Path  # 3.0: its required check fails
    panic: Path  # 4.0: init exits, the kernel panics


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The signed guest images, built once (the base tree is cached across sessions)."""
    needs(root=True, tools=TOOLS)
    work = tmp_path_factory.mktemp("guest-images")
    with guest_skips():
        key = keypair(work / "keys")
        boot = pyguest.boot_files(work / "boot-files")
        wheel = pyguest.build_wheel(work / "wheel")

        def image(version: str, variant: str) -> Path:
            return pyguest.signed_guest_image(work / f"{version}.tar", key, version=version,
                                              variant=variant, compatible=COMPATIBLE,
                                              wheel=wheel, boot=boot)

        return Images(key, image("1.0", "healthy"), image("2.0", "healthy"),
                      image("3.0", "failing-check"), image("4.0", "panic"))


def cli(*args: str) -> Any:
    """`abupgrade ARGS --json` on the host; its parsed output (it must succeed)."""
    proc = run_cli("--json", *args)
    assert proc.returncode == 0, f"abupgrade {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


@dataclass
class Run:
    log: str
    boots: list[BootReport]

    def tail(self) -> str:
        return "serial log tail:\n" + "\n".join(self.log.splitlines()[-40:])


def boot(disk: Path, name: str, *, boots: int, kind: BootloaderKind) -> Run:
    """Run QEMU on `disk` until the guest powers off (`boots` boots, reboots included)."""
    log = disk.with_name(f"{disk.stem}-{name}.log")
    if kind is BootloaderKind.UBOOT:  # U-Boot's x86 build instead of SeaBIOS
        text = uboot_boot(disk, log, arch="amd64", timeout=ONE_BOOT * boots,
                          no_reboot=boots == 1)
    else:
        text = qemu_boot(disk, log, timeout=ONE_BOOT * boots, no_reboot=boots == 1)
    return Run(text, reports(text))


def events(history: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in history if e["event"] == name]


class Stages:
    """Disks at a stage of the story, built once per module and handed out as copies:
    "v1"      `disk init --image v1`, booted once on slot A;
    "updated" v1, then `apply --disk v2` and one boot that committed slot B."""

    def __init__(self, base: Path, images: Images) -> None:
        self.base = base
        self.images = images
        self.made: dict[tuple[BootloaderKind, str], Path] = {}
        self.runs: dict[tuple[BootloaderKind, str], Run] = {}
        self.copies = 0

    def stage(self, kind: BootloaderKind, name: str) -> Path:
        if (kind, name) in self.made:
            return self.made[kind, name]
        disk = self.base / f"{kind}-{name}.img"
        if name == "v1":
            cli("disk", "init", str(disk), "--bootloader", str(kind), "--size", "1G",
                "--slot-size", pyguest.SLOT_SIZE, "--image", str(self.images.v1),
                "--pubkey", str(self.images.key.public))
            pyguest.configure_disk(disk, tries=TRIES)
            run = boot(disk, "first", kind=kind, boots=1)
            assert [(b.slot, b.version) for b in run.boots] == [("A", "1.0")], run.tail()
            assert run.boots[0].status is not None, run.tail()
            assert run.boots[0].status["booted"] == "A", run.tail()
        else:
            shutil.copyfile(self.stage(kind, "v1"), disk)
            applied = cli("--disk", str(disk), "apply", str(self.images.v2))
            assert applied["slot"] == "B"
            status = cli("--disk", str(disk), "status")
            assert status["trial"] == "B" and status["next_boot"] == "B", status
            run = boot(disk, "update", kind=kind, boots=1)
        self.made[kind, name] = disk
        self.runs[kind, name] = run
        return disk

    def copy(self, kind: BootloaderKind, name: str) -> Path:
        """A fresh copy of the disk at stage `name`, for a test to change."""
        source = self.stage(kind, name)
        self.copies += 1
        out = self.base / f"{kind}-{name}-{self.copies}.img"
        subprocess.run(["cp", "--sparse=always", str(source), str(out)], check=True)
        return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Stages:
    return Stages(tmp_path_factory.mktemp("e2e-disks"), images)


# The bootloaders this story boots with BIOS firmware (systemd-boot is UEFI only:
# tests/test_sdboot_boot.py).
BIOS_KINDS = [k for k in BootloaderKind
              if any(p.firmware is Firmware.BIOS for p in backend_class(k).platforms)]
KINDS = pytest.mark.parametrize("kind", BIOS_KINDS, ids=str)
# U-Boot's rollback on a failing check, its fallback after a panic and its manual rollback
# are booted in tests/test_uboot_boot.py (arm64); here U-Boot's x86 build boots the update
# whose boot hook commits inside the guest. About 3 minutes of TCG saved.
WITHOUT_UBOOT = pytest.mark.parametrize(
    "kind", [k for k in BIOS_KINDS if k is not BootloaderKind.UBOOT], ids=str)


@KINDS
def test_update_boots_as_trial_and_commits(kind: BootloaderKind,
                                           stages: Stages) -> None:
    disk = stages.copy(kind, "updated")
    run = stages.runs[kind, "updated"]
    assert [(b.slot, b.version) for b in run.boots] == [("B", "2.0")], run.tail()
    guest = run.boots[0]
    assert guest.last_boot == "committed", run.tail()
    assert guest.status is not None and guest.status["booted"] == "B", run.tail()
    assert guest.status["trial"] is None and guest.status["next_boot"] == "B", run.tail()
    committed = events(guest.history, "committed")
    assert committed and committed[-1]["slot"] == "B" and committed[-1]["version"] == "2.0"
    assert "healthy" in committed[-1]["detail"], committed[-1]

    status = cli("--disk", str(disk), "status")
    assert status["next_boot"] == "B" and status["trial"] is None
    assert status["slots"]["B"] == {**status["slots"]["B"], "state": "good", "version": "2.0"}
    assert status["slots"]["A"]["state"] == "good"
    history = cli("--disk", str(disk), "history")
    committed = events(history, "committed")
    assert committed and committed[-1]["slot"] == "B" and committed[-1]["version"] == "2.0"
    assert events(history, "trial-armed")[-1]["version"] == "2.0", history


@WITHOUT_UBOOT
def test_failing_required_check_rolls_back(kind: BootloaderKind, images: Images,
                                           stages: Stages) -> None:
    disk = stages.copy(kind, "v1")
    cli("--disk", str(disk), "apply", str(images.failing))
    run = boot(disk, "failing", kind=kind, boots=2)
    assert [(b.slot, b.version) for b in run.boots] == [("B", "3.0"), ("A", "1.0")], run.tail()
    assert pyguest.FAILING_CHECK_MESSAGE in run.log, run.tail()  # the hook's check output
    back = run.boots[1]
    assert back.last_boot == "committed-boot", run.tail()
    assert back.status is not None and back.status["booted"] == "A", run.tail()
    assert back.status["slots"]["B"]["state"] == "bad", back.status
    for history in (back.history, cli("--disk", str(disk), "history")):
        rolled = events(history, "rolled-back")
        assert rolled and rolled[-1]["slot"] == "B" and rolled[-1]["version"] == "3.0", history
        assert "10-app" in rolled[-1]["detail"], rolled[-1]
        assert pyguest.FAILING_CHECK_MESSAGE in rolled[-1]["detail"], rolled[-1]
    assert cli("--disk", str(disk), "status")["next_boot"] == "A"


@WITHOUT_UBOOT
def test_kernel_panic_falls_back(kind: BootloaderKind, images: Images,
                                 stages: Stages) -> None:
    disk = stages.copy(kind, "v1")
    applied = cli("--disk", str(disk), "apply", str(images.panic))
    tries = 1 if kind is BootloaderKind.SYSLINUX else TRIES
    assert applied["tries"] == tries
    run = boot(disk, "panic", kind=kind, boots=tries + 1)
    panics = [line for line in run.log.splitlines() if "ABUPGRADE-GUEST broken tag=4.0" in line]
    assert len(panics) == tries, run.tail()
    assert run.log.count("Kernel panic") >= tries, run.tail()
    assert [b.slot for b in run.boots] == [None] * tries + ["A"], run.tail()
    back = run.boots[-1]
    assert back.version == "1.0" and back.last_boot == "fallback", run.tail()
    assert back.status is not None and back.status["slots"]["B"]["state"] == "bad", back.status
    for history in (back.history, cli("--disk", str(disk), "history")):
        fallback = events(history, "fallback")
        assert fallback and fallback[-1]["slot"] == "B" and fallback[-1]["version"] == "4.0"
        assert "never reached the boot hook" in fallback[-1]["detail"], fallback[-1]


@WITHOUT_UBOOT
def test_manual_rollback_boots_previous_slot(kind: BootloaderKind,
                                             stages: Stages) -> None:
    disk = stages.copy(kind, "updated")
    assert cli("--disk", str(disk), "rollback")["slot"] == "A"
    assert cli("--disk", str(disk), "status")["next_boot"] == "A"
    run = boot(disk, "rollback", kind=kind, boots=1)
    assert [(b.slot, b.version) for b in run.boots] == [("A", "1.0")], run.tail()
    guest = run.boots[0]
    assert guest.last_boot == "committed-boot", run.tail()
    assert guest.status is not None and guest.status["booted"] == "A", run.tail()
    assert guest.status["next_boot"] == "A", guest.status
    manual = events(guest.history, "manual-rollback")
    assert manual and manual[-1]["slot"] == "A" and "from slot B" in manual[-1]["detail"]
