"""Boot tier: a real MBR disk with extlinux, booted in QEMU (TCG).

One disk, one scenario in order, because each boot costs seconds: the default boots; a trial
boots once and syslinux clears it itself; a trial whose init panics, and one whose kernel
cannot load, each come back on the default after one boot; commit switches the default.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from abupgrade.bootloader import adv
from abupgrade.bootloader.base import DiskLayout
from abupgrade.bootloader.syslinux import Syslinux, SyslinuxConfig
from abupgrade.model import Slot
from fixtures import guest
from fixtures.tiers import guest_skips, needs

pytestmark = [pytest.mark.boot, pytest.mark.loop]

MiB = 1024 * 1024
# sfdisk input: boot partition flagged bootable, then the two slots.
TABLE = "label: dos\nsize=40M, type=83, bootable\nsize=12M, type=83\nsize=12M, type=83\n"
ROOTS = {Slot.A: "LABEL=rootfs_a", Slot.B: "LABEL=rootfs_b"}
SLOT_PARTITIONS = {Slot.A: 2, Slot.B: 3}


@dataclass
class Machine:
    disk: Path
    work: Path
    kernel: Path
    initrd: Path

    @property
    def mountpoint(self) -> Path:
        return self.work / "boot"

    def backend(self) -> Syslinux:
        return Syslinux(SyslinuxConfig(dir=self.mountpoint / "extlinux"))

    def boot_fs(self) -> contextlib.AbstractContextManager[Path]:
        return guest.mounted_partition(self.disk, 1, self.mountpoint)

    def write_rootfs(self, slot: Slot, *, broken: bool = False) -> None:
        tree = guest.build_busybox_rootfs(self.work / f"root{slot}", slot_tag=slot.value,
                                          broken=broken)
        start, size = guest.partition_extent(self.disk, SLOT_PARTITIONS[slot])
        guest.make_ext4_image(self.disk, tree, size, f"rootfs_{slot.value.lower()}",
                              offset=start)

    def boot(self, name: str, *, no_reboot: bool, timeout: float = 60) -> list[str]:
        """One QEMU run (the boot fs is unmounted then); the guest's marker lines."""
        text = guest.qemu_boot(self.disk, self.work / f"{name}.log", timeout=timeout,
                               no_reboot=no_reboot)
        return guest.guest_lines(text)


def booted(lines: list[str]) -> list[str]:
    """Which root filesystem each boot reached, in order: "A", "B", or "B panicked"; a boot
    whose cmdline slot differs from the root filesystem's tag shows as "A on B"."""
    out = []
    for line in lines:
        fields = dict(f.split("=", 1) for f in line.rstrip(":").split() if "=" in f)
        tag = fields.get("tag", "").rstrip(":")
        if line.startswith("broken"):
            out.append(f"{tag} panicked")
        elif "tag" in fields:
            slot = fields.get("slot", "")
            out.append(tag if slot == tag else f"{slot} on {tag}")
    return out


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    needs(loop=True, tools=(guest.QEMU,))
    work = tmp_path_factory.mktemp("syslinux-boot")
    with guest_skips():
        kernel = guest.guest_kernel()
        initrd = guest.build_initramfs(work / "initrd.img", kernel=kernel)
        disk = guest.partition_disk(work / "disk.img", 68 * MiB, TABLE)
        start, size = guest.partition_extent(disk, 1)
        guest.make_ext4_image(disk, None, size, "boot", offset=start, block_size=4096)
        m = Machine(disk, work, kernel, initrd)
        for slot in Slot:
            m.write_rootfs(slot)
    with m.boot_fs() as root:
        m.backend().install(DiskLayout(disk=disk, boot_root=root, boot_partition=1,
                                       slot_partitions=SLOT_PARTITIONS, slot_roots=ROOTS))
        loader = m.backend()
        for slot in Slot:
            shutil.copyfile(kernel, loader.boot_file_path(slot, "kernel"))
            shutil.copyfile(initrd, loader.boot_file_path(slot, "initrd"))
        loader.preflight()
    yield m


def test_default_trial_fallback_commit(machine: Machine) -> None:
    m = machine
    with m.boot_fs():
        state = m.backend().read()
    assert (state.default, state.bootable, state.next_boot) == (Slot.A, frozenset({Slot.A}), Slot.A)

    # 1. The default boots (its kernel found through the path relative to extlinux.conf).
    lines = m.boot("1-default", no_reboot=True)
    assert booted(lines) == ["A"], lines

    # 2. A trial of B boots B, and syslinux itself clears the trial before the kernel runs.
    with m.boot_fs():
        m.backend().arm_trial(Slot.B, 3)
        assert m.backend().read().next_boot == Slot.B
    lines = m.boot("2-trial", no_reboot=True)
    assert booted(lines) == ["B"], lines
    with m.boot_fs():
        loader = m.backend()
        assert adv.read(loader.loader_path).once is None, "syslinux cleared the boot-once"
        state = loader.read()
    assert (state.trial, state.next_boot, state.bootable) == (None, Slot.A, frozenset(Slot))

    # 3. A trial whose init panics gets exactly one boot; the reset lands on the default.
    m.write_rootfs(Slot.B, broken=True)
    with m.boot_fs():
        m.backend().arm_trial(Slot.B, 1)
    lines = m.boot("3-panic", no_reboot=False, timeout=90)
    assert booted(lines) == ["B panicked", "A"], lines

    # 4. A trial whose kernel cannot load: ONERROR reboots, the default boots.
    with m.boot_fs():
        loader = m.backend()
        loader.boot_file_path(Slot.B, "kernel").write_bytes(b"not a kernel\n" * 1000)
        loader.arm_trial(Slot.B, 1)
    lines = m.boot("4-badkernel", no_reboot=False, timeout=60)
    assert booted(lines) == ["A"], lines
    log = (m.work / "4-badkernel.log").read_text(errors="replace")
    failed = log.find("Booting kernel failed")
    assert 0 <= log.find("Loading slots/B/vmlinuz") < failed < log.find("slots/A/vmlinuz"), log

    # 5. commit switches the default for good.
    m.write_rootfs(Slot.B)
    with m.boot_fs():
        loader = m.backend()
        shutil.copyfile(m.kernel, loader.boot_file_path(Slot.B, "kernel"))
        loader.commit(Slot.B)
        state = loader.read()
    assert (state.default, state.trial, state.next_boot) == (Slot.B, None, Slot.B)
    lines = m.boot("5-committed", no_reboot=True)
    assert booted(lines) == ["B"], lines
