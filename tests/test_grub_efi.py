"""What the GRUB backend puts on an EFI system partition, read back from a real FAT32
(mkfs.fat + mtools). Booting it is tests/test_uefi_boot.py's job."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path, PurePosixPath

import pytest

from abupgrade.bootloader import grub_efi
from abupgrade.bootloader.grub import render_cfg
from abupgrade.errors import UsageError
from abupgrade.fat import MtoolsFat, mkfs_fat32
from abupgrade.model import Slot

MiB = 1 << 20
BOOT_UUID = "0b9c3c5e-8f0e-4a52-9d39-0a4f2c7f1e11"


@pytest.fixture
def esp(tmp_path: Path) -> Path:
    missing = [t for t in ("mkfs.fat", "mcopy", "grub-mkimage") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (run scripts/setup)")
    image = tmp_path / "esp.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    mkfs_fat32(image, label="ESP")
    return image


def test_own_grub_and_its_config(esp: Path, tmp_path: Path) -> None:
    if not (grub_efi.EFI_LIB / "kernel.img").is_file():
        pytest.skip(f"{grub_efi.EFI_LIB} is missing (grub-efi-amd64-bin; run scripts/setup)")
    with MtoolsFat(esp) as fat:
        grub_efi.install_esp(fat, boot_uuid=BOOT_UUID, cfg_path="grub/grub.cfg",
                             secure_boot=False, scratch=tmp_path)
        image = fat.read("EFI/BOOT/BOOTX64.EFI")
        config = fat.read("EFI/BOOT/grub.cfg").decode()
        assert [e.name for e in fat.list("EFI")] == ["BOOT"]
    assert image[:2] == b"MZ" and b"PE\0\0" in image[:512]  # an EFI application
    for module in ("loadenv", "regexp", "search_fs_uuid", "ext2", "part_gpt"):
        assert module.encode() in image, f"{module} is not built into GRUB"
    assert f"search --no-floppy --fs-uuid --set=abupgrade_boot {BOOT_UUID}" in config
    assert 'configfile "($abupgrade_boot)/grub/grub.cfg"' in config
    assert "export abupgrade_boot" in config and "export abupgrade_disk" in config


def test_secure_boot_chain_is_debians_signed_files(esp: Path, tmp_path: Path) -> None:
    missing = [f.package for f in grub_efi.SIGNED if not f.source.is_file()]
    if missing:
        pytest.skip(f"missing packages: {', '.join(missing)} (run scripts/setup)")
    with MtoolsFat(esp) as fat:
        grub_efi.install_esp(fat, boot_uuid=BOOT_UUID, cfg_path="grub/grub.cfg",
                             secure_boot=True, scratch=tmp_path)
        for item in grub_efi.SIGNED:
            assert fat.read(item.target) == item.source.read_bytes(), item.target
        assert sorted(e.name.upper() for e in fat.list("EFI/BOOT")) == \
            ["BOOTX64.EFI", "GRUBX64.EFI", "MMX64.EFI"]  # no fbx64.efi, no own GRUB
        config = fat.read("EFI/debian/grub.cfg").decode()
    assert config == grub_efi.esp_config(BOOT_UUID, "grub/grub.cfg")
    # The signed GRUB reads its config from its built-in prefix, /EFI/debian.
    signed_grub = grub_efi.SIGNED[1].source.read_bytes()
    assert b"/EFI/debian" in signed_grub
    assert PurePosixPath("/EFI/debian") == PurePosixPath("/") / grub_efi.SIGNED_CONFIG.parent


def test_secure_boot_without_the_packages_names_them(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(grub_efi, "SIGNED", tuple(
        grub_efi.SignedFile(tmp_path / "absent" / f.source.name, f.package, f.target)
        for f in grub_efi.SIGNED))
    with pytest.raises(UsageError) as raised:
        grub_efi.signed_files()
    assert raised.value.hint is not None
    for package in ("shim-signed", "grub-efi-amd64-signed", "shim-helpers-amd64-signed"):
        assert package in raised.value.hint


@pytest.mark.parametrize("bad_uuid", ["", "ABC", "0b9c3c5e-8f0e-4a52-9d39-0a4f2c7f1e1",
                                      "0b9c3c5e-8f0e-4a52-9d39-0a4f2c7f1e11; reboot"])
def test_esp_config_refuses_what_is_not_a_uuid(bad_uuid: str) -> None:
    with pytest.raises(UsageError):
        grub_efi.esp_config(bad_uuid, "grub/grub.cfg")


@pytest.mark.parametrize("bad_path", ["", "/grub/grub.cfg", "grub/grub cfg", 'a"b', "a/../b$x"])
def test_esp_config_refuses_paths_grub_would_misread(bad_path: str) -> None:
    with pytest.raises(UsageError):
        grub_efi.esp_config(BOOT_UUID, bad_path)


def test_ext_uuid_reads_the_superblock(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("missing tool: mkfs.ext4 (run scripts/setup)")
    wanted = str(uuid.uuid4())
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(40 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", wanted, "-E", f"offset={8 * MiB}",
                    str(image), "16M"], check=True)
    assert grub_efi.ext_uuid(image, 8 * MiB) == wanted
    with pytest.raises(UsageError):
        grub_efi.ext_uuid(image)  # no filesystem at the start


def test_authenticode_signature_of_kernels(tmp_path: Path) -> None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.skip("no /boot/vmlinuz-* (install linux-image-amd64; run scripts/setup)")
    signed = kernels[-1].read_bytes()  # Debian's kernels are signed for Secure Boot
    assert grub_efi.authenticode_signed(signed)
    # The same kernel with its certificate table emptied, truncated, or not a PE at all.
    pe = int.from_bytes(signed[0x3C:0x40], "little")
    entry = pe + 24 + 112 + 4 * 8  # PE32+: data directory 4, the certificate table
    stripped = signed[:entry] + bytes(8) + signed[entry + 8:]
    assert not grub_efi.authenticode_signed(stripped)
    offset = int.from_bytes(signed[entry:entry + 4], "little")
    assert not grub_efi.authenticode_signed(signed[:offset])
    assert not grub_efi.authenticode_signed(b"\x7fELF" + signed[4:])
    assert not grub_efi.authenticode_signed(b"MZ")


def test_grub_cfg_never_assigns_what_the_esp_config_exports() -> None:
    """grub.cfg runs after the ESP config: a variable it sets under one of the exported names
    would point the env blocks or the kernels elsewhere (the template's own `ab_boot`, the slot
    to boot, once collided with the boot partition's name)."""
    cfg = render_cfg(boot_device=grub_efi.BOOT_DEVICE, env_rel="grub/grubenv",
                     parts={s: grub_efi.slot_device(n) for s, n in ((Slot.A, 3), (Slot.B, 4))},
                     roots={Slot.A: "PARTLABEL=rootfs_a", Slot.B: "PARTLABEL=rootfs_b"},
                     cmdline="console=ttyS0 panic=5")
    for name in grub_efi.EXPORTS:
        assert f"${name}" in cfg or f"${{{name}}}" in cfg, name  # it is used
        assigned = re.findall(rf"(?:^|[\s;]){name}=|--set=(?:\d:)?{name}\b|unset {name}\b|"
                              rf"(?:^|\s)function {name}\b", cfg, re.M)
        assert not assigned, f"grub.cfg assigns {name}: {assigned}"
    esp = grub_efi.esp_config(BOOT_UUID, "grub/grub.cfg")
    for name in grub_efi.EXPORTS:
        assert f"export {name}" in esp
