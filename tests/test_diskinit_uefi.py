"""`disk init --firmware uefi [--secure-boot]` with GRUB on image files: the partition table,
the ESP as firmware reads it (FAT32, through mtools), the boot partition it points at, the
configuration and `status`; and Secure Boot's refusal of an unsigned kernel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from abupgrade.bootloader import BootloaderKind, grub_efi
from abupgrade.bootloader.base import Firmware, Platform
from abupgrade.disk import open_disk
from abupgrade.diskinit import init_disk
from abupgrade.errors import UsageError
from abupgrade.fat import MtoolsFat
from abupgrade.partitions import EFI_SYSTEM, read_table
from fixtures.guest import guest_kernel
from fixtures.images import KeyPair, keypair, rootfs_image, signed_image
from fixtures.machine import run_cli
from fixtures.tiers import needs

pytestmark = pytest.mark.loop

MiB = 1 << 20
TOOLS = ["grub-mkimage", "mkfs.fat", "mcopy"]


def init(tmp_path: Path, *, secure_boot: bool, name: str = "disk.img") -> Path:
    needs(loop=True, tools=TOOLS)
    image = tmp_path / name
    init_disk(image, BootloaderKind.GRUB, size=512 * MiB, slot_size=64 * MiB, force=False,
              pubkeys=[], compatible="acme-box", boot_size=32 * MiB,
              platform=Platform(Firmware.UEFI, secure_boot=secure_boot))
    return image


def esp_and_boot(image: Path) -> tuple[MtoolsFat, str]:
    """The ESP of `image` (for a `with`) and the boot filesystem's UUID."""
    table = read_table(image)
    assert table is not None
    esp, boot = table.get(1), table.get(2)
    assert esp.type == EFI_SYSTEM and esp.name == "esp" and boot.name == "boot"
    return MtoolsFat(image, esp.start), grub_efi.ext_uuid(image, boot.start)


@pytest.mark.parametrize("secure_boot", [False, True], ids=["own-grub", "secure-boot"])
def test_the_esp_finds_the_boot_partition(tmp_path: Path, secure_boot: bool) -> None:
    if secure_boot:
        missing = sorted({f.package for f in grub_efi.SIGNED if not f.source.is_file()})
        if missing:
            pytest.skip(f"missing packages: {', '.join(missing)} (run scripts/setup)")
    image = init(tmp_path, secure_boot=secure_boot)
    table = read_table(image)
    assert table is not None
    assert [p.name for p in table.partitions] == ["esp", "boot", "rootfs_a", "rootfs_b", "data"]
    assert table.get(1).size == grub_efi.ESP_SIZE
    fat, boot_uuid = esp_and_boot(image)
    with fat:
        config = fat.read(grub_efi.SIGNED_CONFIG if secure_boot else grub_efi.OWN_CONFIG)
        loader = fat.read(grub_efi.REMOVABLE)
    assert config.decode() == grub_efi.esp_config(boot_uuid, "grub/grub.cfg")
    shim = grub_efi.SIGNED[0].source
    assert (loader == shim.read_bytes()) is secure_boot
    assert loader[:2] == b"MZ"

    proc = run_cli("--disk", str(image), "--json", "status")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert (status["firmware"], status["secure_boot"]) == ("uefi", secure_boot)
    assert status["next_boot"] == "A"


def test_grub_cfg_names_what_the_esp_config_exports(tmp_path: Path) -> None:
    """grub.cfg on the boot partition uses ($abupgrade_boot) and ($abupgrade_disk,gptN), never hd0."""
    image = init(tmp_path, secure_boot=False)
    with open_disk(image, readonly=True) as session:
        cfg = (session.boot / "grub" / "grub.cfg").read_text()
        toml = (session.boot / "abupgrade" / "system.toml").read_text()
    assert "hd0" not in cfg
    assert 'ab_load "($abupgrade_boot)/grub/grubenv"' in cfg
    assert "($abupgrade_disk,gpt3)/boot/vmlinuz" in cfg and "($abupgrade_disk,gpt4)/boot/vmlinuz" in cfg
    assert re.search(r'^firmware = "uefi"$', toml, re.M), toml
    assert not (session.boot / "grub" / "i386-pc").exists()


def test_bios_stays_the_default(tmp_path: Path) -> None:
    needs(loop=True, tools=TOOLS)
    image = tmp_path / "bios.img"
    proc = run_cli("disk", "init", str(image), "--bootloader", "grub", "--size", "512M",
                   "--slot-size", "64M", "--compatible", "acme-box")
    assert proc.returncode == 0, proc.stderr
    table = read_table(image)
    assert table is not None and table.get(1).name == "bios"
    proc = run_cli("--disk", str(image), "--json", "status")
    assert json.loads(proc.stdout)["firmware"] == "bios", proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--bootloader", "grub", "--firmware", "bios", "--secure-boot"], "needs --firmware uefi"),
    (["--bootloader", "syslinux", "--firmware", "uefi"], "syslinux cannot boot uefi"),
    (["--bootloader", "syslinux", "--secure-boot"], "syslinux cannot boot uefi"),
])
def test_platforms_a_backend_cannot_boot_are_usage_errors(tmp_path: Path, args: list[str],
                                                         message: str) -> None:
    image = tmp_path / "x.img"
    proc = run_cli("disk", "init", str(image), *args, "--size", "512M", "--slot-size", "64M",
                   "--compatible", "acme-box")
    assert proc.returncode == UsageError.exit_code, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not image.exists()


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return keypair(tmp_path_factory.mktemp("sb-keys"))


def test_secure_boot_refuses_a_kernel_without_signature(tmp_path: Path,
                                                       signer: KeyPair) -> None:
    """An image whose kernel is not signed is refused before its slot can be armed (exit 4);
    one with Debian's signed kernel is armed."""
    missing = sorted({f.package for f in grub_efi.SIGNED if not f.source.is_file()})
    if missing:
        pytest.skip(f"missing packages: {', '.join(missing)} (run scripts/setup)")
    needs(loop=True, tools=TOOLS)
    image = tmp_path / "sb.img"
    proc = run_cli("disk", "init", str(image), "--bootloader", "grub", "--secure-boot",
                   "--size", "768M", "--slot-size", "64M", "--compatible", "acme-box",
                   "--pubkey", str(signer.public))
    assert proc.returncode == 0, proc.stderr
    rootfs = rootfs_image(tmp_path / "rootfs.ext4", tag="2.0")
    unsigned = tmp_path / "vmlinuz-unsigned"
    unsigned.write_bytes(b"MZ" + bytes(1 << 16))
    bad = signed_image(tmp_path / "bad.tar", rootfs, signer, version="2.0",
                       compatible="acme-box", kernel=unsigned)
    proc = run_cli("--disk", str(image), "apply", str(bad))
    assert proc.returncode == 4, proc.stderr
    assert "no Secure Boot signature" in proc.stderr, proc.stderr
    status = json.loads(run_cli("--disk", str(image), "--json", "status").stdout)
    assert status["trial"] is None and status["slots"]["B"]["state"] == "empty", status
    history = json.loads(run_cli("--disk", str(image), "--json", "history").stdout)
    assert history[-1]["event"] == "install-failed", history

    good = signed_image(tmp_path / "good.tar", rootfs, signer, version="2.0",
                        compatible="acme-box", kernel=guest_kernel())
    proc = run_cli("--disk", str(image), "--json", "apply", str(good))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(run_cli("--disk", str(image), "--json", "status").stdout)["trial"] == "B"


def test_missing_signed_chain_is_refused_before_the_disk_is_touched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grub_efi, "SIGNED", tuple(
        grub_efi.SignedFile(tmp_path / "absent" / f.source.name, f.package, f.target)
        for f in grub_efi.SIGNED))
    image = tmp_path / "disk.img"
    image.write_bytes(b"precious" * 1000)
    with pytest.raises(UsageError, match="signed shim and GRUB"):
        init_disk(image, BootloaderKind.GRUB, size=None, slot_size=64 * MiB, force=True,
                  pubkeys=[], compatible="acme-box", boot_size=32 * MiB,
                  platform=Platform(Firmware.UEFI, secure_boot=True))
    assert image.read_bytes() == b"precious" * 1000
