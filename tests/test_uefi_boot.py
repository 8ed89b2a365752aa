"""GRUB on UEFI, booted by OVMF in QEMU: disks made by the real `abupgrade disk init
--firmware uefi [--secure-boot]`, updated from the host with `apply --disk`.

One disk goes through the whole story, each step starting where the last one ended
(OVMF costs 20-30 s a boot under TCG, so boots are few and busybox guests do where no
abupgrade is needed inside):

1. fresh disk, v1 (busybox) committed in A: boots A;                          1 boot
2. apply v2, a guest that reboots without committing: B, B (tries=2), then A;  3 boots
3. apply v3, whose init exits (kernel panic): B, B, then A;                    3 boots
4. apply v4, the Python guest: its boot hook commits B.                        1 boot

Secure Boot (OVMF with Microsoft's keys, enforced): a fresh `--secure-boot` disk through
shim and Debian's signed GRUB, whose built-in module set and lockdown differ from our own
GRUB; the Python guest's trial of B is counted (load_env, the decrement, save_env) and its
hook commits it.                                                                1 boot
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures import pyguest
from fixtures.guest import (
    QEMU,
    GuestUnavailable,
    Ovmf,
    build_busybox_rootfs,
    guest_lines,
    make_ext4_image,
    missing_tools,
    qemu_boot,
    require_root,
)
from fixtures.images import KeyPair, keypair, signed_image
from fixtures.machine import run_cli
from fixtures.pyguest import BootFiles, reports

pytestmark = [pytest.mark.boot, pytest.mark.loop]

COMPATIBLE = "test-box"
TRIES = 2
BUSYBOX_BOOT = 90  # seconds one OVMF boot of a busybox guest may take (about 20-35)
PYTHON_BOOT = 180  # ... of the Python guest
TOOLS = (QEMU, "debootstrap", "losetup", "partx", "sfdisk", "mkfs.ext4", "mkfs.fat", "mcopy",
         "grub-mkimage", "modprobe")
# The busybox guest of step 2: up, but nothing commits it; a watchdog would reboot it.
REBOOTS = "#!/bin/sh\necho \"ABUPGRADE-GUEST no-hook: rebooting\"\nsync\nreboot -f\n"


@dataclass(frozen=True)
class Images:
    key: KeyPair
    v1: Path  # busybox, powers off
    v2: Path  # busybox, reboots, never commits
    v3: Path  # busybox, init exits: kernel panic
    v4: Path  # the Python guest with the boot hook, healthy


def busybox_image(work: Path, key: KeyPair, boot: BootFiles, version: str, *,
                  broken: bool = False, script: str | None = None) -> Path:
    tree = build_busybox_rootfs(work / f"{version}.tree", slot_tag=version, broken=broken,
                                init_script=script)
    ext4 = make_ext4_image(work / f"{version}.ext4", tree, 32 << 20, "rootfs")
    return signed_image(work / f"{version}.tar", ext4, key, version=version,
                        compatible=COMPATIBLE, kernel=boot.kernel, initrd=boot.initrd,
                        compression="zstd")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    try:
        require_root()
        Ovmf.find()
    except GuestUnavailable as exc:
        pytest.skip(str(exc))
    missing = missing_tools(*TOOLS)
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (run scripts/setup)")
    work = tmp_path_factory.mktemp("uefi-images")
    try:
        key = keypair(work / "keys")
        boot = pyguest.boot_files(work / "boot-files")
        return Images(
            key,
            busybox_image(work, key, boot, "1.0"),
            busybox_image(work, key, boot, "2.0", script=REBOOTS),
            busybox_image(work, key, boot, "3.0", broken=True),
            pyguest.signed_guest_image(work / "4.0.tar", key, version="4.0",
                                       compatible=COMPATIBLE, boot=boot),
        )
    except GuestUnavailable as exc:
        pytest.skip(str(exc))


def cli(*args: str) -> Any:
    proc = run_cli("--json", *args)
    assert proc.returncode == 0, f"abupgrade {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def make_disk(disk: Path, images: Images, *extra: str) -> None:
    """`disk init --firmware uefi EXTRA --image v1`; [grub] tries=2, the guest's reboot."""
    cli("disk", "init", str(disk), "--bootloader", "grub", "--firmware", "uefi", *extra,
        "--size", "1G", "--slot-size", pyguest.SLOT_SIZE, "--image", str(images.v1),
        "--pubkey", str(images.key.public))
    pyguest.configure_disk(disk, tries=TRIES)


@dataclass
class Run:
    log: str
    seconds: float

    def grub(self) -> list[str]:
        """What grub.cfg echoed, in order."""
        return re.findall(r"abupgrade-grub: ([^\r\n\x1b]*)", self.log)

    def guests(self) -> list[str]:
        """`slot=X tag=V` of each busybox guest that came up, `broken tag=V` of each that
        panicked, `slot=X version=V` of the Python guest."""
        return [" ".join(w.rstrip(":") for w in line.split() if w.split("=")[0] in
                         ("slot", "tag", "version", "broken"))
                for line in guest_lines(self.log)
                if line.startswith(("slot=", "broken"))]

    def tail(self) -> str:
        return "serial log tail:\n" + "\n".join(self.log.splitlines()[-40:])


def boot(disk: Path, name: str, *, seconds: float, uefi: Ovmf, boots: int) -> Run:
    start = time.monotonic()
    text = qemu_boot(disk, disk.with_name(f"{disk.stem}-{name}.log"), timeout=seconds,
                     no_reboot=boots == 1, uefi=uefi)
    return Run(text, time.monotonic() - start)


class Story:
    """The one disk of steps 1-4, each step run once, in order, when a test asks for it."""

    def __init__(self, work: Path, images: Images) -> None:
        self.disk = work / "uefi.img"
        self.images = images
        self.uefi = Ovmf.find()
        self.runs: dict[int, Run] = {}

    def step(self, number: int) -> Run:
        if number not in self.runs:
            if number > 1:
                self.step(number - 1)
            self.runs[number] = self._run(number)
        return self.runs[number]

    def _run(self, number: int) -> Run:
        if number == 1:
            make_disk(self.disk, self.images)
            status = cli("--disk", str(self.disk), "status")
            assert status["firmware"] == "uefi" and status["next_boot"] == "A", status
            return boot(self.disk, "v1", seconds=BUSYBOX_BOOT, uefi=self.uefi, boots=1)
        image = {2: self.images.v2, 3: self.images.v3, 4: self.images.v4}[number]
        applied = cli("--disk", str(self.disk), "apply", str(image))
        assert applied["slot"] == "B" and applied["tries"] == TRIES, applied
        if number == 4:
            return boot(self.disk, "v4", seconds=PYTHON_BOOT, uefi=self.uefi, boots=1)
        return boot(self.disk, f"v{number}", seconds=(TRIES + 1) * BUSYBOX_BOOT,
                    uefi=self.uefi, boots=TRIES + 1)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Story:
    return Story(tmp_path_factory.mktemp("uefi-story"), images)


def test_fresh_disk_boots_v1_in_slot_a(story: Story) -> None:
    run = story.step(1)
    assert run.guests() == ["slot=A tag=1.0"], run.tail()
    assert [line.split(" block=")[0] for line in run.grub()] == ["boot slot=A fallback="], \
        run.tail()
    assert "Secure boot disabled" in run.log, run.tail()


def test_a_trial_nothing_commits_gets_exactly_n_boots(story: Story) -> None:
    run = story.step(2)
    assert run.guests() == ["slot=B tag=2.0", "slot=B tag=2.0", "slot=A tag=1.0"], run.tail()
    tries = [line for line in run.grub() if line.startswith("try ")]
    assert tries == ["try slot=B left=1", "try slot=B left=0"], run.tail()
    status = cli("--disk", str(story.disk), "status")
    assert status["next_boot"] == "A" and status["trial"] is None, status
    assert status["slots"]["A"]["version"] == "1.0", status


def test_a_panicking_trial_falls_back_after_n(story: Story) -> None:
    run = story.step(3)
    assert run.guests() == ["broken tag=3.0", "broken tag=3.0", "slot=A tag=1.0"], run.tail()
    assert run.log.count("Kernel panic") >= TRIES, run.tail()
    assert cli("--disk", str(story.disk), "status")["next_boot"] == "A"


def test_the_boot_hook_commits_a_healthy_trial(story: Story) -> None:
    run = story.step(4)
    booted = reports(run.log)
    assert [(b.slot, b.version) for b in booted] == [("B", "4.0")], run.tail()
    guest = booted[0]
    assert guest.last_boot == "committed", run.tail()
    assert guest.status is not None and guest.status["firmware"] == "uefi", guest.status
    assert guest.status["booted"] == "B" and guest.status["trial"] is None, guest.status
    status = cli("--disk", str(story.disk), "status")
    assert status["next_boot"] == "B" and status["slots"]["B"]["state"] == "good", status
    committed = [e for e in cli("--disk", str(story.disk), "history")
                 if e["event"] == "committed"]
    assert committed and committed[-1]["slot"] == "B" and committed[-1]["version"] == "4.0"


def test_secure_boot_counts_and_commits_a_trial_through_signed_grub(
        tmp_path: Path, images: Images) -> None:
    try:
        uefi = Ovmf.find(secure_boot=True)
    except GuestUnavailable as exc:
        pytest.skip(str(exc))
    disk = tmp_path / "sb.img"
    make_disk(disk, images, "--secure-boot")
    assert cli("--disk", str(disk), "apply", str(images.v4))["slot"] == "B"
    run = boot(disk, "sb", seconds=PYTHON_BOOT, uefi=uefi, boots=1)
    assert "Secure boot enabled" in run.log, run.tail()  # the kernel says so
    assert [line.split(" block=")[0] for line in run.grub()] == \
        ["try slot=B left=1", "boot slot=B fallback=A"], run.tail()
    booted = reports(run.log)
    assert [(b.slot, b.version, b.last_boot) for b in booted] == [("B", "4.0", "committed")], \
        run.tail()
    status = cli("--disk", str(disk), "status")
    assert status["next_boot"] == "B" and status["trial"] is None, status
