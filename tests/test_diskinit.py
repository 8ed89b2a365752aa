"""disk init on image files, for both bootloaders, read back with our readers and sfdisk -J."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from abupgrade import fat
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.systemd_boot import LOADER_SOURCE
from abupgrade.bootloader.uboot import UBootConfig
from abupgrade.config import ON_DISK_PATH
from abupgrade.disk import attached, mounted, open_disk
from abupgrade.diskinit import init_disk
from abupgrade.errors import PolicyRefusal, UsageError
from abupgrade.model import Slot
from abupgrade.partitions import BIOS_GRUB, EFI_SYSTEM, TableKind, read_table
from abupgrade.system import bootloader_of
from fixtures.tiers import needs

MiB = 1024 * 1024
SLOT = 48 * MiB
BOOT = 32 * MiB

pytestmark = pytest.mark.loop



def prerequisites(kind: BootloaderKind) -> None:
    needs(loop=True, tools=["grub-mkimage"] if kind is BootloaderKind.GRUB else [])


def sfdisk_json(path: Path) -> dict[str, Any]:
    out = subprocess.run(["sfdisk", "-J", str(path)], check=True, capture_output=True, text=True)
    table: dict[str, Any] = json.loads(out.stdout)["partitiontable"]
    return table


def make_key(tmp_path: Path) -> Path:
    key = tmp_path / "vendor.pub"
    key.write_text("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAtest\n-----END PUBLIC KEY-----\n")
    return key


@pytest.mark.parametrize("kind", list(BootloaderKind))
def test_init_image_file(kind: BootloaderKind, tmp_path: Path) -> None:
    prerequisites(kind)
    image = tmp_path / "disk.img"
    key = make_key(tmp_path)
    size = 512 * MiB if kind is BootloaderKind.SYSTEMD_BOOT else 256 * MiB  # kernels on the ESP
    result = init_disk(image, kind, size=size, slot_size=SLOT, force=False, pubkeys=[key],
                       compatible="acme-box", boot_size=BOOT)
    assert image.stat().st_size == size

    table = read_table(image)
    assert table == result.table and table is not None
    ref = sfdisk_json(image)
    assert [p["size"] * 512 for p in ref["partitions"]] == [p.size for p in table.partitions]
    slot_a, slot_b = (table.get(result.slot_partitions[s]) for s in Slot)
    assert slot_a.size == slot_b.size == SLOT
    assert table.get(result.boot_partition).size == BOOT
    data = table.get(result.data_partition)
    assert data.start + data.size > 200 * MiB  # the rest of the disk
    if kind is BootloaderKind.GRUB:
        assert table.kind is TableKind.GPT and ref["label"] == "gpt"
        assert [p.name for p in table.partitions] == ["bios", "boot", "rootfs_a", "rootfs_b",
                                                      "data"]
        assert table.get(1).type == BIOS_GRUB and table.get(1).size == MiB
        assert result.config.slots == {Slot.A: "PARTLABEL=rootfs_a", Slot.B: "PARTLABEL=rootfs_b"}
    elif kind is BootloaderKind.SYSTEMD_BOOT:
        assert table.kind is TableKind.GPT
        assert [p.name for p in table.partitions] == ["esp", "boot", "rootfs_a", "rootfs_b",
                                                      "data"]
        assert table.get(1).type == EFI_SYSTEM and table.get(1).size == 256 * MiB
        with fat.MtoolsFat(image, offset=table.get(1).start) as esp:
            assert esp.read("EFI/BOOT/BOOTX64.EFI") == LOADER_SOURCE.read_bytes()
            assert b"default slot-*" in esp.read("loader/loader.conf")
            assert esp.list("loader/entries") == []
    elif kind is BootloaderKind.UBOOT:
        assert table.kind is TableKind.GPT and ref["label"] == "gpt"
        assert [p.name for p in table.partitions] == ["uboot", "boot", "rootfs_a", "rootfs_b",
                                                      "data"]
        assert table.get(1).start == 2 * MiB and table.get(1).bootable
        env = result.config.section(UBootConfig).env
        assert env == (f"PTUUID={table.disk_id} 0x100000 0x4000",
                       f"PTUUID={table.disk_id} 0x104000 0x4000")
        with fat.MtoolsFat(image, table.get(1).start) as fs:
            assert fs.read("boot.scr")[:4] == bytes.fromhex("27051956")  # U-Boot image magic
    else:
        assert table.kind is TableKind.MBR and ref["label"] == "dos"
        assert [p.bootable for p in table.partitions] == [True, False, False, False]
        assert ref["partitions"][0].get("bootable") is True
        assert result.config.slots[Slot.B] == f"PARTUUID={table.disk_id}-03"

    with open_disk(image) as session:
        cfg = session.config
        assert cfg.compatible == "acme-box" and cfg.bootloader is kind
        assert cfg.slots == {s: str(session.disk.partitions[result.slot_partitions[s]])
                             for s in Slot}
        assert cfg.keyring == session.boot / "abupgrade" / "keys"
        assert (cfg.keyring / "vendor.pub").read_bytes() == key.read_bytes()
        assert cfg.state_dir == session.mounts[Path("/data")] / "abupgrade"
        assert cfg.state_dir.is_dir()
        assert (session.boot / ON_DISK_PATH).is_file()
        assert os.statvfs(session.boot).f_bsize == 4096
        state = bootloader_of(cfg).read()
        assert state.default is Slot.A and state.trial is None
        boot_dev = session.disk.partitions[result.boot_partition]
        probed = subprocess.run(["blkid", "-p", "-o", "export", str(boot_dev)],
                                capture_output=True, text=True, check=True).stdout
        assert "LABEL=boot" in probed.splitlines() and "TYPE=ext4" in probed.splitlines()


def test_refusals(tmp_path: Path) -> None:
    prerequisites(BootloaderKind.SYSLINUX)
    image = tmp_path / "disk.img"
    args: dict[str, Any] = dict(size=192 * MiB, slot_size=SLOT, pubkeys=[],
                                compatible="acme-box", boot_size=BOOT)
    with pytest.raises(UsageError, match="needs"):
        init_disk(image, BootloaderKind.SYSLINUX, force=False, **{**args, "size": 64 * MiB})
    init_disk(image, BootloaderKind.SYSLINUX, force=False, **args)
    with pytest.raises(PolicyRefusal, match="already has a partition table") as err:
        init_disk(image, BootloaderKind.SYSLINUX, force=False, **args)
    assert err.value.exit_code == 4
    with attached(image) as disk:
        with pytest.raises(PolicyRefusal, match="attached"):
            init_disk(image, BootloaderKind.SYSLINUX, force=True, **args)
        with mounted(disk.partitions[1]), pytest.raises(PolicyRefusal, match="mounted"):
            init_disk(disk.device, BootloaderKind.SYSLINUX, force=True,
                      **{**args, "size": None})
    before = read_table(image)
    init_disk(image, BootloaderKind.SYSLINUX, force=True, **args)
    after = read_table(image)
    assert before is not None and after is not None and after.disk_id != before.disk_id


def test_open_disk_without_config(tmp_path: Path) -> None:
    prerequisites(BootloaderKind.SYSLINUX)
    image = tmp_path / "disk.img"
    init_disk(image, BootloaderKind.SYSLINUX, size=192 * MiB, slot_size=SLOT, force=False,
              pubkeys=[], compatible="acme-box", boot_size=BOOT)
    with attached(image) as disk, mounted(disk.partitions[1]) as boot:
        (boot / ON_DISK_PATH).unlink()
    with pytest.raises(UsageError, match="no abupgrade configuration"):
        with open_disk(image):
            pass
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    assert out.stdout == ""  # everything was undone
