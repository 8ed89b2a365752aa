"""Real GRUB 2.06 (grub-pc-bin, unpatched) booting real kernels in QEMU: the env protocol's
trial count, its fallback, a torn env block, and commit, on a GPT disk made here."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from abupgrade.bootloader.base import DiskLayout
from abupgrade.bootloader.grub import BIOS_SETUP, EnvState, Grub, GrubConfig
from abupgrade.model import Slot
from fixtures.guest import (
    QEMU,
    GuestUnavailable,
    build_busybox_rootfs,
    build_initramfs,
    guest_kernel,
    guest_lines,
    make_ext4_image,
    mounted_partition,
    partition_disk,
    partition_extent,
    qemu_boot,
)
from fixtures.tiers import guest_skips, needs

pytestmark = [pytest.mark.boot, pytest.mark.loop]

BOOT, PARTS = 2, {Slot.A: 3, Slot.B: 4}
ROOTS = {Slot.A: "PARTLABEL=rootfs_a", Slot.B: "PARTLABEL=rootfs_b"}
LAYOUT = """label: gpt
size=1M, type=21686148-6449-6E6F-744E-656564454649, name=bios
size=40M, name=boot
size=40M, name=rootfs_a
size=40M, name=rootfs_b
"""
# panic=1: a panicking trial reboots at once; the default panic=5 only costs time here.
CMDLINE = "console=ttyS0 panic=1"


@dataclass
class GrubDisk:
    work: Path
    disk: Path
    kernel: Path
    initrd: Path
    tries: int

    def config(self, mountpoint: Path) -> GrubConfig:
        return GrubConfig(env=mountpoint / "grub" / "grubenv", tries=self.tries)

    @contextlib.contextmanager
    def boot_fs(self) -> Iterator[Grub]:
        """The backend, with the boot partition mounted; unmounted before QEMU runs."""
        with mounted_partition(self.disk, BOOT, self.work / "mnt") as point:
            yield Grub(self.config(point))

    def slot(self, slot: Slot, *, broken: bool = False, boot_files: bool = True) -> None:
        """A busybox image in `slot`, its kernel and initrd in its own /boot or not."""
        root = build_busybox_rootfs(
            self.work / f"root{slot}", slot_tag=f"{slot}-{'broken' if broken else 'ok'}",
            broken=broken, kernel=self.kernel if boot_files else None,
            initrd=self.initrd if boot_files else None)
        start, size = partition_extent(self.disk, PARTS[slot])
        make_ext4_image(self.disk, root, size, f"root{slot}", offset=start)

    def boot(self, name: str, *, timeout: float, no_reboot: bool) -> str:
        return qemu_boot(self.disk, self.work / f"{name}.log", timeout=timeout,
                         no_reboot=no_reboot)


@pytest.fixture
def grub_disk(tmp_path: Path) -> GrubDisk:
    needs(loop=True, tools=(QEMU, "grub-mkimage"))
    with guest_skips():
        if not BIOS_SETUP.is_file():
            raise GuestUnavailable(f"{BIOS_SETUP} is missing (grub-pc-bin)")
        kernel = guest_kernel()
        initrd = build_initramfs(tmp_path / "initrd.img", kernel=kernel)
    disk = partition_disk(tmp_path / "disk.img", 128 << 20, LAYOUT)
    start, size = partition_extent(disk, BOOT)
    make_ext4_image(disk, None, size, "boot", offset=start)
    gd = GrubDisk(tmp_path, disk, kernel, initrd, tries=2)
    with gd.boot_fs() as grub:
        grub.install(DiskLayout(disk=disk, boot_root=grub.settings.env.parent.parent,
                                boot_partition=BOOT, slot_partitions=PARTS, slot_roots=ROOTS,
                                kernel_cmdline=CMDLINE))
        grub.preflight()
    return gd


def grub_lines(log: str) -> list[str]:
    return re.findall(r"abupgrade-grub: ([^\r\n\x1b]*)", log)


def test_failing_trial_gets_exactly_n_boots_then_the_default(grub_disk: GrubDisk) -> None:
    """tries=2, slot B's init panics: GRUB boots B twice, then A for good (no -no-reboot:
    the panics reboot the guest, GRUB decides again each time)."""
    grub_disk.slot(Slot.A)
    grub_disk.slot(Slot.B, broken=True)
    with grub_disk.boot_fs() as grub:
        grub.disable(Slot.B)
        grub.arm_trial(Slot.B, grub.trial_boots())
        armed = grub.current()
    log = grub_disk.boot("trial", timeout=240, no_reboot=False)
    lines = grub_lines(log)
    assert [ln for ln in lines if ln.startswith("try ")] == \
        ["try slot=B left=1", "try slot=B left=0"], lines
    assert log.count("Kernel panic - not syncing") == 2
    assert lines[-1].startswith("boot slot=A fallback= ")
    assert guest_lines(log)[-2:] == ["slot=A tag=A-ok root=/dev/vda3", "poweroff"]
    with grub_disk.boot_fs() as grub:
        after = grub.current()
        state = grub.read()
    # GRUB wrote twice, each time into the other block with the next generation.
    assert after.generation == (armed.generation + 2) % 3 and after.index == armed.index
    assert (state.default, state.trial, state.tries_left, state.next_boot) == \
        (Slot.A, Slot.B, 0, Slot.A)


def test_commit_switches_the_default_and_a_torn_primary_block_is_ignored(
        grub_disk: GrubDisk) -> None:
    """B committed (its kernel and initrd on the boot fs), then a write of "back to A" into
    the primary block cut by a power loss: GRUB must ignore it and boot B."""
    grub_disk.slot(Slot.A)
    grub_disk.slot(Slot.B, boot_files=False)
    with grub_disk.boot_fs() as grub:
        shutil.copyfile(grub_disk.kernel, grub.boot_file_path(Slot.B, "kernel"))
        shutil.copyfile(grub_disk.initrd, grub.boot_file_path(Slot.B, "initrd"))
        grub.commit(Slot.B)
        assert grub.current().index == 1
        primary = grub.env_paths[0]
        old = primary.read_bytes()
        new = EnvState(default=Slot.A, good=frozenset({Slot.A})).block(2)
        cut = new.index(b"ab_A=")  # generation and default written, the rest not
        with open(primary, "r+b") as f:
            f.write(new[:cut])
            os.fsync(f.fileno())
        assert primary.read_bytes() == new[:cut] + old[cut:] != old
        state = grub.read()
    assert (state.default, state.next_boot, state.bootable) == (Slot.B, Slot.B, frozenset(Slot))
    log = grub_disk.boot("commit", timeout=90, no_reboot=True)
    assert grub_lines(log) == ["boot slot=B fallback=A block=1"]
    assert "BOOT_IMAGE=(hd0,gpt2)/grub/slots/B/vmlinuz root=PARTLABEL=rootfs_b" in log
    assert guest_lines(log)[0] == "slot=B tag=B-ok root=/dev/vda4"


def test_a_trial_kernel_that_fails_to_load_falls_back_to_the_default(
        grub_disk: GrubDisk) -> None:
    """GRUB's own `fallback`: the trial's kernel on the boot fs is garbage, so `linux`
    fails and GRUB boots the default entry instead."""
    grub_disk.slot(Slot.A)
    with grub_disk.boot_fs() as grub:
        grub.boot_file_path(Slot.B, "kernel").write_bytes(os.urandom(1 << 20))
        grub.disable(Slot.B)
        grub.arm_trial(Slot.B, 1)
    log = grub_disk.boot("noload", timeout=120, no_reboot=True)
    assert grub_lines(log) == ["try slot=B left=0", "boot slot=B fallback=A block=0"]
    assert "invalid magic number" in log or "invalid kernel" in log
    assert "Falling back to `abupgrade slot A'" in log
    assert guest_lines(log)[0] == "slot=A tag=A-ok root=/dev/vda3"
    with grub_disk.boot_fs() as grub:
        assert grub.read().next_boot is Slot.A
