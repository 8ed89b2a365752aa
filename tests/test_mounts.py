"""mounts.py: mountinfo read once, with its escapes; paths moved between mount points."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from abupgrade import blockdev, mounts
from abupgrade.errors import OperationalError, PolicyRefusal

INFO = (
    "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n"
    "30 22 8:1 / /boot rw - ext4 /dev/sda1 rw\n"
    "31 30 0:40 / /boot/my\\040efi rw - vfat /dev/sda\\0401 rw\n"
    "not a mountinfo line\n"
    "32 22 0:41 / /boot rw - tmpfs tmpfs rw\n"
)


def test_holding_takes_the_last_of_the_longest_mount_point(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(INFO)
    assert [m.point for m in mounts.read(info)] == [
        Path("/"), Path("/boot"), Path("/boot/my efi"), Path("/boot")]
    efi = mounts.holding(Path("/boot/my efi/EFI"), info)
    assert efi is not None and efi.fstype == "vfat" and efi.source == "/dev/sda 1"
    boot = mounts.holding(Path("/boot/grub/grubenv"), info)
    assert boot is not None and boot.fstype == "tmpfs"  # mounted over the ext4
    root = mounts.root(info)
    assert root is not None and root.devno == os.makedev(8, 2)
    assert mounts.holding(Path("/boot"), tmp_path / "missing") is None
    with pytest.raises(OperationalError, match="cannot read"):
        mounts.read(tmp_path / "missing")


def test_rebase_moves_only_paths_under_a_mount_point() -> None:
    mounted = {Path("/boot"): Path("/tmp/m1"), Path("/boot/efi"): Path("/tmp/m2")}
    assert mounts.rebase(Path("/boot/grub/grubenv"), mounted) == Path("/tmp/m1/grub/grubenv")
    assert mounts.rebase(Path("/boot/efi/EFI"), mounted) == Path("/tmp/m2/EFI")
    assert mounts.rebase(Path("/boot"), mounted) == Path("/tmp/m1")
    assert mounts.rebase(Path("/bootx/y"), mounted) == Path("/bootx/y")
    assert mounts.point_holding(Path("/data/x"), mounted) is None


def test_one_capacity_check_with_the_policy_exit_code(tmp_path: Path) -> None:
    slot = tmp_path / "slot.img"
    slot.write_bytes(b"\0" * 4096)
    assert blockdev.capacity(slot) == 4096
    blockdev.require_fits(4096, blockdev.capacity(slot), "slot B")
    with pytest.raises(PolicyRefusal, match=r"\(4,097 bytes\) is larger than slot B") as err:
        blockdev.require_fits(4097, blockdev.capacity(slot), "slot B")
    assert err.value.exit_code == 4
