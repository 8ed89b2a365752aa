"""slots.py: device specs without udev, the booted slot, mounted devices."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from abupgrade import config as configuration
from abupgrade import mounts
from abupgrade.disk import Disk, attached, mkfs_ext4, mounted
from abupgrade.errors import UsageError
from abupgrade.model import Slot
from abupgrade.partitions import LINUX_FS, PartitionSpec, TableKind, create_table
from abupgrade.slots import (
    booted_slot,
    cmdline_slot,
    is_mounted,
    mounts_of,
    parse_spec,
    resolve,
    sysfs_block_devices,
)
from fixtures.tiers import needs

MiB = 1024 * 1024


def needs_loop() -> None:
    needs(loop=True)


def blkid(device: Path) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", str(device)],
                         capture_output=True, text=True, check=False)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def unique() -> str:
    return "t" + uuid.uuid4().hex[:10]


def make_config(tmp_path: Path, a: str, b: str, **system: str) -> configuration.Config:
    raw = {"compatible": "x", "bootloader": "grub",
           "slots": {"A": {"device": a}, "B": {"device": b}}, "system": system}
    return configuration.parse(raw)


# ---------------------------------------------------------------- unit


def test_block_devices_from_sysfs(tmp_path: Path) -> None:
    """sysfs as the kernel lays it out: /sys/class/block/NAME links to the device's folder,
    a partition's folder sits in its disk's; uevent, size and `partition` files."""
    devices = tmp_path / "devices/virtual/block"

    def device(folder: Path, uevent: str, sectors: int, partition: int | None = None) -> None:
        folder.mkdir(parents=True)
        (folder / "uevent").write_text(uevent)
        (folder / "size").write_text(f"{sectors}\n")
        (folder / "dev").write_text("x\n")
        if partition is not None:
            (folder / "partition").write_text(f"{partition}\n")
        link = tmp_path / "class/block" / folder.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder)

    device(devices / "vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n", 2048)
    device(devices / "vda/vda2", "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\n"
           "PARTN=2\nPARTNAME=boot\n", 1024, partition=2)
    device(devices / "loop7", "MAJOR=7\nMINOR=7\nDEVNAME=loop7\nDEVTYPE=disk\n", 0)
    found = {d.name: d for d in sysfs_block_devices(tmp_path / "class/block", Path("/dev"))}
    assert set(found) == {"vda", "vda2"}  # an unbound loop device has no size
    disk, part = found["vda"], found["vda2"]
    assert (disk.node, disk.parent, disk.number, disk.size) == (Path("/dev/vda"), None, None,
                                                               2048 * 512)
    assert (part.node, part.parent, part.number) == (Path("/dev/vda2"), Path("/dev/vda"), 2)
    assert part.devno == os.makedev(254, 2) and part.properties["PARTNAME"] == "boot"


def test_parse_spec() -> None:
    assert parse_spec("PARTLABEL=rootfs_a") == ("PARTLABEL", "rootfs_a")
    assert parse_spec("uuid=1234-ABCD") == ("UUID", "1234-ABCD")
    assert parse_spec("/dev/vda3") == ("PATH", "/dev/vda3")
    for bad in ("rootfs_a", "PARTLABEL=", "SERIAL=1"):
        with pytest.raises(UsageError) as err:
            parse_spec(bad)
        assert err.value.exit_code == 2


def test_path_that_is_no_block_device(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a block device"):
        resolve(str(tmp_path))


def test_cmdline_slot(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    assert cmdline_slot(cmdline) is None
    cmdline.write_text("console=ttyS0 root=PARTLABEL=rootfs_b abupgrade.slot=B quiet\n")
    assert cmdline_slot(cmdline) is Slot.B
    cmdline.write_text("root=/dev/sda3\n")
    assert cmdline_slot(cmdline) is None
    cmdline.write_text("abupgrade.slot=C\n")
    with pytest.raises(UsageError):
        cmdline_slot(cmdline)


def test_booted_slot_from_cmdline(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("abupgrade.slot=A\n")
    (tmp_path / "mountinfo").write_text("")
    cfg = make_config(tmp_path, "/dev/nonexistent-a", "/dev/nonexistent-b",
                      cmdline=str(tmp_path / "cmdline"), mountinfo=str(tmp_path / "mountinfo"))
    assert booted_slot(cfg) is Slot.A


def test_mountinfo_escapes(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("36 35 8:3 / /mnt/with\\040space rw,relatime shared:1 - ext4 /dev/sda3 rw\n"
                    "37 35 0:5 / /proc rw - proc proc rw\n")
    found = mounts.read(info)
    assert found[0].point == Path("/mnt/with space") and found[0].source == "/dev/sda3"
    assert found[0].devno == os.makedev(8, 3) and found[1].point == Path("/proc")
    assert found[0].fstype == "ext4" and found[1].source == "proc"


# ---------------------------------------------------------------- loop


@pytest.fixture
def gpt_disk(tmp_path: Path) -> Iterator[tuple[Disk, list[str]]]:
    needs_loop()
    image = tmp_path / "gpt.img"
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    names = [unique(), unique(), unique()]
    # partitions 3 and 4 share a name: resolving it must refuse to guess
    create_table(image, TableKind.GPT, [PartitionSpec(4 * MiB, LINUX_FS, n) for n in names]
                 + [PartitionSpec(4 * MiB, LINUX_FS, names[2])])
    with attached(image) as disk:
        yield disk, names


@pytest.mark.loop
def test_partlabel_and_partuuid_without_udev(gpt_disk: tuple[Disk, list[str]]) -> None:
    disk, names = gpt_disk
    assert disk.table is not None
    part2 = disk.partitions[2]
    assert resolve(f"PARTLABEL={names[1]}") == part2
    assert resolve(f"PARTLABEL={names[1]}", within=disk.device) == part2
    partuuid = disk.table.get(2).partuuid
    assert blkid(part2)["PART_ENTRY_UUID"] == partuuid
    assert blkid(part2)["PART_ENTRY_NAME"] == names[1]
    assert resolve(f"PARTUUID={partuuid.upper()}") == part2
    assert resolve(str(part2)) == part2


# A machine without libudev.so: pyudev finds no library named udev (as it says there).
NO_LIBUDEV = """
import ctypes.util, logging, sys
from pathlib import Path
real = ctypes.util.find_library
ctypes.util.find_library = lambda name: None if name == "udev" else real(name)
logging.basicConfig(level=logging.DEBUG, format="%(message)s")
from abupgrade.slots import resolve
print(resolve(sys.argv[1]), resolve(sys.argv[2]))
"""


@pytest.mark.loop
def test_partlabel_and_partuuid_without_libudev(gpt_disk: tuple[Disk, list[str]]) -> None:
    disk, names = gpt_disk
    assert disk.table is not None
    partuuid = disk.table.get(1).partuuid
    proc = subprocess.run([sys.executable, "-c", NO_LIBUDEV, f"PARTLABEL={names[1]}",
                           f"PARTUUID={partuuid}"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(disk.partitions[2]), str(disk.partitions[1])]
    assert "no udev (No library named udev): block devices from /sys/class/block" in proc.stderr


@pytest.mark.loop
def test_ambiguous_and_missing_are_usage_errors(gpt_disk: tuple[Disk, list[str]]) -> None:
    disk, names = gpt_disk
    with pytest.raises(UsageError) as err:
        resolve(f"PARTLABEL={names[2]}")
    assert err.value.exit_code == 2
    assert str(disk.partitions[3]) in err.value.message
    assert str(disk.partitions[4]) in err.value.message
    with pytest.raises(UsageError, match="no block device") as missing:
        resolve(f"PARTLABEL={unique()}", within=disk.device)
    assert missing.value.hint is not None and names[0] in missing.value.hint


@pytest.mark.loop
def test_mbr_partuuid_and_ext4_label(tmp_path: Path) -> None:
    needs_loop()
    image = tmp_path / "mbr.img"
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    table = create_table(image, TableKind.MBR, [PartitionSpec(8 * MiB, "83", bootable=True),
                                                PartitionSpec(None, "83")])
    label = unique()
    part = table.get(2)
    mkfs_ext4(image, label, offset=part.start, size=part.size)
    with attached(image) as disk:
        node = disk.partitions[2]
        probed = blkid(node)
        assert probed["PART_ENTRY_UUID"] == part.partuuid == f"{table.disk_id}-02"
        assert resolve(f"PARTUUID={part.partuuid}") == node
        assert resolve(f"LABEL={label}") == node
        assert resolve(f"UUID={probed['UUID']}", within=disk.device) == node


@pytest.mark.loop
def test_booted_slot_from_root_device(gpt_disk: tuple[Disk, list[str]], tmp_path: Path) -> None:
    disk, names = gpt_disk
    rdev = disk.partitions[2].stat().st_rdev
    info = tmp_path / "mountinfo"
    info.write_text(f"1 0 {os.major(rdev)}:{os.minor(rdev)} / / rw - ext4 /dev/root rw\n")
    cfg = make_config(tmp_path, f"PARTLABEL={names[0]}", f"PARTLABEL={names[1]}",
                      cmdline=str(tmp_path / "no-cmdline"), mountinfo=str(info))
    assert booted_slot(cfg) is Slot.B
    info.write_text("1 0 0:42 / / rw - overlay overlay rw\n")
    assert booted_slot(cfg) is None


@pytest.mark.loop
def test_is_mounted_sees_partitions_of_a_disk(tmp_path: Path) -> None:
    needs_loop()
    image = tmp_path / "m.img"
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    table = create_table(image, TableKind.GPT, [PartitionSpec(None, LINUX_FS, unique())])
    mkfs_ext4(image, "m", offset=table.get(1).start, size=table.get(1).size)
    with attached(image) as disk:
        part = disk.partitions[1]
        assert not is_mounted(disk.device) and not is_mounted(part)
        with mounted(part, readonly=True) as point:
            assert is_mounted(part)
            assert mounts_of(disk.device) == [point]
        assert not is_mounted(disk.device)
