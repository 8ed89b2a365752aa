"""The interface every bootloader backend implements, and the guide for writing one.

Vocabulary (as `read()` reports it in a `BootState`):
- the *default* slot is the committed one: what boots when no trial is pending;
- a slot is *bootable* when the bootloader may pick it (as default, trial or fallback): its
  entry is enabled and the files it boots are in place;
- a *trial* is a slot the bootloader boots for up to `tries_left` more boots before it goes
  back to the default on its own; a trial with no boots left is over (`trial` None).

Power cuts. The bootloader reads the disk the way firmware does: no journal replay, no page
cache, only the bytes that reached the medium. Every method that changes state therefore
changes it in one durable step, or in steps ordered so that after a cut between any two of
them (or in the middle of one) the bootloader boots a good slot: either the old or the new
state, never one that names a slot whose files are half-written or missing. That means:
- files the bootloader reads are written in place with a layout that never moves (GRUB's
  env blocks, syslinux's ADV) or replaced atomically (temp file, fsync, rename, fsync dir);
- a trial is armed only after what it boots is complete, and it is disarmed before a slot
  is written (`disable` is called before the first byte of a slot changes);
- prove it from the bootloader's side: a model of how the real bootloader reads the disk,
  cut at every write, and one real boot story in QEMU (see the tests of grub and syslinux).

What `read()` must report is the state the bootloader will act on at the next boot, as it
will read it, never what abupgrade meant to write; it never changes anything. A backend
whose bootloader cannot write its own state (U-Boot without a writable env, an ESP the
firmware mounts read-only) may later get a hook to repair at boot what the bootloader could
not record; `read()` stays side-effect free so that such a hook can compare and repair.

Writing a new backend (`abupgrade/bootloader/<name>.py`, plus one line in the registry,
`BootloaderKind` in bootloader/__init__.py):
- a settings table: a frozen dataclass deriving from `schema.Table` with the backend's
  `[<name>]` keys and their defaults (the config parses, checks, renders and rebases it);
- a `Bootloader` subclass named by the module's `BACKEND`, with `name`, `settings_type`,
  `requires_boot_files`, `platforms`, and the abstract methods below;
- `plan` (the partition table `disk init` makes for it) and `new_settings` (the table
  `disk init` writes into the disk's configuration); `install` puts the bootloader on it;
- `trial_boots` (how many boots `apply` gives a trial) and, where users must know it,
  `notes` for `status`.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, ClassVar

from abupgrade.errors import UsageError
from abupgrade.fsutil import atomic_writer, remove
from abupgrade.image.manifest import BOOT_NAMES
from abupgrade.model import Slot
from abupgrade.mounts import MOUNTINFO, point_holding
from abupgrade.partitions import LINUX_FS, MBR_LINUX, PartitionSpec, PartitionTable, TableKind
from abupgrade.schema import Table

# Boot files (manifest.BOOT_NAMES) as they are named on the boot filesystem.
BOOT_FILES: Mapping[str, str] = dict(zip(BOOT_NAMES, ("vmlinuz", "initrd.img"), strict=True))

SLOT_NAMES = {Slot.A: "rootfs_a", Slot.B: "rootfs_b"}  # GPT partition names of the slots
KERNEL_CMDLINE = "console=ttyS0 panic=5"  # what disk init gives the kernels besides root=
BOOT_POINT = Path("/boot")  # where the configuration names the boot filesystem
DATA_POINT = Path("/data")  # ... and the data partition (the state folder)


def boot_file(folder: Path, slot: Slot, name: str) -> Path:
    """`folder/slots/<slot>/<file>`: where the backends that keep a folder of boot files per
    slot put the boot file `name` ("kernel" or "initrd")."""
    try:
        return folder / "slots" / slot.value / BOOT_FILES[name]
    except KeyError:
        raise ValueError(f"unknown boot file {name!r}; known: {', '.join(BOOT_FILES)}") from None


@dataclass(frozen=True)
class BootState:
    """The bootloader's view: its default, what it may boot, the trial and its tries."""

    default: Slot
    bootable: frozenset[Slot]
    trial: Slot | None = None
    tries_left: int = 0

    @property
    def next_boot(self) -> Slot:
        if self.trial is not None and self.tries_left > 0:
            return self.trial
        return self.default

    @classmethod
    def of(cls, default: Slot, good: frozenset[Slot], trial: Slot | None,
           tries_left: int) -> BootState:
        """What a selection that boots `default` if it is good, else the other slot if
        that one is, and a trial while it has boots left, does (grub.cfg, boot.scr)."""
        if default not in good and default.other in good:
            default = default.other
        bootable = set(good) | ({trial} if trial is not None and tries_left > 0 else set())
        return cls(default, frozenset(bootable), trial, tries_left if trial is not None else 0)


# ---------------------------------------------------------------- disks a backend boots


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class Arch(enum.StrEnum):
    AMD64 = "amd64"
    ARM64 = "arm64"


@dataclass(frozen=True)
class Platform:
    """What `disk init` is asked to make the disk boot on."""

    firmware: Firmware = Firmware.BIOS
    arch: Arch = Arch.AMD64
    secure_boot: bool = False

    def __str__(self) -> str:
        return f"{self.firmware}/{self.arch}" + (" with Secure Boot" if self.secure_boot else "")


class Role(enum.StrEnum):
    """What a partition of a planned disk is for."""

    BOOT = "boot"  # ext4 made by disk init: configuration, keyring, the backend's files
    SLOT_A = "slot-A"
    SLOT_B = "slot-B"
    DATA = "data"  # ext4 made by disk init, the rest of the disk: the state folder
    FIRMWARE = "firmware"  # what firmware or bootloader needs besides (bios_grub); install fills it
    ESP = "esp"  # the EFI system partition: FAT32 made by disk init; install writes it (abupgrade.fat)

    @classmethod
    def of(cls, slot: Slot) -> Role:
        return cls.SLOT_A if slot is Slot.A else cls.SLOT_B


@dataclass(frozen=True)
class PlannedPartition:
    """One partition of a DiskPlan: its role, its spec and where it is mounted."""

    role: Role
    spec: PartitionSpec
    mount: Path | None = None  # where the configuration names it mounted (boot and data)


@dataclass(frozen=True)
class DiskPlan:
    """The partition table a backend needs for `platform`; partitions are numbered from 1
    in this order."""

    table: TableKind
    partitions: tuple[PlannedPartition, ...]
    disk_id: str | None = None  # the table's id (GPT disk GUID), when the backend needs it
    platform: Platform = field(default_factory=Platform)

    @classmethod
    def ab(cls, table: TableKind, *, slot_size: int, boot_size: int, boot_bootable: bool = False,
           before: tuple[PlannedPartition, ...] = (), disk_id: str | None = None,
           platform: Platform | None = None) -> DiskPlan:
        """`before`, then boot, slot A, slot B and data (the rest): on GPT named boot,
        rootfs_a, rootfs_b and data, on MBR of type 83."""
        gpt = table is TableKind.GPT
        kind = LINUX_FS if gpt else MBR_LINUX

        def part(role: Role, size: int | None, name: str, mount: Path | None = None,
                 bootable: bool = False) -> PlannedPartition:
            return PlannedPartition(role, PartitionSpec(size, kind, name if gpt else None,
                                                        bootable), mount)

        return cls(table, (*before,
                           part(Role.BOOT, boot_size, "boot", BOOT_POINT, boot_bootable),
                           part(Role.SLOT_A, slot_size, SLOT_NAMES[Slot.A]),
                           part(Role.SLOT_B, slot_size, SLOT_NAMES[Slot.B]),
                           part(Role.DATA, None, "data", DATA_POINT)),
                   disk_id, platform or Platform())

    def has(self, role: Role) -> bool:
        return any(part.role is role for part in self.partitions)

    def number(self, role: Role) -> int:
        for number, part in enumerate(self.partitions, start=1):
            if part.role is role:
                return number
        raise KeyError(role)

    def mount(self, role: Role) -> Path:
        found = self.partitions[self.number(role) - 1].mount
        if found is None:
            raise KeyError(role)
        return found

    def device_spec(self, role: Role, table: PartitionTable) -> str:
        """How the configuration names the partition: PARTLABEL= where it has a name, else
        its PARTUUID= as `table` (the table written) says."""
        number = self.number(role)
        name = self.partitions[number - 1].spec.name
        return f"PARTLABEL={name}" if name else f"PARTUUID={table.get(number).partuuid}"


@dataclass(frozen=True)
class DiskLayout:
    """What `disk init` made, handed to a backend's `install`.

    `boot_root` is the boot filesystem, mounted (the backend's settings are rebased onto
    it); `disk` is the whole disk (block device or image file); `boot_partition` is the boot
    partition's number on it; `slot_partitions` the slots' partition numbers (GRUB needs them
    for `(hd0,gptN)`); `slot_roots` the device specs the kernel gets as `root=`;
    `partitions` every partition's block device; `esp` the EFI system partition, if any.
    """

    disk: Path
    boot_root: Path
    boot_partition: int
    slot_partitions: Mapping[Slot, int]
    slot_roots: Mapping[Slot, str]
    kernel_cmdline: str = KERNEL_CMDLINE
    platform: Platform = field(default_factory=Platform)
    partitions: Mapping[int, Path] = field(default_factory=dict)  # number -> block device
    esp_partition: int | None = None  # the plan's Role.ESP, made FAT32 and empty

    @property
    def esp(self) -> Path:
        """The EFI system partition's block device; a UsageError when the plan has none."""
        if self.esp_partition is None or self.esp_partition not in self.partitions:
            raise UsageError(f"{self.disk} has no EFI system partition",
                             hint="lay the disk out with `abupgrade disk init --firmware uefi`")
        return self.partitions[self.esp_partition]

    def on_boot_fs(self, path: Path, what: str) -> PurePosixPath:
        """Where `path` (a backend's file on the mounted disk) is inside the boot filesystem;
        a UsageError when it is not on it."""
        if point_holding(path, (self.boot_root,)) is None:
            raise UsageError(f"{what} {path} is not on the boot partition",
                             hint=f"put it under the boot partition's mount point ({BOOT_POINT})")
        return PurePosixPath(path.relative_to(self.boot_root).as_posix())


# ---------------------------------------------------------------- the interface


class Bootloader(abc.ABC):
    name: ClassVar[str]  # the registry's name of it (the config's `bootloader`)
    settings_type: ClassVar[type[Table]]  # its `[<name>]` table of the configuration
    # Boot files ("kernel", "initrd") an image must carry for this bootloader to boot it.
    requires_boot_files: ClassVar[tuple[str, ...]] = ()
    # What `install` can make a disk boot on.
    platforms: ClassVar[tuple[Platform, ...]] = (Platform(),)

    def __init__(self, settings: Table, *, mountinfo: Path = MOUNTINFO) -> None:
        if not isinstance(settings, self.settings_type):
            raise TypeError(f"{self.name} takes {self.settings_type.__name__}, "
                            f"not {type(settings).__name__}")
        self.settings = settings
        self.mountinfo = mountinfo  # where preflight looks up the filesystems its state is on

    # -- disk init

    @classmethod
    @abc.abstractmethod
    def plan(cls, platform: Platform, *, slot_size: int, boot_size: int) -> DiskPlan:
        """The partition table `disk init` lays out for this bootloader on `platform`;
        a UsageError for a platform it cannot boot (see `require_platform`)."""

    @classmethod
    @abc.abstractmethod
    def new_settings(cls, plan: DiskPlan) -> Table:
        """The settings `disk init` writes into the configuration of a disk laid out by `plan`."""

    @classmethod
    def require_platform(cls, platform: Platform) -> None:
        if platform not in cls.platforms:
            raise UsageError(f"{cls.name} cannot boot {platform}",
                             hint=f"{cls.name} boots {', '.join(map(str, cls.platforms))}")

    @abc.abstractmethod
    def install(self, layout: DiskLayout) -> None:
        """`disk init`: install the bootloader, its configuration and a fresh state in which
        slot A is the default and nothing is bootable but A (once A has its boot files)."""

    # -- the running machine

    @abc.abstractmethod
    def preflight(self) -> None:
        """Refuse (UsageError, exit 2, with a hint) storage the state cannot be kept on safely."""

    @abc.abstractmethod
    def read(self) -> BootState:
        """The state as the bootloader will see it on the next boot; changes nothing."""

    @abc.abstractmethod
    def disable(self, slot: Slot) -> None:
        """Make `slot` unbootable: not trial, not fallback; if it is the default, the other
        (bootable) slot becomes the default. Called before a slot is written; refuses
        (PolicyRefusal) to leave nothing bootable."""

    @abc.abstractmethod
    def arm_trial(self, slot: Slot, tries: int) -> None:
        """Boot `slot` for up to `tries` boots (as many as the bootloader can count), then
        the default again. Called only once `slot` is complete."""

    @abc.abstractmethod
    def commit(self, slot: Slot) -> None:
        """`slot` becomes the bootable default; any trial is cleared."""

    @abc.abstractmethod
    def boot_file_path(self, slot: Slot, name: str) -> Path:
        """Where the boot file `name` ("kernel" or "initrd") of `slot` lives; abupgrade
        writes it there atomically before the slot is armed."""

    def problems(self) -> list[str]:
        """What is wrong with the bootloader's state that it cannot fix itself (damaged
        copies of it, for example); each a sentence for `status`."""
        return []

    def repair(self) -> list[str]:
        """Rewrite what `problems` finds and can be rewritten safely; what was done."""
        return []

    @contextlib.contextmanager
    def boot_file_writer(self, slot: Slot, name: str) -> Iterator[BinaryIO]:
        """A file to stream the boot file `name` of `slot` into: it takes its place when the
        block ends without an error, and nothing changes otherwise. By default a temporary
        file beside `boot_file_path`, renamed onto it; a backend that keeps its boot files
        where abupgrade cannot simply open them (a FAT partition) writes them itself."""
        path = self.boot_file_path(slot, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path, boot=True) as out:
            yield out

    def drop_boot_files(self, slot: Slot) -> None:
        """Remove `slot`'s boot files (before the slot is written, or after its install
        failed): none may be left for a slot that is not complete."""
        for name in BOOT_NAMES:
            remove(self.boot_file_path(slot, name), boot=True)

    @abc.abstractmethod
    def trial_boots(self) -> int:
        """How many boots `apply` gives a trial (from the settings, or what the bootloader
        can do at all)."""

    def notes(self) -> tuple[str, ...]:
        """What `status` should tell about this bootloader's behaviour."""
        return ()

    def counters(self) -> Mapping[str, object]:
        """The bootloader's own boot-counting state, for `status --json` under the
        bootloader's name (U-Boot's bootcount, bootlimit, ...); empty when it has none."""
        return {}

    def platform(self) -> Platform:
        """What the disk boots on (`status` reports its firmware): the backend's only
        platform unless its settings say which."""
        return self.platforms[0]

    def check_boot_files(self, slot: Slot) -> None:  # noqa: B027 - a hook, empty by default
        """Refuse (PolicyRefusal) boot files just written for `slot` that the bootloader
        will not boot, before the slot can be armed. Nothing to check by default."""
