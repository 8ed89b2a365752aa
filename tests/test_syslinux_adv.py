"""Loop tier: the native ADV reader/writer against real extlinux on a real ext4 filesystem,
and the syslinux backend's install/preflight on real loop devices."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from abupgrade.bootloader import adv
from abupgrade.bootloader.adv import ADV_SIZE, TAG_MENUSAVE, Adv
from abupgrade.bootloader.base import DiskLayout
from abupgrade.bootloader.syslinux import MBR_CODE, Syslinux, SyslinuxConfig, fresh_config
from abupgrade.errors import UsageError
from abupgrade.model import Slot
from fixtures import guest
from fixtures.tiers import needs

pytestmark = pytest.mark.loop

MiB = 1024 * 1024


def _prerequisites() -> None:
    needs(loop=True, tools=("lsattr",))


def _config(directory: Path) -> SyslinuxConfig:
    return SyslinuxConfig(dir=directory)


def extlinux(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["extlinux", *map(str, args)], capture_output=True, text=True,
                          check=False)


@pytest.fixture
def mounted_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An ext4 filesystem (4 KiB blocks unless parametrized) on a loop device, mounted."""
    _prerequisites()
    block = getattr(request, "param", 4096)
    image = guest.make_ext4_image(tmp_path / "boot.img", None, 32 * MiB, "boot",
                                  block_size=block)
    with guest.loop_device(image) as device, guest.mounted(device, tmp_path / "mnt") as point:
        yield point


@pytest.fixture
def installed(mounted_fs: Path) -> Path:
    """`extlinux --install` done on the mounted filesystem; returns the syslinux folder."""
    directory = mounted_fs / "extlinux"
    directory.mkdir()
    proc = extlinux("--install", directory)
    assert proc.returncode == 0, proc.stderr
    return directory


def test_reads_what_extlinux_writes(installed: Path) -> None:
    loader = installed / "ldlinux.sys"
    assert adv.read(loader) == Adv()
    assert extlinux("--once=b", installed).returncode == 0
    assert adv.read(loader).once == "b"
    assert extlinux("--menu-save=a", installed).returncode == 0
    assert adv.read(loader).get(TAG_MENUSAVE) == b"a"
    assert adv.read(loader).once == "b"
    pair = adv.read_pair(loader)
    assert pair[:ADV_SIZE] == pair[ADV_SIZE:], "extlinux writes two equal copies"
    assert Adv.decode(pair[:ADV_SIZE]) == adv.read(loader)
    assert extlinux("--clear-once", installed).returncode == 0
    assert adv.read(loader).once is None
    assert adv.read(loader).get(TAG_MENUSAVE) == b"a"
    assert extlinux("--reset-adv", installed).returncode == 0
    assert adv.read(loader) == Adv()


def test_extlinux_accepts_what_we_write(installed: Path) -> None:
    loader = installed / "ldlinux.sys"
    ours = Adv().with_record(TAG_MENUSAVE, b"kept-by-extlinux").with_once("b")
    adv.write(loader, ours)
    assert adv.read(loader) == ours
    pair = adv.read_pair(loader)
    assert pair == ours.encode_pair()
    assert "i" in subprocess.run(["lsattr", loader], capture_output=True, text=True,
                                 check=True).stdout.split()[0], "immutable flag restored"
    # extlinux refuses to modify an ADV it cannot validate; it keeps our other record.
    assert extlinux("--clear-once", installed).returncode == 0
    assert adv.read(loader) == Adv().with_record(TAG_MENUSAVE, b"kept-by-extlinux")
    adv.write(loader, adv.read(loader).with_once("a"))
    assert extlinux("--once=b", installed).returncode == 0
    assert adv.read(loader).once == "b"
    assert adv.read(loader).get(TAG_MENUSAVE) == b"kept-by-extlinux"


def _raw_write(loader: Path, offset_in_pair: int, data: bytes) -> None:
    """Bytes into the ADV area the way a torn write would leave them (chattr, real tool)."""
    subprocess.run(["chattr", "-i", loader], check=True)
    try:
        with open(loader, "r+b") as f:
            f.seek(loader.stat().st_size - 2 * ADV_SIZE + offset_in_pair)
            f.write(data)
    finally:
        subprocess.run(["chattr", "+i", loader], check=True)


def test_torn_first_copy_reads_the_second_like_extlinux(installed: Path) -> None:
    loader = installed / "ldlinux.sys"
    old = Adv().with_record(TAG_MENUSAVE, b"old").with_once("a")
    adv.write(loader, old)
    new = Adv().with_once("b")
    _raw_write(loader, 0, new.encode()[:10])  # copy 1 cut inside its first record
    assert adv.read(loader) == old
    # extlinux takes the same (second) copy: its edit keeps the old menu-save record.
    assert extlinux("--once=b", installed).returncode == 0
    assert adv.read(loader) == old.with_once("b")
    assert adv.read_pair(loader)[:ADV_SIZE] == adv.read_pair(loader)[ADV_SIZE:]


def test_torn_second_copy_reads_the_first(installed: Path) -> None:
    loader = installed / "ldlinux.sys"
    adv.write(loader, Adv().with_once("a"))
    new = Adv().with_once("b")
    _raw_write(loader, 0, new.encode())
    _raw_write(loader, ADV_SIZE, new.encode()[:7])
    assert adv.read(loader) == new
    assert extlinux("--menu-save=x", installed).returncode == 0
    assert adv.read(loader) == new.with_record(TAG_MENUSAVE, b"x")


def test_no_valid_copy(installed: Path) -> None:
    loader = installed / "ldlinux.sys"
    adv.write(loader, Adv().with_once("b"))
    _raw_write(loader, 4, b"\xff" * 4)
    _raw_write(loader, ADV_SIZE + 4, b"\xff" * 4)
    assert adv.read(loader) == Adv(), "like syslinux: no valid copy means an empty ADV"
    assert extlinux("--once=a", installed).returncode != 0, "extlinux refuses it too"
    adv.write(loader, Adv().with_once("a"))
    assert extlinux("--clear-once", installed).returncode == 0
    assert adv.read(loader) == Adv()


def _write_conf(directory: Path) -> None:
    (directory / "extlinux.conf").write_text(
        fresh_config({Slot.A: "LABEL=rootfs_a", Slot.B: "LABEL=rootfs_b"}, "console=ttyS0"))


def test_preflight_accepts_4k_ext4(installed: Path) -> None:
    _write_conf(installed)
    Syslinux(_config(installed)).preflight()


@pytest.mark.parametrize("mounted_fs", [1024], indirect=True)
def test_preflight_refuses_1k_blocks(installed: Path) -> None:
    _write_conf(installed)
    with pytest.raises(UsageError) as caught:
        Syslinux(_config(installed)).preflight()
    assert caught.value.exit_code == 2
    assert "1024-byte blocks" in caught.value.message
    assert caught.value.hint is not None and "-b 4096" in caught.value.hint


def test_preflight_refuses_missing_pieces(mounted_fs: Path) -> None:
    directory = mounted_fs / "extlinux"
    with pytest.raises(UsageError, match="does not exist"):
        Syslinux(_config(directory)).preflight()
    directory.mkdir()
    with pytest.raises(UsageError, match="no ldlinux.sys"):
        Syslinux(_config(directory)).preflight()
    assert extlinux("--install", directory).returncode == 0
    with pytest.raises(UsageError, match="no extlinux.conf"):
        Syslinux(_config(directory)).preflight()


def test_preflight_refuses_tmpfs(tmp_path: Path) -> None:
    _prerequisites()
    point = tmp_path / "tmpfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", point], check=True)
    try:
        (point / "ldlinux.sys").write_bytes(Adv().encode_pair())
        _write_conf(point)
        with pytest.raises(UsageError, match="on tmpfs"):
            Syslinux(_config(point)).preflight()
    finally:
        subprocess.run(["umount", point], check=True)


@pytest.fixture
def mbr_disk(tmp_path: Path) -> Path:
    _prerequisites()
    disk = guest.partition_disk(tmp_path / "disk.img", 64 * MiB,
                                "label: dos\nsize=32M, type=83, bootable\nsize=8M\nsize=8M\n")
    start, size = guest.partition_extent(disk, 1)
    guest.make_ext4_image(disk, None, size, "boot", offset=start)
    return disk


def _layout(disk: Path, root: Path) -> DiskLayout:
    return DiskLayout(disk=disk, boot_root=root, boot_partition=1,
                      slot_partitions={Slot.A: 2, Slot.B: 3},
                      slot_roots={Slot.A: "LABEL=rootfs_a", Slot.B: "LABEL=rootfs_b"})


def test_install_and_protocol_on_a_real_disk(mbr_disk: Path, tmp_path: Path) -> None:
    table_before = mbr_disk.read_bytes()[440:512]
    with guest.mounted_partition(mbr_disk, 1, tmp_path / "boot") as root:
        Syslinux(_config(root / "extlinux")).install(_layout(mbr_disk, root))
        loader = Syslinux(_config(root / "extlinux"))
        loader.preflight()
        assert sorted(p.name for p in loader.dir.iterdir()) == [
            "extlinux.conf", "ldlinux.c32", "ldlinux.sys", "libcom32.c32", "reboot.c32", "slots"]
        state = loader.read()
        assert (state.default, state.bootable, state.trial) == (Slot.A, frozenset(), None)
        for slot in Slot:
            for name in ("kernel", "initrd"):
                loader.boot_file_path(slot, name).write_bytes(b"boot file")
        assert loader.read().bootable == {Slot.A}
        loader.arm_trial(Slot.B, 3)
        state = loader.read()
        assert (state.next_boot, state.trial, state.tries_left) == (Slot.B, Slot.B, 1)
        assert adv.read(loader.loader_path).once == "b"
        # What syslinux does at boot, done by the real extlinux: clear the record.
        assert extlinux("--clear-once", loader.dir).returncode == 0
        assert loader.read().next_boot == Slot.A
        loader.commit(Slot.B)
        assert "DEFAULT b" in loader.conf_path.read_text().splitlines()
        assert (loader.read().default, loader.read().bootable) == (Slot.B, frozenset(Slot))
    data = mbr_disk.read_bytes()
    assert data[:440] == MBR_CODE.read_bytes()[:440]
    assert data[440:512] == table_before, "disk signature and partition table untouched"


def test_install_refuses_inactive_boot_partition(tmp_path: Path) -> None:
    _prerequisites()
    disk = guest.partition_disk(tmp_path / "disk.img", 16 * MiB,
                                "label: dos\nsize=8M, type=83\nsize=4M\n")
    with pytest.raises(UsageError, match="not flagged bootable") as caught:
        Syslinux(_config(tmp_path / "x")).install(_layout(disk, tmp_path))
    assert caught.value.hint == f"sfdisk --activate {disk} 1"
    gpt = guest.partition_disk(tmp_path / "gpt.img", 16 * MiB, "label: gpt\nsize=8M\n")
    with pytest.raises(UsageError, match="GPT"):
        Syslinux(_config(tmp_path / "x")).install(_layout(gpt, tmp_path))
