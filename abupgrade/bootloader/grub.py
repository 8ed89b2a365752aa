"""The GRUB backend (BIOS, i386-pc, on GPT or MBR disks; UEFI, x86_64-efi, with or without
Secure Boot, on GPT: see grub_efi.py; the boot filesystem ext2/3/4).

The state lives in two GRUB environment blocks, `[grub] env` and the same name with `.1`
appended, 1024 bytes each. Neither ever moves, shrinks or grows: GRUB's `save_env` rewrites
a block in place through its disk sectors, and abupgrade writes them in place too (pwrite
at offset 0, fsync), never with `grub-editenv` (which replaces the file).

Each block carries the same variables in the same order, one character per value, so every
write has the same layout and a write cut short leaves a mix of two well-formed blocks:

    ab_gen=<0|1|2>  ab_default=<A|B>  ab_A=<g|b>  ab_B=<g|b>  ab_trial=<A|B|->
    ab_tries=<0..9>  ab_end=<0|1|2>

A block is valid when `ab_gen` is 0, 1 or 2 and `ab_end` repeats it; a torn write leaves
them different. Of two valid blocks the newer is the one whose generation follows the
other's (0 -> 1 -> 2 -> 0). A writer - abupgrade for every state change, grub.cfg when it
spends a trial boot - reads the newer block and writes the *other* block with the next
generation, so the newest valid block is never touched and a power cut at any byte leaves
either the old or the new state. grub.cfg (rendered from grub.cfg.in at install) does the
reading, the choice and the decrement with string comparisons only, as stock GRUB 2.06
has no arithmetic. A trial boot is booted only after its decremented count is saved, so a
trial gets at most N boots; a power cut between that save and the kernel costs one of them.
On BIOS GRUB addresses the boot disk as hd0 (the BIOS boot drive); on UEFI, grub.cfg names
the boot partition and its disk by what the ESP's config found (grub_efi.py).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from abupgrade import blockdev, fsutil, mounts
from abupgrade.bootloader.base import (
    BOOT_FILES,
    BOOT_POINT,
    Bootloader,
    BootState,
    DiskLayout,
    DiskPlan,
    Firmware,
    PlannedPartition,
    Platform,
    Role,
    boot_file,
)
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.fsutil import atomic_write, fsync_dir
from abupgrade.model import Slot
from abupgrade.partitions import BIOS_GRUB, EFI_SYSTEM, PartitionSpec, TableKind, read_table
from abupgrade.run import require_tool, run
from abupgrade.schema import Table, error

ENV_SIZE = 1024
SIGNATURE = b"# GRUB Environment Block\n"
GENERATIONS = ("0", "1", "2")
MAX_TRIES = 9
MiB = 1024 * 1024

GRUB_LIB = Path("/usr/lib/grub/i386-pc")
BIOS_SETUP = GRUB_LIB / "grub-bios-setup"
MODULES = ("biosdisk", "part_gpt", "part_msdos", "ext2", "serial", "terminal", "loadenv",
           "test", "echo", "linux", "normal")
# Where GRUB's save_env is proven to rewrite the block through its sectors (grub-emu, QEMU).
WRITABLE_FS = ("ext2", "ext3", "ext4")
_FS_NAMES = {"zfs": "ZFS"}
_FS_IOC_FIEMAP = 0xC020660B
# fiemap extent flags that mean the bytes are not plainly in the file's own sectors:
# unknown, delalloc, encoded, encrypted, not aligned, inline, tail-packed, unwritten, shared
_FIEMAP_NOT_PLAIN = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x2000
# What grub.cfg may carry verbatim on a `linux` line (no GRUB script syntax).
_SAFE_WORDS = re.compile(r"[A-Za-z0-9_.,:=/+@%\-]+( [A-Za-z0-9_.,:=/+@%\-]+)*")


@dataclass(frozen=True)
class GrubConfig(Table):
    """`[grub]`: the first of the two env blocks (the other is `env` + ".1"), how many
    boots a trial gets, and the firmware the disk was laid out for (written by disk init)."""

    env: Path = BOOT_POINT / "grub" / "grubenv"
    tries: int = 3
    firmware: str = Firmware.BIOS.value
    secure_boot: bool = False

    def check(self, where: str) -> None:
        if not 1 <= self.tries <= MAX_TRIES:
            raise error(where, f"tries must be between 1 and {MAX_TRIES}")
        if self.firmware not in set(Firmware):
            raise error(where, f"firmware must be one of {', '.join(Firmware)}")
        if self.secure_boot and self.firmware != Firmware.UEFI:
            raise error(where, "secure_boot needs firmware = \"uefi\"")


# ---------------------------------------------------------------- the envblk format

def parse_envblk(data: bytes) -> dict[str, str] | None:
    """Variables of a GRUB environment block, read exactly as GRUB's envblk.c reads them
    (later duplicates win, a broken tail ends the reading); None without the signature."""
    if len(data) < len(SIGNATURE) + 1 or not data.startswith(SIGNATURE):
        return None
    found: dict[str, str] = {}
    p, end = len(SIGNATURE), len(data)
    while p < end:
        if data[p] != ord("#"):
            name_end = data.find(b"=", p)
            if name_end < 0:
                break
            q = name_end + 1
            value = bytearray()
            while q < end and data[q] != ord("\n"):
                if data[q] == ord("\\"):
                    q += 1
                    if q >= end:
                        break
                value.append(data[q])
                q += 1
            if q >= end:
                break
            found[data[p:name_end].decode("latin-1")] = value.decode("latin-1")
            p = q
        p = _next_line(data, p)
    return found


def _next_line(data: bytes, p: int) -> int:
    while p < len(data):
        if data[p] == ord("\\"):
            p += 2
        elif data[p] == ord("\n"):
            break
        else:
            p += 1
    return p + 1


def format_envblk(items: Sequence[tuple[str, str]], size: int = ENV_SIZE) -> bytes:
    """A GRUB environment block of exactly `size` bytes, as grub-editenv writes one."""
    body = bytearray(SIGNATURE)
    for name, value in items:
        if not name or "=" in name or "\n" in name or name.startswith("#"):
            raise ValueError(f"invalid environment variable name {name!r}")
        escaped = value.replace("\\", "\\\\").replace("\n", "\\\n")
        body += f"{name}={escaped}\n".encode("latin-1")
    if len(body) > size:
        raise ValueError(f"environment block needs {len(body)} bytes, has {size}")
    return bytes(body) + b"#" * (size - len(body))


# ---------------------------------------------------------------- the protocol

@dataclass(frozen=True)
class EnvState:
    """What one environment block says, as grub.cfg interprets it."""

    default: Slot = Slot.A
    good: frozenset[Slot] = frozenset()
    trial: Slot | None = None
    tries: int = 0

    @classmethod
    def from_vars(cls, env: Mapping[str, str]) -> EnvState:
        tries = env.get("ab_tries", "")
        trial = env.get("ab_trial")
        return cls(
            default=Slot.B if env.get("ab_default") == "B" else Slot.A,
            good=frozenset(s for s in Slot if env.get(f"ab_{s.value}") == "g"),
            trial=Slot(trial) if trial is not None and trial in ("A", "B") else None,
            tries=int(tries) if len(tries) == 1 and tries in "0123456789" else 0,
        )

    def variables(self, generation: int) -> list[tuple[str, str]]:
        gen = GENERATIONS[generation % 3]
        return [
            ("ab_gen", gen),
            ("ab_default", self.default.value),
            ("ab_A", "g" if Slot.A in self.good else "b"),
            ("ab_B", "g" if Slot.B in self.good else "b"),
            ("ab_trial", self.trial.value if self.trial else "-"),
            ("ab_tries", str(min(max(self.tries, 0), MAX_TRIES))),
            ("ab_end", gen),
        ]

    def block(self, generation: int) -> bytes:
        return format_envblk(self.variables(generation))

    def boot_state(self) -> BootState:
        """What grub.cfg makes of this state on the next boots."""
        default = self.default
        if default not in self.good and default.other in self.good:
            default = default.other
        bootable = set(self.good)
        if self.trial is not None and self.tries > 0:
            bootable.add(self.trial)
        return BootState(default=default, bootable=frozenset(bootable), trial=self.trial,
                         tries_left=self.tries if self.trial is not None else 0)


def block_generation(data: bytes) -> int | None:
    """The generation of a valid block (0..2), None for a torn, foreign or damaged one."""
    env = parse_envblk(data)
    if env is None:
        return None
    gen = env.get("ab_gen")
    if gen in GENERATIONS and env.get("ab_end") == gen:
        return GENERATIONS.index(gen)
    return None


def block_damage(data: bytes) -> str | None:
    """Why GRUB cannot save into this block as it is, or None when it can."""
    if len(data) != ENV_SIZE:
        return f"{len(data)} bytes, not {ENV_SIZE}"
    env = parse_envblk(data)
    if env is None:
        return "no GRUB environment block signature"
    generation = block_generation(data)
    if generation is None:
        return "torn or foreign: its generation marks disagree"
    if data != EnvState.from_vars(env).block(generation):
        return "not in the form GRUB and abupgrade write"
    return None


@dataclass(frozen=True)
class Current:
    """The block grub.cfg boots from (`index`, None when neither is valid) and its state."""

    index: int | None
    generation: int
    state: EnvState

    @property
    def target(self) -> int:
        """The block the next write goes to: never the current one."""
        return 1 if self.index == 0 else 0


def current(blocks: Sequence[bytes]) -> Current:
    """The newest valid of the two blocks, chosen exactly as grub.cfg chooses it."""
    gens = [block_generation(b) for b in blocks]
    index: int | None = None
    if gens[0] is not None:
        index = 0
        if gens[1] is not None and gens[1] == (gens[0] + 1) % 3:
            index = 1
    elif gens[1] is not None:
        index = 1
    if index is None:
        return Current(None, 2, EnvState())  # a first write then gets generation 0
    gen = gens[index]
    assert gen is not None
    env = parse_envblk(blocks[index])
    assert env is not None
    return Current(index, gen, EnvState.from_vars(env))


# ---------------------------------------------------------------- the backend

class Grub(Bootloader):
    name: ClassVar[str] = "grub"
    platforms: ClassVar[tuple[Platform, ...]] = (
        Platform(), Platform(Firmware.UEFI), Platform(Firmware.UEFI, secure_boot=True))
    settings_type: ClassVar[type[Table]] = GrubConfig
    settings: GrubConfig

    @property
    def env_paths(self) -> tuple[Path, Path]:
        return block_paths(self.settings.env)

    def trial_boots(self) -> int:
        return self.settings.tries  # 1..9, all of which grub.cfg counts

    # -- reading and writing the blocks

    def _read_blocks(self) -> list[bytes]:
        blocks = []
        for path in self.env_paths:
            try:
                blocks.append(path.read_bytes())
            except FileNotFoundError:
                raise UsageError(f"no GRUB environment block at {path}",
                                 hint="set [grub] env, or lay out the disk with "
                                      "`abupgrade disk init --bootloader grub`") from None
            except OSError as exc:
                raise OperationalError(f"cannot read {path}: {exc.strerror}",
                                       hint="is the boot partition mounted?") from None
        return blocks

    def current(self) -> Current:
        return current(self._read_blocks())

    def read(self) -> BootState:
        return self.current().state.boot_state()

    def write(self, state: EnvState) -> None:
        """One in-place write of the block that is not current, with the next generation."""
        now = self.current()
        path = self.env_paths[now.target]
        data = state.block(now.generation + 1)
        write_in_place(path, data)
        if read_exactly(path) != data:
            raise OperationalError(f"{path} does not read back what was written",
                                   hint="check the boot partition for errors")

    def damage(self) -> list[tuple[Path, str]]:
        """(block, why) for each block GRUB cannot save into as it is: not a valid block, or
        not in the exact form GRUB's save_env and abupgrade write."""
        found = []
        for path, data in zip(self.env_paths, self._read_blocks(), strict=True):
            why = block_damage(data)
            if why is not None:
                found.append((path, why))
        return found

    def problems(self) -> list[str]:
        found = [f"GRUB environment block {path} is damaged ({why}); the boot hook rewrites "
                 "it on the next committed boot" for path, why in self.damage()]
        if len(found) == 2:
            found.append("neither GRUB environment block is valid: GRUB boots slot A and "
                         "cannot run a trial; lay the boot disk out again")
        return found

    def repair(self) -> list[str]:
        """Rewrite each damaged block from the valid one (at most two writes, each to the
        block that is not current, so the valid state is never touched)."""
        done: list[str] = []
        for _ in range(2):
            damaged = self.damage()
            now = self.current()
            if not damaged or now.index is None:
                break  # nothing to do, or no valid state to rewrite it from
            target = self.env_paths[now.target]
            self.write(now.state)
            done += [f"rewrote GRUB environment block {path} ({why})" for path, why in damaged
                     if path == target]
        return done

    def disable(self, slot: Slot) -> None:
        state = self.current().state
        effective = state.boot_state().default
        if effective == slot:
            if slot.other not in state.good:
                raise PolicyRefusal(f"cannot disable slot {slot}: slot {slot.other} cannot boot",
                                    hint="the machine would be left without a bootable slot")
            state = replace(state, default=slot.other)
        if state.trial == slot:
            state = replace(state, trial=None, tries=0)
        self.write(replace(state, good=state.good - {slot}))

    def arm_trial(self, slot: Slot, tries: int) -> None:
        if tries < 1:
            raise ValueError("a trial needs at least one boot")
        state = self.current().state
        self.write(replace(state, trial=slot, tries=min(tries, MAX_TRIES)))

    def commit(self, slot: Slot) -> None:
        state = self.current().state
        self.write(replace(state, default=slot, good=state.good | {slot}, trial=None, tries=0))

    def boot_file_path(self, slot: Slot, name: str) -> Path:
        return boot_file(self.settings.env.parent, slot, name)

    # -- checks

    def preflight(self) -> None:
        env = self.settings.env
        hint_init = "lay out the disk with `abupgrade disk init --bootloader grub`"
        for path in self.env_paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                raise UsageError(f"no GRUB environment block at {path}",
                                 hint=f"set [grub] env, or {hint_init}") from None
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"GRUB environment block {path} is not a regular file",
                                 hint=hint_init)
            if st.st_size != ENV_SIZE:
                raise UsageError(
                    f"GRUB environment block {path} has {st.st_size} bytes, not {ENV_SIZE}",
                    hint="it was replaced (grub-editenv does that); " + hint_init)
            if st.st_blocks * 512 < ENV_SIZE:
                raise UsageError(f"GRUB environment block {path} is sparse",
                                 hint="GRUB writes it through its disk sectors, so every byte "
                                      "must be allocated: " + hint_init)
            if not os.access(path, os.W_OK):
                raise UsageError(f"GRUB environment block {path} is not writable",
                                 hint="mount the boot partition read-write")
            why = not_in_place(path)
            if why is not None:
                raise UsageError(f"GRUB cannot rewrite the environment block {path} in place: "
                                 f"{why}", hint=hint_init)
        fsutil.checkpoint(env.parent, dry_run=True)  # every change must reach GRUB at once
        mount = mounts.holding(env, self.mountinfo)
        if mount is None:
            return
        if mount.fstype not in WRITABLE_FS:
            raise UsageError(
                f"GRUB environment {env} is on {_FS_NAMES.get(mount.fstype, mount.fstype)}, "
                "where GRUB's save_env is not "
                "known to rewrite it in place",
                hint="keep [grub] env on an ext2/3/4 boot partition on a plain disk")
        stacked = blockdev.stacked_kind(mount.devno, mount.source)
        if stacked is not None:
            raise UsageError(
                f"GRUB environment {env} is on {stacked} ({mount.source}); GRUB writes the "
                "block through the BIOS disk, beneath it",
                hint="keep [grub] env on a plain partition of the boot disk")

    # -- installing

    @classmethod
    def plan(cls, platform: Platform, *, slot_size: int, boot_size: int) -> DiskPlan:
        """GPT: for BIOS a 1 MiB bios_grub partition for GRUB's core image, for UEFI an EFI
        system partition; then the A/B layout."""
        cls.require_platform(platform)
        if platform.firmware is Firmware.UEFI:
            from abupgrade.bootloader import grub_efi  # UEFI only: FAT tools, shim, ...

            grub_efi.require(secure_boot=platform.secure_boot)
            first = PlannedPartition(Role.ESP, PartitionSpec(grub_efi.ESP_SIZE, EFI_SYSTEM, "esp"))
        else:
            first = PlannedPartition(Role.FIRMWARE, PartitionSpec(MiB, BIOS_GRUB, "bios"))
        return DiskPlan.ab(TableKind.GPT, slot_size=slot_size, boot_size=boot_size,
                           before=(first,), platform=platform)

    @classmethod
    def new_settings(cls, plan: DiskPlan) -> GrubConfig:
        return GrubConfig(env=plan.mount(Role.BOOT) / "grub" / "grubenv",
                          firmware=plan.platform.firmware.value,
                          secure_boot=plan.platform.secure_boot)

    def platform(self) -> Platform:
        return Platform(Firmware(self.settings.firmware), secure_boot=self.settings.secure_boot)

    def check_boot_files(self, slot: Slot) -> None:
        """With Secure Boot, the slot's kernel must carry a signature (GRUB asks shim to
        verify it and boots nothing else); whether shim trusts the signer shows at boot."""
        kernel = self.boot_file_path(slot, "kernel")
        if not self.settings.secure_boot or not kernel.is_file():
            return
        from abupgrade.bootloader import grub_efi

        with open(kernel, "rb") as f:
            signed = grub_efi.authenticode_signed(f.read())
        if not signed:
            raise PolicyRefusal(
                "the image's kernel carries no Secure Boot signature; this disk boots "
                "with Secure Boot, which would refuse it",
                hint="sign the kernel with a key shim trusts (Debian's kernels are signed; "
                     "or enroll your key with mokutil and sbsign the kernel)")

    def install(self, layout: DiskLayout) -> None:
        """GRUB for the layout's firmware - BIOS: grub-mkimage + grub-bios-setup onto
        layout.disk; UEFI: GRUB on the ESP (grub_efi.py) - then grub.cfg, both env blocks
        (slot A default and good, B bad), and the boot files' folders."""
        from abupgrade.bootloader import grub_efi

        env = self.settings.env
        env_rel = str(layout.on_boot_fs(env, "[grub] env"))
        grub_dir = layout.boot_root / "grub"
        grub_dir.mkdir(parents=True, exist_ok=True)
        uefi = layout.platform.firmware is Firmware.UEFI
        if uefi:
            boot_device = grub_efi.BOOT_DEVICE
            parts = {slot: grub_efi.slot_device(n) for slot, n in layout.slot_partitions.items()}
        else:
            boot_device, parts = _bios_core_image(layout, grub_dir)
        cfg = render_cfg(boot_device=boot_device, env_rel=env_rel, parts=parts,
                         roots=layout.slot_roots, cmdline=layout.kernel_cmdline)
        atomic_write(grub_dir / "grub.cfg", cfg.encode(), boot=True)
        for slot in Slot:
            (env.parent / "slots" / slot.value).mkdir(parents=True, exist_ok=True)
        create_blocks(env)
        if uefi:
            grub_efi.install(layout, cfg_path=f"{grub_dir.relative_to(layout.boot_root)}/grub.cfg")
        else:
            run([BIOS_SETUP, "-d", grub_dir / "i386-pc", layout.disk], timeout=120,
                hint="a GPT disk needs a 1 MiB bios_grub partition for GRUB's core image")
        fsync_dir(grub_dir)
        fsutil.checkpoint(grub_dir)


BACKEND = Grub


def _bios_core_image(layout: DiskLayout, grub_dir: Path) -> tuple[str, dict[Slot, str]]:
    """GRUB's BIOS modules and core image under `grub_dir`/i386-pc; GRUB's names of the
    boot partition and of the slots' partitions."""
    import shutil

    mkimage = require_tool("grub-mkimage", package="grub-common")
    if not BIOS_SETUP.is_file():
        raise OperationalError(f"{BIOS_SETUP} is missing", hint="apt-get install grub-pc-bin")
    table = read_table(layout.disk)
    if table is None:
        raise UsageError(f"{layout.disk} has no partition table",
                         hint="lay out the disk with `abupgrade disk init`")
    label = "gpt" if table.kind is TableKind.GPT else "msdos"
    modules_dir = grub_dir / "i386-pc"
    modules_dir.mkdir(parents=True, exist_ok=True)
    for item in sorted(GRUB_LIB.iterdir()):
        if item.suffix in (".mod", ".lst") or item.name == "boot.img":
            shutil.copyfile(item, modules_dir / item.name)
    boot_device = f"(hd0,{label}{layout.boot_partition})"
    run([mkimage, "-O", "i386-pc", "-d", GRUB_LIB, "-p", f"{boot_device}/grub",
         "-o", modules_dir / "core.img", *MODULES], timeout=120)
    return boot_device, {slot: f"(hd0,{label}{n})" for slot, n in layout.slot_partitions.items()}


def block_paths(env: Path) -> tuple[Path, Path]:
    return env, env.with_name(env.name + ".1")


def create_blocks(env: Path) -> None:
    """Both blocks, fresh: slot A the default and good, B bad, no trial. Block 0 is current
    (generation 0); block 1 holds the same state one generation older."""
    fresh = EnvState(default=Slot.A, good=frozenset({Slot.A}))
    for path, generation in zip(block_paths(env), (0, 2), strict=True):
        atomic_write(path, fresh.block(generation), boot=True)


# The console of a disk abupgrade laid out: the first serial port.
SERIAL_CONSOLE = "serial --unit=0 --speed=115200\nterminal_output serial"


def render_cfg(*, boot_device: str, env_rel: str, parts: Mapping[Slot, str],
               roots: Mapping[Slot, str], cmdline: str, console: str = SERIAL_CONSOLE) -> str:
    """grub.cfg from grub.cfg.in. `boot_device` is GRUB's name of the boot partition
    ("(hd0,gpt2)"), `env_rel` the env block's path inside it, `parts` GRUB's names of the
    slot partitions, `roots` the kernel's root= of each slot, `console` the commands that set
    up GRUB's terminal (none where the machine's own grub.cfg did, for `adopt`)."""
    for what, text in (("kernel command line", cmdline), *((f"root of slot {s}", r)
                                                          for s, r in roots.items())):
        if not _SAFE_WORDS.fullmatch(text):
            raise UsageError(f"{what} {text!r} cannot be written into grub.cfg",
                             hint="use letters, digits and _.,:=/+@%- separated by single spaces")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*", env_rel):
        raise UsageError(f"[grub] env path {env_rel!r} cannot be written into grub.cfg",
                         hint="use letters, digits and _.+- in the GRUB environment's path")
    env0 = f"{boot_device}/{env_rel}"
    slots_dir = f"{boot_device}/{Path(env_rel).parent.as_posix()}/slots".replace("/./", "/")
    values = {"ENV0": env0, "ENV1": env0 + ".1", "CMDLINE": cmdline,
              "CONSOLE": console or "# the console: as the machine's own grub.cfg set it up"}
    for slot in Slot:
        values[f"{slot.value}_PART"] = parts[slot]
        values[f"{slot.value}_ROOT"] = roots[slot]
        values[f"{slot.value}_KERNEL"] = f"{slots_dir}/{slot.value}/{BOOT_FILES['kernel']}"
        values[f"{slot.value}_INITRD"] = f"{slots_dir}/{slot.value}/{BOOT_FILES['initrd']}"
    template = (Path(__file__).parent / "grub.cfg.in").read_text()
    text = re.sub(r"@([A-Z0-9_]+)@", lambda m: values[m[1]], template)
    return text


# ---------------------------------------------------------------- files and mounts

def not_in_place(path: Path) -> str | None:
    """Why GRUB's save_env could not rewrite `path` through its disk sectors (its bytes are
    inline, encrypted, compressed, unwritten, shared or not allocated), or None when it can.
    A filesystem without FIEMAP is left to the filesystem check."""
    import fcntl
    import struct

    head = struct.pack("=QQIIII", 0, ENV_SIZE, 1, 0, 16, 0)  # FIEMAP_FLAG_SYNC, 16 extents
    buf = bytearray(head + bytes(16 * 56))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    count = struct.unpack_from("=I", buf, 20)[0]
    covered = 0
    for i in range(count):
        logical, _physical, length, _r1, _r2, flags = struct.unpack_from("=QQQQQI", buf,
                                                                       32 + 56 * i)
        if flags & _FIEMAP_NOT_PLAIN:
            return f"its data is not plainly on disk (extent flags {flags:#x})"
        if logical <= covered:
            covered = max(covered, logical + length)
    if covered < ENV_SIZE:
        return "not all of its bytes are allocated on disk"
    return None


def read_exactly(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(ENV_SIZE + 1)


def write_in_place(path: Path, data: bytes) -> None:
    """pwrite the whole block at offset 0 and fsync: the file is never truncated or moved."""
    if len(data) != ENV_SIZE:
        raise ValueError(f"an environment block is {ENV_SIZE} bytes, not {len(data)}")
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise OperationalError(f"cannot open {path}: {exc.strerror}",
                               hint="is the boot partition mounted read-write?") from None
    try:
        size = os.fstat(fd).st_size
        if size != ENV_SIZE:
            raise UsageError(f"GRUB environment block {path} has {size} bytes, not {ENV_SIZE}",
                             hint="it was replaced; lay the boot disk out again")
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
        os.fsync(fd)
    except OSError as exc:
        raise OperationalError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    fsutil.checkpoint(path.parent)
