"""`disk init`: lay out an A/B disk on an image file or an unmounted block device.

The backend plans the partition table (`Bootloader.plan`: table kind, partitions and what
each is for, e.g. GRUB's GPT with a bios_grub partition, syslinux's MBR with the boot
partition flagged bootable). The boot and data partitions get ext4, an EFI system partition
FAT32 (filled by the backend through abupgrade.fat); the boot filesystem gets
the configuration (config.ON_DISK_PATH) and the keyring; the backend installs itself with
slot A as the default and nothing bootable yet.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from abupgrade import blockdev, bootloader
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.base import DiskLayout, Platform, Role
from abupgrade.config import ON_DISK_PATH, Config, render
from abupgrade.disk import attached, mkfs_ext4, mounted
from abupgrade.errors import PolicyRefusal, UsageError
from abupgrade.fat import mkfs_fat32
from abupgrade.fsutil import atomic_write
from abupgrade.model import Slot
from abupgrade.partitions import PartitionTable, create_table, read_table
from abupgrade.run import run
from abupgrade.slots import mounts_of

MiB = 1024 * 1024
BOOT_SIZE = 256 * MiB
MIN_DATA_SIZE = 32 * MiB
KEYRING = Path("abupgrade/keys")  # on the boot filesystem
STATE_DIR = Path("abupgrade")  # on the data partition


@dataclass(frozen=True)
class InitResult:
    target: Path
    config: Config  # as written to the disk
    table: PartitionTable
    boot_partition: int
    slot_partitions: Mapping[Slot, int]
    data_partition: int
    slot_size: int


def _root_folder(root: Path, relative: Path) -> Path:
    """`root/relative`, it and each folder on the way 0755 whatever the umask:
    the configuration, keyring and state must pass the strict-mode checks (trust.py)."""
    folders = [root]
    for part in relative.parts:
        folders.append(folders[-1] / part)
    for folder in folders:
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)
    return folders[-1]


def _round_mib(size: int) -> int:
    return -(-size // MiB) * MiB


def _check_target(target: Path, size: int | None, needed: int, force: bool) -> int:
    """Refuse what must not be touched; the size the disk will have."""
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise UsageError(f"folder {target.parent} does not exist") from None
        mode = None
    if mode is not None and stat.S_ISBLK(mode):
        if size is not None:
            raise UsageError("--size applies to image files, not to devices")
        busy = mounts_of(target)
        if busy:
            raise PolicyRefusal(f"{target} is mounted on {', '.join(map(str, busy))}",
                                hint="unmount it first; disk init never touches a mounted disk")
        final = blockdev.capacity(target)
    elif mode is None or stat.S_ISREG(mode):
        if mode is not None:
            users = blockdev.loops_backed_by(target)
            if users:
                raise PolicyRefusal(f"{target} is attached as {', '.join(users)}",
                                    hint="detach it first (losetup -d)")
        current = target.stat().st_size if mode is not None else 0
        final = size if size is not None else max(current, needed)
    else:
        raise UsageError(f"{target} is neither a block device nor an image file")
    if final < needed:
        raise UsageError(f"{target} would hold {final:,} bytes, the layout needs {needed:,}",
                         hint="give a larger --size or a smaller --slot-size")
    if mode is not None and not force and read_table(target) is not None:
        raise PolicyRefusal(f"{target} already has a partition table",
                            hint="pass --force to replace it and everything on the disk")
    return final


def init_disk(
    target: Path,
    kind: BootloaderKind,
    *,
    size: int | None,
    slot_size: int,
    force: bool,
    pubkeys: Sequence[Path],
    compatible: str,
    boot_size: int = BOOT_SIZE,
    platform: Platform | None = None,
) -> InitResult:
    """Partition `target`, make the boot and data filesystems, write config and keyring,
    and install the bootloader. Slots stay empty; slot A is the default."""
    if not compatible or any(c in compatible for c in '"\\\n'):
        raise UsageError(f"compatible string {compatible!r} is empty or has quotes")
    if slot_size <= 0:
        raise UsageError("the slot size must be positive")
    for key in pubkeys:
        if not key.is_file():
            raise UsageError(f"public key {key} does not exist")
        if key.suffix != ".pub":
            raise UsageError(f"public key {key} must be named *.pub",
                             hint="pass the .pub file `abupgrade keygen` wrote")
    slot_size, boot_size = _round_mib(slot_size), _round_mib(boot_size)
    backend = bootloader.backend_class(kind)
    platform = platform or backend.platforms[0]
    plan = backend.plan(platform, slot_size=slot_size, boot_size=boot_size)
    needed = 2 * MiB + sum(p.spec.size or 0 for p in plan.partitions) + MIN_DATA_SIZE
    final = _check_target(target, size, needed, force)
    is_file = not target.exists() or stat.S_ISREG(target.stat().st_mode)
    if is_file:
        with open(target, "ab") as f:
            f.truncate(final)
    table = create_table(target, plan.table, [p.spec for p in plan.partitions],
                         disk_id=plan.disk_id)
    if not is_file:
        run(["partx", "--update", target])  # the kernel's view of the new table

    boot_nr, data_nr = plan.number(Role.BOOT), plan.number(Role.DATA)
    slot_nrs = {slot: plan.number(Role.of(slot)) for slot in Slot}
    boot_point, data_point = plan.mount(Role.BOOT), plan.mount(Role.DATA)
    slots = {slot: plan.device_spec(Role.of(slot), table) for slot in Slot}
    config = Config(
        compatible=compatible,
        bootloader=kind,
        slots=slots,
        keyring=boot_point / KEYRING,
        state_dir=data_point / STATE_DIR,
        bootloaders={kind: backend.new_settings(plan)},
        mounts={boot_point: plan.device_spec(Role.BOOT, table),
                data_point: plan.device_spec(Role.DATA, table)},
    )

    esp_nr = plan.number(Role.ESP) if plan.has(Role.ESP) else None
    with attached(target) as disk:
        mkfs_ext4(disk.partitions[boot_nr], "boot", block_size=4096)
        mkfs_ext4(disk.partitions[data_nr], "data", block_size=4096)
        if esp_nr is not None:
            mkfs_fat32(disk.partitions[esp_nr], label="ESP")
        with mounted(disk.partitions[boot_nr]) as boot, mounted(disk.partitions[data_nr]) as data:
            keyring = _root_folder(boot, KEYRING)
            for key in pubkeys:
                shutil.copyfile(key, keyring / key.name)
                (keyring / key.name).chmod(0o644)
            _root_folder(boot, ON_DISK_PATH.parent)
            atomic_write(boot / ON_DISK_PATH, render(config).encode())
            _root_folder(data, STATE_DIR)
            on_disk = config.rebased({boot_point: boot, data_point: data})
            backend(on_disk.settings).install(DiskLayout(
                disk=disk.device,
                boot_root=boot,
                boot_partition=boot_nr,
                slot_partitions=slot_nrs,
                slot_roots=slots,
                platform=platform,
                partitions=disk.partitions,
                esp_partition=esp_nr,
            ))
            os.sync()
    return InitResult(target, config, table, boot_nr, slot_nrs, data_nr, slot_size)
