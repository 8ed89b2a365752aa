"""The syslinux/extlinux backend (BIOS, MBR disks, ext2/3/4 boot filesystem).

State lives in two places of `[syslinux] dir`:
- `extlinux.conf`: `DEFAULT` names the committed slot; each slot has a `LABEL a` / `LABEL b`
  stanza, renamed `LABEL b-disabled` while the slot must not boot (syslinux cannot find it by
  name then). The file is only ever replaced atomically (temp file, fsync, rename, fsync dir).
- the ADV of `ldlinux.sys` (see adv.py): a trial is its boot-once record naming the slot's
  label. Syslinux clears that record on disk *before* it loads the kernel, so a trial gets
  exactly one boot (`trial_boots()` is 1): a trial that panics, hangs or never reaches the boot hook
  comes back on the default slot at the next reset, whatever `[grub] tries` says.

`ONERROR reboot.c32` makes a kernel or initrd that fails to load reboot instead of waiting
at a prompt; the boot-once record is gone by then, so the reboot lands on the default slot.

Kernels and initrds live on the boot filesystem under `<dir>/slots/<A|B>/`; extlinux.conf
names them relative to its own folder, which syslinux 6 resolves from the config's folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from abupgrade import fsutil, mounts
from abupgrade.bootloader import adv
from abupgrade.bootloader.adv import Adv
from abupgrade.bootloader.base import (
    BOOT_POINT,
    Bootloader,
    BootState,
    DiskLayout,
    DiskPlan,
    Platform,
    Role,
    boot_file,
)
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.fsutil import atomic_write
from abupgrade.model import Slot
from abupgrade.partitions import TableKind
from abupgrade.run import require_tool, run
from abupgrade.schema import Table

CONFIG_NAME = "extlinux.conf"
LOADER_NAME = "ldlinux.sys"
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
MODULES_DIR = Path("/usr/lib/syslinux/modules/bios")
# ONERROR reboot.c32 needs these next to ldlinux.c32.
MODULES = ("reboot.c32", "libcom32.c32")
DISABLED = "-disabled"
MIN_BLOCK_SIZE = 4096


def label(slot: Slot) -> str:
    return slot.value.lower()


def slot_of_label(name: str) -> Slot | None:
    """The slot an enabled label names (`a`, `b`); None for anything else."""
    for slot in Slot:
        if name == label(slot):
            return slot
    return None


def relative_boot_file(slot: Slot, name: str) -> str:
    """A boot file's path relative to the folder of extlinux.conf."""
    return boot_file(Path(), slot, name).as_posix()


@dataclass(frozen=True)
class SyslinuxConfig(Table):
    """`[syslinux]`: the folder of extlinux.conf and ldlinux.sys (its ADV)."""

    dir: Path = BOOT_POINT / "extlinux"


@dataclass(frozen=True)
class ExtlinuxConf:
    """extlinux.conf as lines, with the few facts abupgrade reads and edits.

    Edits touch only the DEFAULT line and the slots' LABEL lines; everything else a user
    put in the file is kept as it is.
    """

    lines: tuple[str, ...]
    default: Slot
    enabled: frozenset[Slot]
    # Slots whose stanza has an INITRD line (so the initrd must exist too).
    with_initrd: frozenset[Slot]

    @classmethod
    def parse(cls, text: str, where: Path | str = CONFIG_NAME) -> ExtlinuxConf:
        default: Slot | None = None
        defaults = 0
        labels: dict[Slot, bool] = {}
        with_initrd: set[Slot] = set()
        current: Slot | None = None
        for line in text.splitlines():
            keyword, arg = _split(line)
            if keyword == "DEFAULT":
                defaults += 1
                default = slot_of_label(arg)
            elif keyword == "LABEL":
                current = _slot_of_any_label(arg)
                if current is not None:
                    if current in labels:
                        raise _broken(where, f"has two LABELs for slot {current}")
                    labels[current] = arg == label(current)
            elif keyword == "INITRD" and current is not None:
                with_initrd.add(current)
        missing = [s for s in Slot if s not in labels]
        if missing:
            raise _broken(where, f"has no LABEL {label(missing[0])} for slot {missing[0]}")
        if defaults != 1 or default is None or not labels[default]:
            raise _broken(where, "needs exactly one DEFAULT naming an enabled slot label "
                          f"({' or '.join(label(s) for s in Slot)})")
        return cls(tuple(text.splitlines()), default,
                   frozenset(s for s, on in labels.items() if on), frozenset(with_initrd))

    def with_default(self, slot: Slot) -> ExtlinuxConf:
        return replace(self, default=slot, enabled=self.enabled | {slot})

    def with_enabled(self, slot: Slot, enabled: bool) -> ExtlinuxConf:
        if not enabled and slot == self.default:
            raise ValueError(f"slot {slot} is the default and cannot be disabled")
        return replace(self, enabled=self.enabled | {slot} if enabled else self.enabled - {slot})

    def render(self) -> str:
        out: list[str] = []
        for line in self.lines:
            indent = line[: len(line) - len(line.lstrip())]
            keyword, arg = _split(line)
            slot = _slot_of_any_label(arg) if keyword == "LABEL" else None
            if keyword == "DEFAULT":
                line = f"{indent}DEFAULT {label(self.default)}"
            elif slot is not None:
                name = label(slot) if slot in self.enabled else label(slot) + DISABLED
                line = f"{indent}LABEL {name}"
            out.append(line)
        return "\n".join(out) + "\n"


def _split(line: str) -> tuple[str, str]:
    """(KEYWORD, argument) of a config line; syslinux keywords are case-insensitive."""
    words = line.split(None, 1)
    return (words[0].upper(), words[1].strip() if len(words) > 1 else "") if words else ("", "")


def _slot_of_any_label(name: str) -> Slot | None:
    """The slot a label names, enabled (`b`) or disabled (`b-disabled`); labels are
    case-sensitive to syslinux, so `B` is no slot's label."""
    return slot_of_label(name[: -len(DISABLED)] if name.endswith(DISABLED) else name)


def _broken(where: Path | str, what: str) -> OperationalError:
    return OperationalError(f"{where} {what}",
                            hint="restore the file `disk init` wrote, or fix it by hand")


def fresh_config(slot_roots: Mapping[Slot, str], kernel_cmdline: str) -> str:
    """extlinux.conf of a new disk: slot A is the default, B is disabled."""
    lines = [
        "# Managed by abupgrade: DEFAULT is the committed slot; a trial boot is the boot-once",
        "# record in the ADV of ldlinux.sys. A slot whose LABEL ends in -disabled cannot boot.",
        "SERIAL 0 115200",
        "PROMPT 0",
        "TIMEOUT 1",
        "ONERROR reboot.c32",
        f"DEFAULT {label(Slot.A)}",
    ]
    for slot in Slot:
        name = label(slot) if slot is Slot.A else label(slot) + DISABLED
        append = " ".join(p for p in (f"root={slot_roots[slot]}", kernel_cmdline,
                                      f"abupgrade.slot={slot.value}") if p)
        lines += [
            "",
            f"LABEL {name}",
            f"  LINUX {relative_boot_file(slot, 'kernel')}",
            f"  INITRD {relative_boot_file(slot, 'initrd')}",
            f"  APPEND {append}",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- planning (pure)


@dataclass(frozen=True)
class Snapshot:
    """Everything the next boot depends on: the config, the ADV, which boot files exist."""

    conf: ExtlinuxConf
    adv: Adv
    kernels: frozenset[Slot]
    initrds: frozenset[Slot]

    @property
    def bootable(self) -> frozenset[Slot]:
        return frozenset(s for s in self.conf.enabled if s in self.kernels
                         and (s in self.initrds or s not in self.conf.with_initrd))

    @property
    def once(self) -> Slot | None:
        """The slot the boot-once record names, whatever state its label is in."""
        return _slot_of_any_label(_once_label(self.adv))

    def state(self) -> BootState:
        # A record naming a disabled label or a slot without boot files makes syslinux fail
        # and reboot into the default: no trial, as far as the next boot goes.
        trial = slot_of_label(_once_label(self.adv))
        if trial not in self.bootable:
            trial = None
        return BootState(default=self.conf.default, bootable=self.bootable, trial=trial,
                         tries_left=1 if trial is not None else 0)


def _once_label(record: Adv) -> str:
    """The label a boot-once command line boots (its first word), or ""."""
    words = (record.once or "").split()
    return words[0] if words else ""


@dataclass(frozen=True)
class WriteConf:
    conf: ExtlinuxConf


@dataclass(frozen=True)
class WriteAdv:
    adv: Adv


Step = WriteConf | WriteAdv


def _require_boot_files(snap: Snapshot, slot: Slot, action: str) -> None:
    if slot not in snap.kernels or (slot in snap.conf.with_initrd and slot not in snap.initrds):
        raise OperationalError(f"cannot {action} slot {slot}: its kernel or initrd is missing",
                               hint="install an image into the slot first")


def plan_disable(snap: Snapshot, slot: Slot) -> list[Step]:
    steps: list[Step] = []
    if snap.once == slot:
        steps.append(WriteAdv(snap.adv.with_once(None)))
    conf = snap.conf
    if conf.default == slot:
        if slot.other not in snap.bootable:
            raise PolicyRefusal(f"cannot disable slot {slot}: slot {slot.other} cannot boot",
                                hint="the machine would be left without a bootable slot")
        conf = conf.with_default(slot.other)
    conf = conf.with_enabled(slot, False)
    if conf != snap.conf:
        steps.append(WriteConf(conf))
    return steps


def plan_arm_trial(snap: Snapshot, slot: Slot) -> list[Step]:
    _require_boot_files(snap, slot, "try")
    steps: list[Step] = []
    conf = snap.conf.with_enabled(slot, True)
    if conf != snap.conf:
        steps.append(WriteConf(conf))  # the label first: the once record never names a missing one
    once = snap.adv.with_once(label(slot))
    if once != snap.adv:
        steps.append(WriteAdv(once))
    return steps


def plan_commit(snap: Snapshot, slot: Slot) -> list[Step]:
    _require_boot_files(snap, slot, "commit")
    steps: list[Step] = []
    cleared = snap.adv.with_once(None)
    if snap.once not in (None, slot):
        steps.append(WriteAdv(cleared))  # a trial of the other slot ends before the switch
    conf = snap.conf.with_default(slot)
    if conf != snap.conf:
        steps.append(WriteConf(conf))
    if snap.once == slot:
        steps.append(WriteAdv(cleared))
    return steps


# ---------------------------------------------------------------- the backend


class Syslinux(Bootloader):
    """extlinux.conf DEFAULT = committed slot; the ADV boot-once record = a one-boot trial."""

    name: ClassVar[str] = "syslinux"
    settings_type: ClassVar[type[Table]] = SyslinuxConfig
    settings: SyslinuxConfig
    requires_boot_files: ClassVar[tuple[str, ...]] = ("kernel", "initrd")

    @property
    def dir(self) -> Path:
        return self.settings.dir

    def trial_boots(self) -> int:
        return 1  # syslinux clears the boot-once record before it loads the kernel

    def notes(self) -> tuple[str, ...]:
        return (f"{self.name} gives a trial exactly {self.trial_boots()} boot(s) before it "
                "falls back",)

    @property
    def conf_path(self) -> Path:
        return self.dir / CONFIG_NAME

    @property
    def loader_path(self) -> Path:
        return self.dir / LOADER_NAME

    def boot_file_path(self, slot: Slot, name: str) -> Path:
        return self.dir / relative_boot_file(slot, name)

    def snapshot(self) -> Snapshot:
        try:
            text = self.conf_path.read_text()
        except OSError as exc:
            raise OperationalError(f"cannot read {self.conf_path}: {exc.strerror}",
                                   hint="is the boot partition mounted?") from None
        return Snapshot(
            conf=ExtlinuxConf.parse(text, self.conf_path),
            adv=adv.read(self.loader_path),
            kernels=frozenset(s for s in Slot if self.boot_file_path(s, "kernel").is_file()),
            initrds=frozenset(s for s in Slot if self.boot_file_path(s, "initrd").is_file()),
        )

    def read(self) -> BootState:
        return self.snapshot().state()

    def disable(self, slot: Slot) -> None:
        self.apply(plan_disable(self.snapshot(), slot))

    def arm_trial(self, slot: Slot, tries: int) -> None:
        """One boot of `slot` whatever `tries` is (see trial_boots), then the default again."""
        if tries < 1:
            raise ValueError("a trial needs at least one boot")
        self.apply(plan_arm_trial(self.snapshot(), slot))

    def commit(self, slot: Slot) -> None:
        self.apply(plan_commit(self.snapshot(), slot))

    def apply(self, steps: Iterable[Step]) -> None:
        """Carry out planned steps in order, each one durable before the next."""
        for step in steps:
            if isinstance(step, WriteConf):
                atomic_write(self.conf_path, step.conf.render().encode(), boot=True)
            else:
                adv.write(self.loader_path, step.adv)

    def preflight(self) -> None:
        where = "set [syslinux] dir to the folder with extlinux.conf and ldlinux.sys"
        if not self.dir.is_dir():
            raise UsageError(f"syslinux folder {self.dir} does not exist", hint=where)
        if not self.loader_path.is_file():
            raise UsageError(f"no {LOADER_NAME} in {self.dir}",
                             hint=f"install syslinux there: extlinux --install {self.dir}")
        if not self.conf_path.is_file():
            raise UsageError(f"no {CONFIG_NAME} in {self.dir}", hint=where)
        if not (os.access(self.conf_path, os.W_OK) and os.access(self.dir, os.W_OK)):
            raise UsageError(f"{self.conf_path} is not writable",
                             hint="mount the boot partition read-write")
        mount = mounts.holding(self.dir, self.mountinfo)
        fstype = mount.fstype if mount is not None else None
        if fstype not in ("ext2", "ext3", "ext4"):
            raise UsageError(f"{self.dir} is on {fstype or 'an unknown filesystem'}; the syslinux "
                             "backend keeps its state on ext2/3/4 only",
                             hint="make the boot partition ext4: mkfs.ext4 -b 4096")
        fsutil.checkpoint(self.dir, dry_run=True)  # every change must reach syslinux at once
        block = os.statvfs(self.dir).f_bsize
        if block < MIN_BLOCK_SIZE:
            raise UsageError(f"the boot filesystem of {self.dir} has {block}-byte blocks; "
                             "syslinux 6.04 fails to load kernels from it",
                             hint="recreate the boot filesystem with mkfs.ext4 -b 4096")
        self.snapshot()

    @classmethod
    def plan(cls, platform: Platform, *, slot_size: int, boot_size: int) -> DiskPlan:
        """MBR: syslinux's MBR code boots the partition flagged bootable."""
        cls.require_platform(platform)
        return DiskPlan.ab(TableKind.MBR, slot_size=slot_size, boot_size=boot_size,
                           boot_bootable=True)

    @classmethod
    def new_settings(cls, plan: DiskPlan) -> SyslinuxConfig:
        return SyslinuxConfig(dir=plan.mount(Role.BOOT) / "extlinux")

    def install(self, layout: DiskLayout) -> None:
        """MBR boot code, `extlinux --install`, a fresh extlinux.conf (A default, B disabled)
        and an empty ADV. The boot partition must be a primary MBR partition flagged bootable."""
        extlinux = require_tool("extlinux", package="extlinux")
        for needed in (MBR_CODE, *(MODULES_DIR / m for m in MODULES)):
            if not needed.is_file():
                raise OperationalError(f"{needed} is missing",
                                       hint="apt-get install syslinux-common")
        check_mbr(layout.disk, layout.boot_partition)
        target = self.dir
        layout.on_boot_fs(target, "[syslinux] dir")
        for slot in Slot:
            (target / "slots" / slot.value).mkdir(parents=True, exist_ok=True)
        run([extlinux, "--install", target], timeout=60)
        for module in MODULES:
            shutil.copyfile(MODULES_DIR / module, target / module)
        atomic_write(target / CONFIG_NAME,
                     fresh_config(layout.slot_roots, layout.kernel_cmdline).encode(), boot=True)
        adv.write(target / LOADER_NAME, Adv())
        write_mbr_code(layout.disk, MBR_CODE.read_bytes())


BACKEND = Syslinux


# ---------------------------------------------------------------- disk and mount facts


def check_mbr(disk: Path, partition: int) -> None:
    """Refuse a disk syslinux's MBR code cannot boot: no MBR, GPT, or an inactive partition."""
    with open(disk, "rb") as f:
        sector = f.read(512)
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        raise UsageError(f"{disk} has no MBR partition table",
                         hint="the syslinux backend needs a dos label: sfdisk with `label: dos`")
    entries = [sector[446 + 16 * i : 446 + 16 * (i + 1)] for i in range(4)]
    if any(e[4] == 0xEE for e in entries):
        raise UsageError(f"{disk} has a GPT partition table",
                         hint="use --bootloader grub for GPT disks, or a dos label for syslinux")
    if not 1 <= partition <= 4 or entries[partition - 1][4] == 0:
        raise UsageError(f"boot partition {partition} of {disk} is not a primary MBR partition",
                         hint="syslinux's MBR code boots primary partitions 1-4")
    if entries[partition - 1][0] != 0x80:
        raise UsageError(f"boot partition {partition} of {disk} is not flagged bootable",
                         hint=f"sfdisk --activate {disk} {partition}")


def write_mbr_code(disk: Path, code: bytes) -> None:
    """The first 440 bytes of the disk; the disk signature and partition table stay."""
    if len(code) > 440:
        raise OperationalError(f"MBR boot code of {len(code)} bytes does not fit in 440")
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, code, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
