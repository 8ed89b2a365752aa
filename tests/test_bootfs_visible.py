"""What abupgrade changes on the boot filesystem is there for the bootloader at once.

GRUB, syslinux and U-Boot read ext4 without replaying its journal. On a machine running from
its disk (a loop-mounted disk made by `disk init`), `apply` and the boot hook's commit run as
the real command; right after each, the disk image is copied as it is - a power cut at that
instant - and read the way the bootloader reads it: GRUB itself (grub-emu) boots the copy;
syslinux's files, and U-Boot's on its ext4 boot partition, are read by debugfs, which
replays no journal. Before the boot files and extlinux.conf were checkpointed, the copy
showed the old directory for tens of seconds: GRUB did not find the trial's kernel, syslinux
kept the old DEFAULT."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from abupgrade import mounts
from abupgrade.bootloader import BootloaderKind, base
from abupgrade.bootloader.uboot import UBootConfig
from abupgrade.bootloader.ubootenv import parse_locations
from abupgrade.model import Slot
from abupgrade.system import bootloader_of
from fixtures.bootview import BOOT_FILES, boot_fs_offset, syslinux_view
from fixtures.grubemu import GrubEmu, read_files, sha256
from fixtures.machine import Machine, running_machine
from fixtures.uboot_model import decide

pytestmark = pytest.mark.loop


def cut_now(disk: Path, out: Path) -> Path:
    """The disk as it is on the device right now: what a power cut would leave."""
    subprocess.run(["cp", "--sparse=always", str(disk), str(out)], check=True)
    return out


def boot_file(machine: Machine, slot: Slot, name: str) -> Path:
    """Where the backend keeps `slot`'s boot file `name` ("vmlinuz", "initrd.img") on the
    mounted disk."""
    key = {file: key for key, file in base.BOOT_FILES.items()}[name]
    return bootloader_of(machine.config).boot_file_path(slot, key)


def linux_sees(machine: Machine, slot: Slot, name: str) -> bytes:
    return boot_file(machine, slot, name).read_bytes()


def bootloader_boots(machine: Machine, image: Path, work: Path,
                     emu: GrubEmu) -> tuple[Slot | None, dict[str, str | None], str]:
    """(slot, {"vmlinuz": sha256, "initrd.img": sha256} as loaded, why) at power-on."""
    kind = machine.config.bootloader
    if kind is BootloaderKind.GRUB:
        run = emu.run_disk(image)
        entry = run.booted
        if entry is None:
            return None, {}, run.output
        names = {x.command: x.sha256 for x in entry.loads}
        return entry.slot, {"vmlinuz": names.get("linux"), "initrd.img": names.get("initrd")}, \
            run.output
    if kind is BootloaderKind.SYSLINUX:
        view = syslinux_view(image, work)
        slot = view.snapshot.state().next_boot
        files = {n: view.boot_file(slot, n) for n in BOOT_FILES}
        return slot, {n: sha256(d) if d is not None else None for n, d in files.items()}, \
            str(view.snapshot)
    # U-Boot: boot.scr's decision on the environment copies in the disk's gap, the boot
    # files read from the ext4 boot partition's home blocks (U-Boot replays no journal)
    settings = machine.config.section(UBootConfig)
    held = mounts.holding(boot_file(machine, Slot.A, "vmlinuz"))
    assert held is not None
    paths = {(s, n): str(boot_file(machine, s, n).relative_to(held.point))
             for s in Slot for n in BOOT_FILES}
    found = read_files(image, boot_fs_offset(image), tuple(paths.values()), work)
    with image.open("rb") as f:
        raw = [os.pread(f.fileno(), loc.size, loc.offset)
               for loc in parse_locations(settings.env)]
    decision, _ = decide(raw, lambda s: paths[s, "vmlinuz"] in found)
    if decision.boot is None:
        return None, {}, str(decision)
    return decision.boot, {n: sha256(found[paths[decision.boot, n]])
                           if paths[decision.boot, n] in found else None
                           for n in BOOT_FILES}, str(decision)


# systemd-boot keeps what it reads on FAT, which has no journal: a change there is on the
# device when its write returns (tests/test_sdboot_powercut.py cuts those writes).
JOURNALED = [k for k in BootloaderKind if k is not BootloaderKind.SYSTEMD_BOOT]


@pytest.mark.parametrize("kind", JOURNALED, ids=str)
def test_apply_and_commit_reach_the_bootloader_before_the_command_returns(
        kind: BootloaderKind, tmp_path: Path, emu: GrubEmu,
        disk_template: Callable[[BootloaderKind], Path],
        make_image: Callable[..., Path]) -> None:
    if kind is BootloaderKind.GRUB and shutil.which("grub-fstest") is None:
        pytest.skip("grub-fstest is missing (apt-get install grub-common)")
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(disk_template(kind)), str(disk)], check=True)
    with running_machine(disk, tmp_path / "m", booted=Slot.A) as machine:
        applied = machine.cli("apply", str(make_image("2.0")))
        assert applied.returncode == 0, applied.stderr
        want = {n: sha256(linux_sees(machine, Slot.B, n)) for n in BOOT_FILES}
        slot, loaded, why = bootloader_boots(machine, cut_now(disk, tmp_path / "cut1.img"),
                                             tmp_path, emu)
        assert slot is Slot.B, f"the trial is not there for the bootloader: {why}"
        assert loaded == want, f"the bootloader loads other boot files than Linux wrote: {why}"

        machine.boot(Slot.B)
        hook = machine.cli("boot-hook", "--no-reboot")
        assert hook.returncode == 0, hook.stderr
        slot, loaded, why = bootloader_boots(machine, cut_now(disk, tmp_path / "cut2.img"),
                                             tmp_path, emu)
        assert slot is Slot.B, f"the commit is not there for the bootloader: {why}"
        assert loaded == want, why
