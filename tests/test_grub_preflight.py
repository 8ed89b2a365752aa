"""The GRUB preflight refuses what GRUB's save_env cannot rewrite in place, by what the
storage is, not only by the names of a few filesystems."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from abupgrade.bootloader.grub import (
    ENV_SIZE,
    Grub,
    GrubConfig,
    block_paths,
    create_blocks,
    not_in_place,
)
from abupgrade.errors import UsageError


def grub_on(folder: Path, mountinfo: Path) -> Grub:
    settings = GrubConfig(env=folder / "grubenv")
    create_blocks(settings.env)
    return Grub(settings, mountinfo=mountinfo)


def mounted_as(tmp_path: Path, folder: Path, fstype: str, source: str = "/dev/sda2") -> Path:
    info = tmp_path / f"mountinfo-{fstype}"
    info.write_text(f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    f"30 1 8:2 / {folder.resolve()} rw - {fstype} {source} rw\n")
    return info


@pytest.mark.parametrize("fstype", ["xfs", "vfat", "f2fs", "nfs4", "overlay", "tmpfs"])
def test_only_filesystems_grub_rewrites_in_place_are_accepted(tmp_path: Path,
                                                              fstype: str) -> None:
    folder = tmp_path / "boot"
    folder.mkdir()
    grub = grub_on(folder, mounted_as(tmp_path, folder, fstype))
    with pytest.raises(UsageError, match=fstype) as info:
        grub.preflight()
    assert info.value.hint


def test_ext4_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "boot"
    folder.mkdir()
    grub_on(folder, mounted_as(tmp_path, folder, "ext4")).preflight()


def test_a_block_whose_bytes_are_not_plainly_on_disk_is_refused(tmp_path: Path) -> None:
    """A preallocated (unwritten) extent reads as zeros to Linux whatever GRUB writes into
    its sectors; the old check (allocated blocks, right size) let it through."""
    folder = tmp_path / "boot"
    folder.mkdir()
    grub = grub_on(folder, mounted_as(tmp_path, folder, "ext4"))
    target = block_paths(grub.settings.env)[1]
    target.unlink()
    fd = os.open(target, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(fd, 0, ENV_SIZE)
    finally:
        os.close(fd)
    if not_in_place(target) is None:
        pytest.skip(f"{tmp_path} has no FIEMAP or no unwritten extents (not ext4/xfs)")
    with pytest.raises(UsageError, match="in place"):
        grub.preflight()
