"""GRUB on UEFI firmware: what the GRUB backend puts on the EFI system partition.

The ESP holds GRUB and a few lines that find the boot partition; grub.cfg, the two env
blocks and the slots' kernels stay on the ext4 boot partition, exactly as for BIOS, so the
N-tries protocol and its power-cut proof are the same. abupgrade writes the ESP only when
it lays out a disk: no update, trial, commit or rollback ever touches FAT.

The ESP's config finds the boot partition by its filesystem UUID (never as "the first
disk": firmware numbers disks as it finds them), exports it as `abupgrade_boot` ("hd0,gpt2")
and its disk as `abupgrade_disk` ("hd0"), and runs the boot partition's grub.cfg, which names
the env blocks `($abupgrade_boot)/grub/grubenv` and the slots `($abupgrade_disk,gpt3)`. The
names are outside grub.cfg's own `ab_` variables (`ab_boot` there is the slot to boot), and
exported, so menu entries, which run in a context of their own, see them.

- Own GRUB (no Secure Boot): `grub-mkimage -O x86_64-efi` (package grub-efi-amd64-bin)
  with every module grub.cfg uses built in, as `\\EFI\\BOOT\\BOOTX64.EFI` (the removable-media
  path every UEFI firmware boots without a boot entry); its config `\\EFI\\BOOT\\grub.cfg`.
- Secure Boot: Debian's shim, signed by Microsoft (shim-signed), as `\\EFI\\BOOT\\BOOTX64.EFI`;
  beside it Debian's signed GRUB (grub-efi-amd64-signed) as `grubx64.efi`, where shim looks
  for it, and MokManager (`mmx64.efi`). The signed GRUB has its modules built in and cannot
  load others; its built-in prefix is `/EFI/debian`, so the config is
  `\\EFI\\debian\\grub.cfg` (when that folder is missing it would search every disk for a
  Debian installer first). No `fbx64.efi`: shim's fallback would write boot entries and
  reset. The kernels a slot boots must be signed by a key shim trusts (Debian's, or one
  enrolled with mokutil): GRUB refuses any other, and the trial falls back like any trial
  that does not boot.
"""

from __future__ import annotations

import re
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from abupgrade.bootloader.base import DiskLayout
from abupgrade.errors import OperationalError, UsageError
from abupgrade.fat import Fat, kernel_has_vfat, open_fat
from abupgrade.run import require_tool, run

# FAT32 needs 65525 clusters (33 MiB with 512-byte sectors); room for GRUB or the signed
# chain (about 4 MiB) many times over.
ESP_SIZE = 128 << 20
EFI_LIB = Path("/usr/lib/grub/x86_64-efi")
# What the ESP config and grub.cfg.in use, plus the disk and filesystem drivers.
EFI_MODULES = ("part_gpt", "part_msdos", "fat", "ext2", "search", "search_fs_uuid", "regexp",
               "configfile", "normal", "loadenv", "test", "echo", "linux", "gzio", "serial",
               "terminal", "sleep", "reboot")
REMOVABLE = PurePosixPath("EFI/BOOT/BOOTX64.EFI")
OWN_CONFIG = PurePosixPath("EFI/BOOT/grub.cfg")


@dataclass(frozen=True)
class SignedFile:
    source: Path
    package: str
    target: PurePosixPath


# Debian's Secure Boot chain and where on the ESP each file goes.
SIGNED = (
    SignedFile(Path("/usr/lib/shim/shimx64.efi.signed"), "shim-signed", REMOVABLE),
    SignedFile(Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
               "grub-efi-amd64-signed", PurePosixPath("EFI/BOOT/grubx64.efi")),
    SignedFile(Path("/usr/lib/shim/mmx64.efi.signed"), "shim-helpers-amd64-signed",
               PurePosixPath("EFI/BOOT/mmx64.efi")),
)
SIGNED_CONFIG = PurePosixPath("EFI/debian/grub.cfg")

# grub.cfg's names for the boot partition and a slot partition, from what the ESP config
# exports (ESP_CONFIG below); `EXPORTS` must never be assigned by grub.cfg itself.
EXPORTS = ("abupgrade_boot", "abupgrade_disk")
BOOT_DEVICE = "($abupgrade_boot)"


def slot_device(number: int) -> str:
    return f"($abupgrade_disk,gpt{number})"


ESP_CONFIG = """\
# abupgrade: find the boot partition (ext4, filesystem UUID below) and run its grub.cfg.
# Written by `abupgrade disk init`; the A/B state is on the boot partition, not here.
search --no-floppy --fs-uuid --set=abupgrade_boot {uuid}
if [ -z "$abupgrade_boot" ]; then
  echo "abupgrade: no boot partition with filesystem UUID {uuid}"
else
  regexp --set=1:abupgrade_disk '^(.*),[^,]*$' "$abupgrade_boot"
  export abupgrade_boot
  export abupgrade_disk
  configfile "($abupgrade_boot)/{cfg}"
fi
"""


def esp_config(boot_uuid: str, cfg_path: str) -> str:
    """The ESP's grub.cfg: find the filesystem `boot_uuid`, run `cfg_path` on it."""
    if not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                        boot_uuid):
        raise UsageError(f"{boot_uuid!r} is not a filesystem UUID GRUB can search for")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*", cfg_path):
        raise UsageError(f"grub.cfg path {cfg_path!r} cannot be written into the ESP config")
    return ESP_CONFIG.format(uuid=boot_uuid, cfg=cfg_path)


def ext_uuid(device: Path, offset: int = 0) -> str:
    """The filesystem UUID of the ext2/3/4 on `device` (`offset` bytes in), read from its
    superblock."""
    try:
        with open(device, "rb") as f:
            f.seek(offset + 1024)
            superblock = f.read(1024)
    except OSError as exc:
        raise OperationalError(f"cannot read {device}: {exc.strerror}") from None
    if len(superblock) < 0x78 or superblock[0x38:0x3A] != b"\x53\xef":
        raise UsageError(f"{device} holds no ext2/3/4 filesystem")
    return str(uuid.UUID(bytes=superblock[0x68:0x78]))


def require(*, secure_boot: bool) -> None:
    """What laying out a UEFI disk needs on this machine, checked before the disk is touched:
    the GRUB to install, mkfs.fat, and mtools where the kernel cannot mount vfat."""
    if secure_boot:
        signed_files()
    else:
        _mkimage()
    require_tool("mkfs.fat", package="dosfstools")
    if not kernel_has_vfat():
        require_tool("mcopy", package="mtools")


def _mkimage() -> str:
    """grub-mkimage, with GRUB's x86_64-efi modules to build from."""
    if not (EFI_LIB / "kernel.img").is_file():
        raise OperationalError(f"{EFI_LIB} is missing", hint="apt-get install grub-efi-amd64-bin")
    return require_tool("grub-mkimage", package="grub-common")


def own_image(out: Path) -> Path:
    """GRUB for x86_64 UEFI at `out`, modules built in, prefix \\EFI\\BOOT."""
    run([_mkimage(), "-O", "x86_64-efi", "-d", EFI_LIB, "-p", f"/{OWN_CONFIG.parent}",
         "-o", out, *EFI_MODULES], timeout=120)
    return out


def signed_files() -> tuple[SignedFile, ...]:
    """Debian's signed boot chain on this machine, or a usage error naming what is missing."""
    missing = sorted({f.package for f in SIGNED if not f.source.is_file()})
    if missing:
        raise UsageError("Secure Boot needs Debian's signed shim and GRUB",
                         hint=f"apt-get install {' '.join(missing)}")
    return SIGNED


def install(layout: DiskLayout, *, cfg_path: str) -> None:
    """GRUB for UEFI onto the layout's fresh ESP, Secure Boot chain if the layout's platform
    has it, with a config that runs `cfg_path` of the layout's boot filesystem."""
    boot_uuid = ext_uuid(layout.partitions[layout.boot_partition])
    with tempfile.TemporaryDirectory(prefix="abupgrade-efi-") as scratch, \
            open_fat(layout.esp) as esp:
        install_esp(esp, boot_uuid=boot_uuid, cfg_path=cfg_path,
                    secure_boot=layout.platform.secure_boot, scratch=Path(scratch))


def install_esp(esp: Fat, *, boot_uuid: str, cfg_path: str, secure_boot: bool,
                scratch: Path) -> None:
    """GRUB for UEFI onto the (freshly made) ESP: own GRUB, or the signed chain with
    `secure_boot`; its config finds the boot filesystem `boot_uuid` and runs `cfg_path`
    there. `scratch` is a folder for the GRUB image while it is built."""
    config = esp_config(boot_uuid, cfg_path).encode()
    esp.mkdir(REMOVABLE.parent)
    if secure_boot:
        for item in signed_files():
            esp.copy_in(item.target, item.source)
        esp.mkdir(SIGNED_CONFIG.parent)
        esp.write(SIGNED_CONFIG, config)
    else:
        esp.copy_in(REMOVABLE, own_image(scratch / "BOOTX64.EFI"))
        esp.write(OWN_CONFIG, config)


def authenticode_signed(kernel: bytes) -> bool:
    """Whether `kernel` is a PE image (an x86 Linux bzImage is one) that carries an
    Authenticode signature (a PKCS#7 WIN_CERTIFICATE in its certificate table). Whether shim
    trusts the signer is for shim to say at boot; a kernel with no signature at all cannot
    boot under Secure Boot."""
    try:
        if kernel[:2] != b"MZ":
            return False
        (pe,) = struct.unpack_from("<I", kernel, 0x3C)
        if kernel[pe:pe + 4] != b"PE\0\0":
            return False
        optional = pe + 24
        (magic,) = struct.unpack_from("<H", kernel, optional)
        count_at, directories = {0x10B: (92, 96), 0x20B: (108, 112)}[magic]
        (count,) = struct.unpack_from("<I", kernel, optional + count_at)
        if count <= 4:
            return False
        offset, size = struct.unpack_from("<II", kernel, optional + directories + 4 * 8)
        if size < 8 or offset + size > len(kernel):
            return False
        length, _revision, kind = struct.unpack_from("<IHH", kernel, offset)
        return bool(kind == 0x0002 and 8 < length <= size)  # WIN_CERT_TYPE_PKCS_SIGNED_DATA
    except (struct.error, KeyError):
        return False

