"""partitions.py on image files made by sfdisk, cross-checked with sfdisk -J and blkid -p."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from abupgrade.errors import OperationalError, UsageError
from abupgrade.partitions import (
    BIOS_GRUB,
    LINUX_FS,
    MBR_LINUX,
    PartitionSpec,
    TableKind,
    create_table,
    read_table,
)
from fixtures.tiers import missing

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(missing(tools=("sfdisk", "blkid")) is not None,
                                reason=str(missing(tools=("sfdisk", "blkid"))))


def sfdisk_json(path: Path) -> dict[str, Any]:
    out = subprocess.run(["sfdisk", "-J", str(path)], check=True, capture_output=True, text=True)
    table: dict[str, Any] = json.loads(out.stdout)["partitiontable"]
    return table


def blkid(path: Path) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)],
                         check=True, capture_output=True, text=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def image(tmp_path: Path, size: int = 64 * MiB) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_gpt_matches_sfdisk_and_blkid(tmp_path: Path) -> None:
    disk = image(tmp_path)
    made = create_table(disk, TableKind.GPT, [
        PartitionSpec(1 * MiB, BIOS_GRUB, "bios"),
        PartitionSpec(8 * MiB, LINUX_FS, "boot", bootable=True),
        PartitionSpec(16 * MiB, LINUX_FS, "rootfs_a"),
        PartitionSpec(None, LINUX_FS, "data"),
    ])
    table = read_table(disk)
    assert table == made and table is not None
    ref = sfdisk_json(disk)
    assert table.kind is TableKind.GPT
    assert table.disk_id == ref["id"].lower() == blkid(disk)["PTUUID"]
    assert [p.name for p in table.partitions] == ["bios", "boot", "rootfs_a", "data"]
    for ours, theirs in zip(table.partitions, ref["partitions"], strict=True):
        assert ours.start == theirs["start"] * 512
        assert ours.size == theirs["size"] * 512
        assert ours.type == theirs["type"]
        assert ours.partuuid == theirs["uuid"].lower()
        assert ours.name == theirs["name"]
    assert table.get(2).bootable and not table.get(3).bootable
    assert table.get(1).size == 1 * MiB and table.get(2).start == 2 * MiB


def test_mbr_partuuid_and_bootable(tmp_path: Path) -> None:
    disk = image(tmp_path)
    create_table(disk, TableKind.MBR, [
        PartitionSpec(8 * MiB, MBR_LINUX, bootable=True),
        PartitionSpec(8 * MiB, MBR_LINUX),
        PartitionSpec(None, "c"),
    ])
    table = read_table(disk)
    assert table is not None and table.kind is TableKind.MBR
    ref = sfdisk_json(disk)
    signature = ref["id"].removeprefix("0x")
    assert table.disk_id == signature == blkid(disk)["PTUUID"]
    assert [p.partuuid for p in table.partitions] == [f"{signature}-01", f"{signature}-02",
                                                      f"{signature}-03"]
    assert [p.bootable for p in table.partitions] == [True, False, False]
    assert [p.type for p in table.partitions] == ["83", "83", "0c"]
    for ours, theirs in zip(table.partitions, ref["partitions"], strict=True):
        assert (ours.start, ours.size) == (theirs["start"] * 512, theirs["size"] * 512)
        assert ours.name is None


def test_no_table(tmp_path: Path) -> None:
    assert read_table(image(tmp_path)) is None


def test_filesystem_boot_sector_is_not_a_table(tmp_path: Path) -> None:
    disk = image(tmp_path)
    with disk.open("r+b") as f:
        f.seek(446)
        f.write(b"\x12" * 64 + b"\x55\xaa")
    assert read_table(disk) is None


def test_corrupt_gpt_entries_are_refused(tmp_path: Path) -> None:
    disk = image(tmp_path)
    create_table(disk, TableKind.GPT, [PartitionSpec(None, LINUX_FS, "x")])
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, b"y", 1024 + 56)  # first entry's name, first byte
    finally:
        os.close(fd)
    with pytest.raises(OperationalError, match="entries checksum"):
        read_table(disk)


def test_corrupt_gpt_header_is_refused(tmp_path: Path) -> None:
    disk = image(tmp_path)
    create_table(disk, TableKind.GPT, [PartitionSpec(None, LINUX_FS, "x")])
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x01", 512 + 32)  # current LBA field
    finally:
        os.close(fd)
    with pytest.raises(OperationalError, match="header checksum"):
        read_table(disk)


def test_mbr_names_are_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        create_table(image(tmp_path), TableKind.MBR, [PartitionSpec(None, "83", "boot")])


def test_recreate_replaces_the_old_table(tmp_path: Path) -> None:
    disk = image(tmp_path)
    first = create_table(disk, TableKind.GPT, [PartitionSpec(None, LINUX_FS, "old")])
    second = create_table(disk, TableKind.MBR, [PartitionSpec(None, "83")])
    assert first.kind is TableKind.GPT and second.kind is TableKind.MBR
    assert blkid(disk)["PTTYPE"] == "dos"
