"""The U-Boot backend: the state in a redundant U-Boot environment, the choice in boot.scr.

The environment (see ubootenv) sits where `[uboot] env` says, normally in the gap before
the first partition; `fw_printenv`/`fw_setenv` read and write it with the same lines in
their fw_env.config. Variables, always all present:

    ab_default=<A|B>  ab_A=<g|b>  ab_B=<g|b>  ab_trial=<A|B|->
    upgrade_available=<0|1>  bootcount=<0..9>  bootlimit=<1..9>  altbootcmd=<...>

bootcount, bootlimit, upgrade_available and altbootcmd mean what they mean to U-Boot's own
boot counting (CONFIG_BOOTCOUNT_LIMIT): a pending trial has upgrade_available=1, each boot
adds one to bootcount, and once bootcount passes bootlimit the trial is over. Stock builds
(Debian's) have no such counting, so boot.scr (rendered from boot.cmd.in, compiled with
mkimage) does it: it reads both copies itself (`<interface> read`), picks the current one
as U-Boot would, spends a trial boot by writing bootcount+1 into the older copy, and boots
the trial only after that write succeeded; a slot that fails to load falls through to the
next choice. Other variables in the environment are kept by abupgrade's writes; boot.scr
writes only the variables above.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from abupgrade import blockdev, fat, slots
from abupgrade.bootloader.base import (
    BOOT_POINT,
    Arch,
    Bootloader,
    BootState,
    DiskLayout,
    DiskPlan,
    PlannedPartition,
    Platform,
    Role,
    boot_file,
)
from abupgrade.bootloader.ubootenv import (
    DEFAULT_SIZE,
    HEADER,
    Current,
    Environment,
    EnvLocation,
    check_storage,
    parse_locations,
)
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.model import Slot
from abupgrade.partitions import PartitionSpec, TableKind, read_table
from abupgrade.run import require_tool, run
from abupgrade.schema import Table, error

MAX_TRIES = 9
# Every variable boot.scr reads and writes, in the order abupgrade writes them.
MANAGED = ("ab_default", "ab_A", "ab_B", "ab_trial", "upgrade_available", "bootcount",
           "bootlimit", "altbootcmd")
# Past bootlimit U-Boot's own counting runs altbootcmd: the same selection, which then
# boots the default.
ALTBOOTCMD = "run bootcmd"
SCRIPT_NAME = "boot.scr"
MiB = 1 << 20
# disk init: the two copies in the gap before the first partition, which starts at 2 MiB
# (the GPT takes the first 17 KiB; many boards keep U-Boot itself below 1 MiB).
ENV_OFFSETS = (0x100000, 0x104000)
FIRST_PARTITION = 2 * MiB
# The FAT partition with boot.scr: first on the disk and flagged bootable, where U-Boot's
# distro boot looks for a script; FAT32 needs 33 MiB at least.
FAT_NAME = "uboot"
FAT_SIZE = 64 * MiB
FAT_LABEL = "UBOOT"
BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
_SAFE_WORDS = re.compile(r"[A-Za-z0-9_.,:=/+@%\-]+( [A-Za-z0-9_.,:=/+@%\-]+)*")


# ---------------------------------------------------------------- the protocol

@dataclass(frozen=True)
class EnvState:
    """What the environment says, as boot.scr interprets it."""

    default: Slot = Slot.A
    good: frozenset[Slot] = frozenset()
    trial: Slot | None = None
    bootcount: int = 0
    bootlimit: int = 3

    @classmethod
    def from_vars(cls, env: Mapping[str, str]) -> EnvState:
        trial = env.get("ab_trial")
        pending = env.get("upgrade_available") == "1" and trial in ("A", "B")
        return cls(
            default=Slot.B if env.get("ab_default") == "B" else Slot.A,
            good=frozenset(s for s in Slot if env.get(f"ab_{s.value}") == "g"),
            trial=Slot(trial) if pending and trial is not None else None,
            bootcount=_digit(env.get("bootcount"), 0, 9, MAX_TRIES),
            bootlimit=_digit(env.get("bootlimit"), 1, 9, 0),
        )

    @property
    def tries_left(self) -> int:
        if self.trial is None:
            return 0
        return max(self.bootlimit - self.bootcount, 0)

    def variables(self) -> dict[str, str]:
        return {
            "ab_default": self.default.value,
            "ab_A": "g" if Slot.A in self.good else "b",
            "ab_B": "g" if Slot.B in self.good else "b",
            "ab_trial": self.trial.value if self.trial else "-",
            "upgrade_available": "1" if self.trial else "0",
            "bootcount": str(min(max(self.bootcount, 0), MAX_TRIES)),
            "bootlimit": str(min(max(self.bootlimit, 1), MAX_TRIES)),
            "altbootcmd": ALTBOOTCMD,
        }

    def boot_state(self) -> BootState:
        """What boot.scr makes of this state on the next boots."""
        return BootState.of(self.default, self.good, self.trial, self.tries_left)


def disabled(state: EnvState, slot: Slot) -> EnvState:
    """`slot` bad and not on trial; the default moves to the other slot if it was `slot`.
    A PolicyRefusal when that would leave nothing to boot."""
    if state.boot_state().default == slot:
        if slot.other not in state.good:
            raise PolicyRefusal(f"cannot disable slot {slot}: slot {slot.other} cannot boot",
                                hint="the machine would be left without a bootable slot")
        state = replace(state, default=slot.other)
    if state.trial == slot:
        state = replace(state, trial=None, bootcount=0)
    return replace(state, good=state.good - {slot})


def armed(state: EnvState, slot: Slot, tries: int) -> EnvState:
    if not 1 <= tries <= MAX_TRIES:
        raise ValueError(f"a U-Boot trial gets 1 to {MAX_TRIES} boots, not {tries}")
    return replace(state, trial=slot, bootcount=0, bootlimit=tries)


def committed(state: EnvState, slot: Slot) -> EnvState:
    return replace(state, default=slot, good=state.good | {slot}, trial=None, bootcount=0)


def _digit(text: str | None, low: int, high: int, otherwise: int) -> int:
    """A one-digit value as boot.scr's string comparisons accept it, else `otherwise`."""
    if text is not None and len(text) == 1 and text.isdigit() and low <= int(text) <= high:
        return int(text)
    return otherwise


def updated(current: Mapping[str, str], state: EnvState) -> list[tuple[str, str]]:
    """The environment with `state` written into it: variables abupgrade does not manage
    keep their values and order; the managed ones follow."""
    ours = state.variables()
    kept = [(k, v) for k, v in current.items() if k not in ours]
    return kept + list(ours.items())


# ---------------------------------------------------------------- boot.scr

@dataclass(frozen=True)
class ArchInfo:
    """What boot.scr needs to know about a CPU architecture's U-Boot and kernel."""

    boot_initrd: str  # boots ${kernel_addr_r} with the initrd just loaded
    boot_kernel: str  # boots ${kernel_addr_r} alone
    console: str  # the kernel's console= on the machines abupgrade boots
    scratch: int  # RAM for the environment copies where setexpr is missing
    image_arch: str  # mkimage -A


ARCHES = {
    Arch.ARM64: ArchInfo(
        "booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}",
        "booti ${kernel_addr_r} - ${fdtcontroladdr}", "ttyAMA0", 0x48000000, "arm64"),
    # U-Boot's x86 builds (32-bit) load a bzImage with zboot; kernel_addr_r is 0x1000000
    # in every x86 board's default environment.
    Arch.AMD64: ArchInfo(
        "zboot ${kernel_addr_r} 0 ${ramdisk_addr_r} ${filesize}",
        "zboot ${kernel_addr_r}", "ttyS0", 0x1000000, "x86"),
}


@dataclass(frozen=True)
class ScriptParams:
    """Everything boot.scr is rendered from."""

    locations: tuple[EnvLocation, EnvLocation]
    storage: str  # U-Boot's "<interface> <device>" of the disk, e.g. "mmc 0"
    boot_partition: int
    slot_partitions: Mapping[Slot, int]
    slot_roots: Mapping[Slot, str]
    cmdline: str
    arch: ArchInfo
    boot_dir: str = "/slots"  # <boot_dir>/<slot>/vmlinuz on the boot partition


def _scratch(size: int) -> list[tuple[str, int]]:
    """Named addresses in the scratch area, as offsets: the two copies read, the copy
    written (its first four bytes also take the reversed crc32 when checking a copy), and
    crc32's result."""
    names = [("r0", 0), ("r0f", 4), ("r0d", HEADER), ("r1", size), ("r1f", size + 4),
             ("r1d", size + HEADER), ("w", 2 * size), ("w1", 2 * size + 1),
             ("w2", 2 * size + 2), ("w3", 2 * size + 3), ("wf", 2 * size + 4),
             ("wd", 2 * size + HEADER)]
    names += [(f"t{i}" if i else "t", 3 * size + i) for i in range(4)]
    return names


def _addresses(size: int, fixed: int) -> str:
    offsets = _scratch(size)
    computed = [f"  setexpr ab_{name} ${{kernel_addr_r}} + {offset:#x}"
                for name, offset in offsets]
    literal = [f"  ab_{name}={fixed + offset:#x}" for name, offset in offsets]
    return "\n".join(["if setexpr ab_r0 ${kernel_addr_r} + 0; then", *computed[1:], "else",
                      *literal, "fi"])


def render_script(params: ScriptParams) -> str:
    first, second = params.locations
    for loc in params.locations:
        if loc.offset < 0 or loc.offset % 512 or loc.size % 512:
            raise UsageError(f"[uboot] env {loc.line()!r}: boot.scr reads whole 512-byte "
                             "blocks from the start of the disk",
                             hint="use an offset and size that are multiples of 0x200")
    if first.device != second.device:
        raise UsageError("[uboot] env: boot.scr expects both copies on the same disk")
    words = params.storage.split()
    if len(words) != 2 or not all(re.fullmatch(r"[A-Za-z0-9_${}]+", w) for w in words):
        raise UsageError(f"[uboot] storage {params.storage!r} is not "
                         "'<interface> <device>'", hint='like "mmc 0" or "virtio 0"')
    for what, text in (("kernel command line", params.cmdline),
                       *((f"root of slot {s}", r) for s, r in params.slot_roots.items())):
        if not _SAFE_WORDS.fullmatch(text):
            raise UsageError(f"{what} {text!r} cannot be written into boot.scr",
                             hint="use letters, digits and _.,:=/+@%- separated by single "
                                  "spaces")
    size = first.size
    values = {
        "ENV0": first.line(), "ENV1": second.line(),
        "IF": words[0], "DEV": words[1],
        "ADDRESSES": _addresses(size, params.arch.scratch),
        "BLK0": f"{first.offset // 512:#x}", "BLK1": f"{second.offset // 512:#x}",
        "CNT": f"{size // 512:#x}", "SIZE": f"{size:#x}", "DATA": f"{size - HEADER:#x}",
        "NAMES": " ".join(MANAGED),
        "CMDLINE": params.cmdline,
        "BOOT_PART": str(params.boot_partition), "BOOT_DIR": params.boot_dir,
        "BOOT_INITRD": params.arch.boot_initrd, "BOOT_KERNEL": params.arch.boot_kernel,
    }
    for slot in Slot:
        values[f"{slot.value}_PART"] = str(params.slot_partitions[slot])
        values[f"{slot.value}_ROOT"] = params.slot_roots[slot]
    template = resources.files("abupgrade.bootloader").joinpath("boot.cmd.in").read_text()
    return re.sub(r"@([A-Z0-9_]+)@", lambda m: values[m[1]], template)


def compile_script(text: str, arch: ArchInfo) -> bytes:
    """boot.scr from its text: a legacy U-Boot image of type script (mkimage)."""
    mkimage = require_tool("mkimage", package="u-boot-tools")
    with tempfile.TemporaryDirectory(prefix="abupgrade-bootscr.") as tmp:
        source, out = Path(tmp, "boot.cmd"), Path(tmp, SCRIPT_NAME)
        source.write_text(text)
        run([mkimage, "-A", arch.image_arch, "-O", "linux", "-T", "script", "-C", "none",
             "-n", "abupgrade A/B selection", "-d", source, out], timeout=60)
        return out.read_bytes()


# ---------------------------------------------------------------- the backend

@dataclass(frozen=True)
class UBootConfig(Table):
    """`[uboot]`: the two environment copies as fw_env.config lines (DEVICE a path, or
    PTUUID=<id> for the disk with that partition table), how many boots a trial gets, the
    U-Boot "<interface> <device>" boot.scr reads and writes them through (by default the
    disk boot.scr was loaded from), and where the boot partition holding the slots' boot
    files is mounted."""

    env: tuple[str, ...] = ("/dev/mmcblk0 0x100000 0x4000", "/dev/mmcblk0 0x104000 0x4000")
    tries: int = 3
    storage: str = "${devtype} ${devnum}"
    dir: Path = BOOT_POINT

    def check(self, where: str) -> None:
        if not 1 <= self.tries <= MAX_TRIES:
            raise error(where, f"tries must be between 1 and {MAX_TRIES}")
        try:
            parse_locations(self.env)
        except UsageError as exc:
            raise UsageError(f"configuration: {exc.message}", hint=exc.hint) from None

    def resolved(self, resolve: Callable[[str], str]) -> UBootConfig:
        lines = []
        for location in parse_locations(self.env):
            if not location.device.startswith("/"):
                location = replace(location, device=resolve(location.device))
            lines.append(location.line())
        return replace(self, env=tuple(lines))


class UBoot(Bootloader):
    name: ClassVar[str] = "uboot"
    settings_type: ClassVar[type[Table]] = UBootConfig
    settings: UBootConfig
    platforms: ClassVar[tuple[Platform, ...]] = (Platform(arch=Arch.ARM64),
                                                 Platform(arch=Arch.AMD64))

    # -- disk init

    @classmethod
    def plan(cls, platform: Platform, *, slot_size: int, boot_size: int) -> DiskPlan:
        """GPT with the environment at 1 MiB, then from 2 MiB the FAT partition for boot.scr
        (bootable, first), an ext4 boot partition (configuration, keyring, boot files), the
        slots and data. The table's id names the disk in `[uboot] env`."""
        cls.require_platform(platform)
        fat_part = PlannedPartition(Role.FIRMWARE, PartitionSpec(
            FAT_SIZE, BASIC_DATA, FAT_NAME, bootable=True, start=FIRST_PARTITION))
        return DiskPlan.ab(TableKind.GPT, slot_size=slot_size, boot_size=boot_size,
                           before=(fat_part,), disk_id=str(uuid.uuid4()))

    @classmethod
    def new_settings(cls, plan: DiskPlan) -> UBootConfig:
        if plan.disk_id is None:
            raise ValueError("a U-Boot disk plan names its partition table's id")
        lines = tuple(f"PTUUID={plan.disk_id} {offset:#x} {DEFAULT_SIZE:#x}"
                      for offset in ENV_OFFSETS)
        return UBootConfig(env=lines, dir=plan.mount(Role.BOOT))

    def install(self, layout: DiskLayout) -> None:
        """Both environment copies (slot A the default and good, B bad), boot.scr on a new
        FAT filesystem in the FAT partition, the boot files' folders."""
        table = read_table(layout.disk)
        found = table.by_name(FAT_NAME) if table is not None else []
        nodes = blockdev.partitions(layout.disk)
        if len(found) != 1 or found[0].number not in nodes:
            raise UsageError(f"{layout.disk} has no partition named {FAT_NAME!r} for boot.scr",
                             hint="lay the disk out with `abupgrade disk init --bootloader uboot`")
        locations = self._locations()
        env = Environment([(layout.disk, loc) for loc in locations])
        for _ in locations:  # both copies valid, the second one newer
            env.write(updated({}, EnvState(default=Slot.A, good=frozenset({Slot.A}),
                                           bootlimit=self.settings.tries)))
        arch = ARCHES[layout.platform.arch]
        console = f"console={arch.console}"
        cmdline = " ".join([console, *(w for w in layout.kernel_cmdline.split()
                                       if not w.startswith("console="))])
        slots_dir = boot_file(self.settings.dir, Slot.A, "kernel").parent.parent
        text = render_script(ScriptParams(
            locations=locations, storage=self.settings.storage,
            boot_partition=layout.boot_partition, slot_partitions=layout.slot_partitions,
            slot_roots=layout.slot_roots, cmdline=cmdline, arch=arch,
            boot_dir="/" + str(layout.on_boot_fs(slots_dir, "[uboot] dir"))))
        script = compile_script(text, arch)
        device = nodes[found[0].number]
        fat.mkfs_fat32(device, label=FAT_LABEL)
        with fat.open_fat(device) as fs:
            fs.write(SCRIPT_NAME, script)
            if fs.read(SCRIPT_NAME) != script:
                raise OperationalError(f"{SCRIPT_NAME} does not read back from {device}")
        for slot in Slot:
            (slots_dir / slot.value).mkdir(parents=True, exist_ok=True)

    # -- the environment

    def _locations(self) -> tuple[EnvLocation, EnvLocation]:
        return parse_locations(self.settings.env)

    def environment(self) -> Environment:
        copies = []
        for location in self._locations():
            device = location.device
            path = Path(device) if device.startswith("/") else slots.resolve(device)
            copies.append((path, location))
        return Environment(copies)

    def current(self) -> Current:
        return self.environment().current()

    def _state(self) -> tuple[Environment, Current, EnvState]:
        env = self.environment()
        now = env.current()
        if now.index is None:
            raise UsageError("no valid U-Boot environment copy at "
                             + " and ".join(repr(loc.line()) for loc in self._locations()),
                             hint="check [uboot] env, or lay the disk out with "
                                  "`abupgrade disk init --bootloader uboot`")
        return env, now, EnvState.from_vars(now.variables)

    def _write(self, change: Callable[[EnvState], EnvState]) -> None:
        env, now, state = self._state()
        env.write(updated(now.variables, change(state)))

    # -- the running machine

    def preflight(self) -> None:
        env = self.environment()
        for path, location in env.copies:
            check_storage(path, location)
        self._state()
        folder = self.settings.dir
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"the boot partition {folder} for the slots' kernels is missing "
                             "or not writable",
                             hint="mount it read-write, or set [uboot] dir")

    def read(self) -> BootState:
        """As boot.scr reads it; with no valid copy it boots slot A (preflight refuses to
        write there: wrong [uboot] env lines must not overwrite whatever is there)."""
        now = self.current()
        return EnvState.from_vars(now.variables).boot_state()

    def disable(self, slot: Slot) -> None:
        self._write(lambda state: disabled(state, slot))

    def arm_trial(self, slot: Slot, tries: int) -> None:
        self._write(lambda state: armed(state, slot, min(tries, MAX_TRIES)))

    def commit(self, slot: Slot) -> None:
        self._write(lambda state: committed(state, slot))

    def boot_file_path(self, slot: Slot, name: str) -> Path:
        return boot_file(self.settings.dir, slot, name)

    def trial_boots(self) -> int:
        return self.settings.tries

    def counters(self) -> dict[str, Any]:
        """U-Boot's boot-counting variables as the environment holds them."""
        now = self.current()
        state = EnvState.from_vars(now.variables)
        return {"bootcount": state.bootcount, "bootlimit": state.bootlimit,
                "upgrade_available": 1 if state.trial is not None else 0,
                "copy": now.index, "flags": now.flags}


BACKEND = UBoot
