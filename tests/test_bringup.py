"""bringup.py: what the boot hook mounts itself (the root disk's boot partition, `[mounts]`),
on real loop disks with real mounts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from abupgrade import bringup
from abupgrade import config as configuration
from abupgrade.disk import Disk, attached, mkfs_ext4
from abupgrade.partitions import LINUX_FS, PartitionSpec, TableKind, create_table
from fixtures.tiers import needs

MiB = 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Disk, str]]:
    """A GPT disk like `disk init` makes (a partition named boot), the others uniquely named
    (other disks on this machine may carry the same names)."""
    needs(loop=True)
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 48 * MiB)
    tag = "t" + uuid.uuid4().hex[:8]
    create_table(image, TableKind.GPT, [PartitionSpec(8 * MiB, LINUX_FS, "boot"),
                                        PartitionSpec(8 * MiB, LINUX_FS, f"{tag}_a"),
                                        PartitionSpec(8 * MiB, LINUX_FS, f"{tag}_data")])
    with attached(image) as attached_disk:
        mkfs_ext4(attached_disk.partitions[3], "data")
        yield attached_disk, tag


def mountinfo_with_root(path: Path, device: Path) -> Path:
    rdev = device.stat().st_rdev
    path.write_text(f"22 1 {os.major(rdev)}:{os.minor(rdev)} / / rw - ext4 {device} rw\n")
    return path


@pytest.mark.loop
def test_the_boot_partition_of_the_root_disk(disk: tuple[Disk, str], tmp_path: Path) -> None:
    attached_disk, _ = disk
    mountinfo = mountinfo_with_root(tmp_path / "mountinfo", attached_disk.partitions[2])
    assert bringup.boot_partition_of_root(mountinfo) == attached_disk.partitions[1]
    # a root that is no partition (a whole disk) has no boot partition to offer
    whole = mountinfo_with_root(tmp_path / "whole", attached_disk.device)
    assert bringup.boot_partition_of_root(whole) is None


@pytest.mark.loop
def test_mounts_are_mounted_where_they_are_not(disk: tuple[Disk, str], tmp_path: Path) -> None:
    attached_disk, tag = disk
    point = tmp_path / "data"
    cfg = configuration.parse({
        "compatible": "x", "bootloader": "grub",
        "slots": {"A": {"device": f"PARTLABEL={tag}_a"}, "B": {"device": "/dev/none"}},
        "mounts": {str(point): f"PARTLABEL={tag}_data"},
    })
    try:
        assert bringup.mount_listed(cfg) == [point]
        found = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(point)],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert Path(found).resolve() == attached_disk.partitions[3].resolve()
        assert bringup.mount_listed(cfg) == []  # mounted already: left alone
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", str(point)], check=True, capture_output=True)
