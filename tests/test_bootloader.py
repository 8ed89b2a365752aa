"""The backend registry and what backends tell `disk init` and `apply`, without a disk."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from abupgrade.bootloader import BootloaderKind, backend, backend_class
from abupgrade.bootloader.base import BOOT_POINT, DATA_POINT, DiskLayout, Platform, Role
from abupgrade.bootloader.grub import GrubConfig
from abupgrade.errors import UsageError
from abupgrade.model import Slot
from abupgrade.partitions import BIOS_GRUB, LINUX_FS, MBR_LINUX, TableKind
from abupgrade.schema import Table

MiB = 1 << 20


@pytest.mark.parametrize("kind", list(BootloaderKind), ids=str)
def test_every_registered_backend_loads_and_plans(kind: BootloaderKind, tmp_path: Path) -> None:
    cls = backend_class(kind)
    assert cls.name == kind.value and issubclass(cls.settings_type, Table)
    plan = cls.plan(cls.platforms[0], slot_size=64 * MiB, boot_size=32 * MiB)
    roles = [p.role for p in plan.partitions]
    assert roles.count(Role.BOOT) == roles.count(Role.DATA) == 1
    assert plan.partitions[plan.number(Role.SLOT_A) - 1].spec.size == 64 * MiB
    assert plan.partitions[plan.number(Role.SLOT_B) - 1].spec.size == 64 * MiB
    assert plan.partitions[-1].role is Role.DATA and plan.partitions[-1].spec.size is None
    assert (plan.mount(Role.BOOT), plan.mount(Role.DATA)) == (BOOT_POINT, DATA_POINT)
    settings = cls.new_settings(plan)
    assert isinstance(settings, cls.settings_type)
    loader = backend(kind, settings)
    assert loader.trial_boots() >= 1
    kernel = loader.boot_file_path(Slot.B, "kernel")
    assert kernel != loader.boot_file_path(Slot.A, "kernel")
    if not plan.has(Role.ESP):  # else the kernels live on the ESP, not the boot filesystem
        assert BOOT_POINT in kernel.parents
    with pytest.raises(ValueError, match="unknown boot file"):
        loader.boot_file_path(Slot.A, "dtb")
    with pytest.raises(UsageError, match=f"{kind} cannot boot bios/amd64 with Secure Boot"):
        cls.plan(Platform(secure_boot=True), slot_size=64 * MiB, boot_size=32 * MiB)


def test_the_two_layouts() -> None:
    grub = backend_class(BootloaderKind.GRUB).plan(Platform(), slot_size=MiB, boot_size=MiB)
    assert grub.table is TableKind.GPT
    assert [(p.role, p.spec.name, p.spec.type) for p in grub.partitions] == [
        (Role.FIRMWARE, "bios", BIOS_GRUB), (Role.BOOT, "boot", LINUX_FS),
        (Role.SLOT_A, "rootfs_a", LINUX_FS), (Role.SLOT_B, "rootfs_b", LINUX_FS),
        (Role.DATA, "data", LINUX_FS)]
    syslinux = backend_class(BootloaderKind.SYSLINUX).plan(Platform(), slot_size=MiB,
                                                          boot_size=MiB)
    assert syslinux.table is TableKind.MBR
    assert [(p.role, p.spec.name, p.spec.type, p.spec.bootable) for p in syslinux.partitions] == [
        (Role.BOOT, None, MBR_LINUX, True), (Role.SLOT_A, None, MBR_LINUX, False),
        (Role.SLOT_B, None, MBR_LINUX, False), (Role.DATA, None, MBR_LINUX, False)]


def test_trial_boots_and_notes_come_from_the_backend() -> None:
    grub = backend(BootloaderKind.GRUB, GrubConfig(tries=7))
    assert grub.trial_boots() == 7 and grub.notes() == ()
    syslinux = backend(BootloaderKind.SYSLINUX, backend_class(BootloaderKind.SYSLINUX)
                       .settings_type())
    assert syslinux.trial_boots() == 1
    assert syslinux.notes() == ("syslinux gives a trial exactly 1 boot(s) before it falls back",)
    with pytest.raises(TypeError, match="grub takes GrubConfig"):
        backend(BootloaderKind.GRUB, syslinux.settings)


def test_files_of_a_backend_on_the_mounted_boot_filesystem(tmp_path: Path) -> None:
    layout = DiskLayout(disk=tmp_path / "disk", boot_root=tmp_path / "boot", boot_partition=2,
                        slot_partitions={Slot.A: 3, Slot.B: 4}, slot_roots={})
    assert layout.on_boot_fs(tmp_path / "boot/grub/grubenv", "[grub] env") == \
        PurePosixPath("grub/grubenv")
    with pytest.raises(UsageError, match=r"\[grub\] env /etc/grubenv is not on the boot"):
        layout.on_boot_fs(Path("/etc/grubenv"), "[grub] env")
