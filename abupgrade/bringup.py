"""What the boot hook mounts itself, so that a machine whose init mounts nothing abupgrade
needs (a busybox root with an empty fstab, a disk just made by `disk init`) runs its hook
without hand edits.

Without a configuration on the root filesystem, the boot partition of the disk the root
filesystem is on (GPT partition "boot", or the bootable MBR partition, as `disk init` makes
them) is mounted on /boot, where `disk init` and `adopt` keep the configuration. Then every
`[mounts]` entry that is not mounted yet is, with its device found the way slot devices are
(PARTLABEL= and PARTUUID= from the partition table: busybox `mount` and a machine without
udev cannot resolve those).
"""

from __future__ import annotations

from pathlib import Path

from abupgrade import mounts, run, slots
from abupgrade.bootloader.base import BOOT_POINT
from abupgrade.config import Config
from abupgrade.errors import OperationalError, UsageError


def _mounted(point: Path, mountinfo: Path) -> bool:
    try:
        return any(m.point == point for m in mounts.read(mountinfo))
    except OperationalError:
        return False


def _mount(device: Path, point: Path) -> None:
    point.mkdir(parents=True, exist_ok=True)
    run.run(["mount", device, point], timeout=60, hint=f"is there a filesystem on {device}?")


def boot_partition_of_root(mountinfo: Path = mounts.MOUNTINFO) -> Path | None:
    """The boot partition of the disk the root filesystem is on; None when the root is not a
    partition of a disk with one (a device-mapper root, a disk not laid out like ours)."""
    from abupgrade.disk import boot_partition
    from abupgrade.partitions import read_table

    root = mounts.root(mountinfo)
    if root is None:
        return None
    devices = slots.sysfs_block_devices()
    found = next((d for d in devices if d.devno == root.devno), None)
    if found is None or found.parent is None:
        return None
    try:
        number = boot_partition(read_table(found.parent), found.parent)
    except (UsageError, OperationalError):
        return None
    return next((d.node for d in devices if d.parent == found.parent and d.number == number),
                None)


def mount_boot_partition(mountinfo: Path = mounts.MOUNTINFO) -> bool:
    """Mount the root disk's boot partition on /boot, unless something is mounted there;
    whether it was mounted now."""
    if _mounted(BOOT_POINT, mountinfo):
        return False
    device = boot_partition_of_root(mountinfo)
    if device is None:
        return False
    _mount(device, BOOT_POINT)
    return True


def mount_listed(config: Config) -> list[Path]:
    """Mount every `[mounts]` entry that is not mounted yet (shortest mount point first);
    the mount points mounted now."""
    done = []
    for point in sorted(config.mounts, key=lambda p: len(p.parts)):
        if _mounted(point, config.system.mountinfo):
            continue
        device = slots.resolve(config.mounts[point])
        _mount(device, point)
        done.append(point)
    return done
