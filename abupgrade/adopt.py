"""`adopt`: bring a machine that already boots GRUB from one of two root partitions under
abupgrade without re-imaging it; `adopt --undo` takes it out again.

What the machine must have (checked first; nothing is written when a check fails):
- the running root filesystem on a partition of a disk with a GPT or MBR table, and a
  second partition of at least its size on the same disk that nothing mounts: the other slot;
- /boot on a partition of its own (ext2/3/4), shared by both slots, where GRUB keeps its
  files: the distribution's grub.cfg sources `custom.cfg` beside it (`/etc/grub.d/41_custom`
  of every GRUB package does so);
- the running kernel's files in /boot (`vmlinuz-RELEASE`, `initrd.img-RELEASE`) or given.

What it writes, all on the boot partition but for the boot hook's integration:
- `abupgrade/`: the configuration (`system.toml`, which both slots find there), the keyring,
  GRUB's two environment blocks with the running slot committed, the boot-selection script
  rendered by the GRUB backend from its own template (`grub.cfg`), the running kernel and
  initrd as the running slot's boot files, and `adopted.json` (what `--undo` removes);
- a marked block at the end of the distribution's `grub/custom.cfg` that finds the boot
  filesystem by UUID and hands over to abupgrade's script with `configfile`. `update-grub`
  never writes custom.cfg, and the grub.cfg it writes sources it again, so the hand-over
  survives kernel updates and `update-grub` on either slot. It is written last: a power cut
  before it leaves the machine booting as it did.
The state folder goes to the data partition when /data is one (else onto the boot
partition); the boot hook's integration into the running slot's init.

The other slot starts empty: `apply` writes it (an image for an adopted machine carries
abupgrade and the boot hook; see the README's Quick start).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from abupgrade import integrations, mounts, slots
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.base import BOOT_POINT, DATA_POINT, SLOT_NAMES, Firmware
from abupgrade.bootloader.grub import Grub, GrubConfig, create_blocks, render_cfg
from abupgrade.config import DEFAULT_PATH, ON_DISK_PATH, Config, render
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.fsutil import atomic_write, fsync_dir
from abupgrade.model import Slot, SlotState
from abupgrade.partitions import BIOS_GRUB, Partition, PartitionTable, TableKind, read_table
from abupgrade.results import HookInstalled
from abupgrade.run import run
from abupgrade.state import EventName, State, Store

HOME = Path("abupgrade")  # on the boot filesystem: everything adopt writes there
RECORD = HOME / "adopted.json"
CUSTOM_CFG = Path("grub/custom.cfg")
BEGIN = "### BEGIN abupgrade (written by `abupgrade adopt`; `abupgrade adopt --undo` removes it)"
END = "### END abupgrade"
# Partition types that are never a root slot: GRUB's BIOS boot partition, the EFI system
# partition, swap (GPT GUIDs; MBR type bytes).
NOT_A_SLOT = {BIOS_GRUB, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
              "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "82", "EF", "05", "0F", "85"}
EXT = ("ext2", "ext3", "ext4")
# Words of the running kernel's command line that each boot entry sets itself.
OWN_WORDS = re.compile(r"(BOOT_IMAGE|root|initrd|abupgrade\.[a-z_]+)=")
# UEFI's global variable that says whether Secure Boot is on (4 bytes of attributes, then 1).
SECURE_BOOT_VAR = "SecureBoot-8be4df61-93ca-11d0-aae4-00e098032b8c"


@dataclass(frozen=True)
class Running:
    """The running machine as adopt reads it; a test points these at files and a mounted
    disk (`prefix` is where the machine's / is: every path is written under it)."""

    prefix: Path = Path("/")
    mountinfo: Path = mounts.MOUNTINFO
    cmdline: Path = Path("/proc/cmdline")
    release: str = field(default_factory=lambda: os.uname().release)
    efi: Path = Path("/sys/firmware/efi")  # there only when the firmware is UEFI

    def firmware(self) -> tuple[Firmware, bool]:
        """The firmware the machine booted with, and whether Secure Boot is on: GRUB's
        settings record both, so `apply` refuses an unsigned kernel where shim would."""
        if not self.efi.is_dir():
            return Firmware.BIOS, False
        try:
            value = (self.efi / "efivars" / SECURE_BOOT_VAR).read_bytes()
        except OSError:
            return Firmware.UEFI, False
        return Firmware.UEFI, value[4:5] == b"\x01"

    def at(self, path: Path) -> Path:
        """Where the machine's absolute `path` is now."""
        return self.prefix / path.relative_to("/")


@dataclass(frozen=True)
class Part:
    """A partition of the machine's disk and its block device."""

    entry: Partition
    node: Path

    @property
    def spec(self) -> str:
        return f"PARTUUID={self.entry.partuuid}"


@dataclass(frozen=True)
class Layout:
    """What the checks found: the machine as abupgrade will see it."""

    disk: Path
    table: PartitionTable
    booted: Slot
    slots: dict[Slot, Part]
    boot: Part
    boot_uuid: str  # of the boot filesystem, which GRUB searches for
    state_dir: Path
    mounts: dict[Path, str]  # mount point -> device spec: /boot, and the state's partition
    kernel: Path
    initrd: Path | None
    cmdline: str  # the kernel command line both slots boot with (without root=)

    def grub_name(self, part: Part) -> str:
        """GRUB's name of a partition of the boot disk, the disk taken from the boot
        filesystem's (custom.cfg sets $ab_disk)."""
        label = "gpt" if self.table.kind is TableKind.GPT else "msdos"
        return f"($ab_disk,{label}{part.entry.number})"


@dataclass(frozen=True)
class Adopted:
    booted: Slot
    config: Path
    state_dir: Path
    slots: dict[Slot, str]
    written: tuple[Path, ...]
    hook: HookInstalled | None
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"booted": str(self.booted), "bootloader": str(BootloaderKind.GRUB),
                "config": str(self.config), "state_dir": str(self.state_dir),
                "slots": {str(s): self.slots[s] for s in Slot},
                "written": [str(p) for p in self.written],
                "hook": self.hook.to_json() if self.hook else None}


@dataclass(frozen=True)
class Undone:
    removed: tuple[Path, ...]
    kept: tuple[Path, ...]

    def to_json(self) -> dict[str, Any]:
        return {"removed": [str(p) for p in self.removed], "kept": [str(p) for p in self.kept]}


# ---------------------------------------------------------------- the checks


def _devices() -> list[slots.BlockDevice]:
    return slots.sysfs_block_devices()


def _partition(devno: int, what: str, devices: Sequence[slots.BlockDevice]
               ) -> slots.BlockDevice:
    found = next((d for d in devices if d.devno == devno), None)
    if found is None or found.parent is None or found.number is None:
        raise UsageError(f"{what} is not on a partition of a disk",
                         hint="adopt needs the slots and /boot on partitions of one disk "
                              "(not LVM, RAID or a whole disk)")
    return found


def _fs(node: Path) -> dict[str, str]:
    proc = run(["blkid", "-p", "-o", "export", node], check=False, timeout=30)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def inspect_machine(running: Running, *, other: str | None = None,
                    state_dir: Path | None = None, kernel: Path | None = None,
                    initrd: Path | None = None, cmdline: str | None = None) -> Layout:
    """Check that the running machine can come under abupgrade, and how; writes nothing."""
    all_mounts = mounts.read(running.mountinfo)
    by_point = {m.point: m for m in all_mounts}
    root = by_point.get(Path("/"))
    if root is None:
        raise OperationalError(f"{running.mountinfo} lists no root filesystem")
    devices = _devices()
    root_dev = _partition(root.devno, "the root filesystem", devices)
    disk = root_dev.parent
    assert disk is not None and root_dev.number is not None
    table = read_table(disk)
    if table is None:
        raise UsageError(f"{disk} has no partition table")
    nodes = {d.number: d.node for d in devices if d.parent == disk and d.number is not None}

    def part(number: int) -> Part:
        return Part(table.get(number), nodes[number])

    running_part = part(root_dev.number)
    boot_mount = by_point.get(BOOT_POINT)
    if boot_mount is None or boot_mount.devno == root.devno:
        raise UsageError("/boot is on the root filesystem",
                         hint="both slots boot from one /boot: it must be a partition of its "
                              "own, where GRUB keeps its files")
    boot_dev = _partition(boot_mount.devno, "/boot", devices)
    if boot_dev.parent != disk:
        raise UsageError(f"/boot ({boot_dev.node}) is not on the root's disk {disk}")
    assert boot_dev.number is not None
    boot = part(boot_dev.number)
    boot_fs = _fs(boot.node)
    if boot_fs.get("TYPE") not in EXT:
        raise UsageError(f"/boot ({boot.node}) is {boot_fs.get('TYPE', 'of no known type')}, "
                         "not ext2/3/4", hint="GRUB writes its environment blocks only there")
    grub_cfg = running.at(BOOT_POINT / "grub/grub.cfg")
    if not grub_cfg.is_file():
        raise UsageError(f"no {BOOT_POINT / 'grub/grub.cfg'}: this machine does not boot GRUB",
                         hint="adopt brings GRUB machines under abupgrade; for others lay "
                              "out a disk with `abupgrade disk init`")
    if "custom.cfg" not in grub_cfg.read_text(errors="replace"):
        raise UsageError(f"{BOOT_POINT / 'grub/grub.cfg'} does not source custom.cfg",
                         hint="make /etc/grub.d/41_custom executable and run update-grub")

    mounted = {m.devno for m in all_mounts}
    other_part = _other_slot(running_part, boot, table, nodes, mounted, other)
    first, second = sorted((running_part, other_part), key=_slot_order)
    layout_slots = {Slot.A: first, Slot.B: second}
    booted = Slot.A if first is running_part else Slot.B

    state = state_dir or _default_state_dir(by_point, {first.node, second.node}, devices)
    holder = mounts.point_holding(state, by_point)
    if holder is None or by_point[holder].devno in {os.stat(p.node).st_rdev
                                                   for p in layout_slots.values()}:
        raise UsageError(f"the state folder {state} is on a slot",
                         hint="its history must survive updates of either slot: put it on "
                              "/boot or a data partition (--state-dir)")
    mount_specs = {BOOT_POINT: boot.spec}
    if holder not in (BOOT_POINT, Path("/")):
        holder_dev = _partition(by_point[holder].devno, str(holder), devices)
        if holder_dev.parent != disk:
            raise UsageError(f"the state folder's partition {holder_dev.node} is not on {disk}")
        assert holder_dev.number is not None
        mount_specs[holder] = part(holder_dev.number).spec

    kernel = kernel or BOOT_POINT / f"vmlinuz-{running.release}"
    if not running.at(kernel).is_file():
        raise UsageError(f"no kernel at {kernel}", hint="name the running kernel with --kernel")
    if initrd is None:
        found = BOOT_POINT / f"initrd.img-{running.release}"
        initrd = found if running.at(found).is_file() else None
    elif not running.at(initrd).is_file():
        raise UsageError(f"no initrd at {initrd}")
    if cmdline is None:
        words = running.cmdline.read_text().split()
        cmdline = " ".join(w for w in words if not OWN_WORDS.match(w))
    return Layout(disk, table, booted, layout_slots, boot, boot_fs.get("UUID", ""), state,
                  mount_specs, kernel, initrd, cmdline)


def _slot_order(part: Part) -> tuple[int, int]:
    """Slot A first: by the GPT names `disk init` gives, else by partition number."""
    name = part.entry.name
    order = {SLOT_NAMES[Slot.A]: 0, SLOT_NAMES[Slot.B]: 1}
    return (order.get(name, 2) if name else 2, part.entry.number)


def _other_slot(running: Part, boot: Part, table: PartitionTable, nodes: dict[int, Path],
                mounted: set[int], other: str | None) -> Part:
    """The partition that becomes the other slot: `other`, or the one unmounted partition
    besides /boot that is no BIOS boot, EFI or swap partition and holds the running root's
    size (preferring one of exactly that size)."""
    def usable(entry: Partition) -> str | None:
        """Why `entry` cannot be the other slot; None when it can."""
        node = nodes.get(entry.number)
        if entry.number in (running.entry.number, boot.entry.number):
            return "it is the running root or /boot"
        if node is None:
            return "it has no device node"
        if os.stat(node).st_rdev in mounted:
            return "it is mounted"
        if entry.type.upper() in NOT_A_SLOT:
            return "its type is not a filesystem's"
        if entry.size < running.entry.size:
            return f"it is smaller ({entry.size:,} bytes) than the running root " \
                   f"({running.entry.size:,} bytes)"
        return None

    if other is not None:
        device = slots.resolve(other)
        entry = next((p for n, p in ((n, table.get(n)) for n in nodes)
                      if nodes[n] == device), None)
        if entry is None:
            raise UsageError(f"{other} ({device}) is not a partition of the root's disk")
        why = usable(entry)
        if why:
            raise UsageError(f"{other} ({device}) cannot be the other slot: {why}")
        return Part(entry, device)
    candidates = [p for p in table.partitions if usable(p) is None]
    exact = [p for p in candidates if p.size == running.entry.size]
    chosen = exact if len(exact) == 1 else candidates
    if len(chosen) != 1:
        listing = ", ".join(f"{nodes[p.number]} ({p.size:,} bytes)" for p in candidates)
        raise UsageError(
            "cannot tell the other root partition: "
            + (f"{len(candidates)} could be it: {listing}" if candidates else "none is unmounted "
               f"and at least as large as the running root ({running.entry.size:,} bytes)"),
            hint="name it with --other DEVICE (it is overwritten by the next apply)")
    return Part(chosen[0], nodes[chosen[0].number])


def _default_state_dir(by_point: dict[Path, mounts.Mount], slot_nodes: set[Path],
                       devices: Sequence[slots.BlockDevice]) -> Path:
    """/data/abupgrade where /data is a partition of its own, else on the boot partition."""
    data = by_point.get(DATA_POINT)
    slot_devnos = {os.stat(n).st_rdev for n in slot_nodes}
    if data is not None and data.devno not in slot_devnos and \
            any(d.devno == data.devno for d in devices):
        return DATA_POINT / "abupgrade"
    return BOOT_POINT / HOME / "state"


# ---------------------------------------------------------------- adopting


def adopt(running: Running, layout: Layout, *, compatible: str, pubkeys: Sequence[Path],
          version: str | None, tries: int, init: str | None, hook: bool,
          dry_run: bool = False) -> Adopted:
    """Bring the machine of `layout` under abupgrade (see the module's docstring)."""
    from abupgrade.image.keys import load_public

    boot = running.at(BOOT_POINT)
    if (boot / RECORD).exists() or (boot / ON_DISK_PATH).exists():
        raise PolicyRefusal("this machine is under abupgrade already",
                            hint="`abupgrade adopt --undo` first, to adopt it again")
    if running.at(DEFAULT_PATH).exists():
        raise UsageError(f"{DEFAULT_PATH} is in the way",
                         hint=f"adopt writes {BOOT_POINT / ON_DISK_PATH}, which both slots "
                              f"read; move {DEFAULT_PATH} away")
    if not compatible or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", compatible):
        raise UsageError(f"compatible string {compatible!r} is not a name",
                         hint="letters, digits and ._-, as images carry it")
    if not pubkeys:
        raise UsageError("adopt needs --pubkey: the keyring must trust the images' signer")
    for key in pubkeys:
        load_public(key)
    firmware, secure_boot = running.firmware()
    grub = GrubConfig(env=BOOT_POINT / HOME / "grubenv", tries=tries, firmware=str(firmware),
                      secure_boot=secure_boot)
    grub.check("--tries ")
    config = Config(compatible=compatible, bootloader=BootloaderKind.GRUB,
                    slots={slot: part.spec for slot, part in layout.slots.items()},
                    keyring=BOOT_POINT / HOME / "keys", state_dir=layout.state_dir,
                    bootloaders={BootloaderKind.GRUB: grub}, mounts=layout.mounts)
    roots = {slot: part.spec for slot, part in layout.slots.items()}
    script = render_cfg(boot_device="($ab_bootfs)", env_rel=str(HOME / "grubenv"),
                        parts={s: layout.grub_name(p) for s, p in layout.slots.items()},
                        roots=roots, cmdline=layout.cmdline, console="")
    if not re.fullmatch(r"[0-9A-Fa-f-]+", layout.boot_uuid):
        raise UsageError(f"the boot filesystem's UUID {layout.boot_uuid!r} is not one",
                         hint="give /boot a filesystem UUID (tune2fs -U random)")
    block = handover(layout.boot_uuid)
    kind = init if init is not None or not hook else integrations.detect(running.prefix)
    for folder, why in ((boot, "the boot partition"),
                        (running.at(layout.state_dir).parent, "the state folder's place"),
                        *(((running.at(Path("/etc")), "the root filesystem"),) if hook else ())):
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise OperationalError(f"{why} ({folder}) is not writable",
                                   hint="mount it read-write (mount -o remount,rw ...) first")
    config_path = BOOT_POINT / ON_DISK_PATH
    if dry_run:
        return Adopted(layout.booted, config_path, layout.state_dir,
                       {s: p.spec for s, p in layout.slots.items()}, (), None, dry_run=True)

    written: list[Path] = []  # machine paths, for the record and to take back on a failure
    hooked: list[Path] = []
    state_made = not running.at(layout.state_dir).exists()
    try:
        installed = _write_all(running, layout, written, hooked, config=config, script=script,
                               pubkeys=pubkeys, version=version, grub=grub, kind=kind,
                               hook=hook, block=block)
    except BaseException as exc:
        _take_back(running, written, hooked, layout.state_dir if state_made else None, kind)
        if isinstance(exc, OSError):
            raise OperationalError(f"adopt failed and was undone: {exc.strerror}: "
                                   f"{exc.filename}") from None
        raise
    return Adopted(layout.booted, config_path, layout.state_dir,
                   {s: p.spec for s, p in layout.slots.items()}, tuple(written), installed)


def _write_all(running: Running, layout: Layout, written: list[Path], hooked: list[Path], *,
               config: Config, script: str, pubkeys: Sequence[Path], version: str | None,
               grub: GrubConfig, kind: str | None, hook: bool, block: str) -> HookInstalled | None:
    """The writes of `adopt`, in an order where a failure (or a power cut) before the last
    leaves GRUB booting the machine as before; `written` and `hooked` say what is done."""
    boot = running.at(BOOT_POINT)

    def write(relative: Path, data: bytes, mode: int = 0o644) -> None:
        path = boot / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(BOOT_POINT / relative)
        atomic_write(path, data, mode)

    for key in pubkeys:
        write(HOME / "keys" / key.name, key.read_bytes())
    backend = Grub(replace(grub, env=boot / HOME / "grubenv"),
                   mountinfo=running.mountinfo)
    for name, source in (("kernel", layout.kernel), ("initrd", layout.initrd)):
        if source is not None:
            target = backend.boot_file_path(layout.booted, name)
            write(target.relative_to(boot), running.at(source).read_bytes())
    written += [BOOT_POINT / HOME / "grubenv", BOOT_POINT / HOME / "grubenv.1"]
    create_blocks(boot / HOME / "grubenv")
    if layout.booted is Slot.B:
        backend.commit(Slot.B)
        backend.disable(Slot.A)
    backend.preflight()
    write(HOME / "grub.cfg", script.encode())
    write(ON_DISK_PATH, render(config).encode())
    installed = None
    if hook:
        assert kind is not None
        hooked.append(running.prefix)
        installed = HookInstalled(kind, running.prefix,
                                  tuple(integrations.install(kind, running.prefix)))
    custom = boot / CUSTOM_CFG
    record = {"format": 1, "booted": str(layout.booted), "files": [str(p) for p in written],
              "custom_cfg_created": not custom.exists(), "state_dir": str(layout.state_dir),
              "hook": installed.to_json() if installed else None}
    write(RECORD, (json.dumps(record, indent=2) + "\n").encode())
    store = Store(running.at(layout.state_dir))
    store.ensure()
    store.save(State().with_slot(layout.booted, state=SlotState.GOOD, version=version))
    store.record(EventName.COMMITTED, layout.booted, version,
                 f"brought under abupgrade by `abupgrade adopt`; slot {layout.booted.other} "
                 "is empty until an image is applied to it")
    # The hand-over last: until it is on the disk, GRUB boots the machine as before.
    current = custom.read_text() if custom.exists() else ""
    atomic_write(custom, (strip_block(current) + block).encode())
    fsync_dir(custom.parent)
    os.sync()
    written.append(BOOT_POINT / CUSTOM_CFG)
    return installed


def _take_back(running: Running, written: Sequence[Path], hooked: Sequence[Path],
               state_dir: Path | None, kind: str | None) -> None:
    """Remove what a failed adopt wrote (the hand-over is never among it); `state_dir` when
    adopt made it."""
    import contextlib
    import shutil

    with contextlib.suppress(Exception):
        if hooked and kind is not None:
            integrations.remove(kind, running.prefix)
    for name in written:
        with contextlib.suppress(OSError):
            running.at(name).unlink()
    if state_dir is not None:
        shutil.rmtree(running.at(state_dir), ignore_errors=True)
    _drop_empty_folders(running, written)


def _drop_empty_folders(running: Running, files: Sequence[Path]) -> None:
    """The folders `files` were in, where they are empty now, up to the boot partition."""
    boot = running.at(BOOT_POINT)
    for folder in sorted({running.at(Path(f)).parent for f in files},
                         key=lambda p: -len(p.parts)):
        while folder != boot and boot in folder.parents and folder.is_dir() \
                and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def handover(boot_uuid: str) -> str:
    """The block of custom.cfg that finds the boot filesystem and runs abupgrade's script in
    a menu context of its own (its two entries, numbered 0 and 1 as it expects: GRUB's
    `fallback` takes numbers only). The disk's GRUB name goes along for the script's
    fallback paths into the slots."""
    return (f"{BEGIN}\n"
            f"if search --no-floppy --fs-uuid --set=ab_bootfs {boot_uuid}; then\n"
            "  regexp --set=1:ab_disk '^(.*),[^,]*$' \"$ab_bootfs\"\n"
            "  export ab_bootfs\n"
            "  export ab_disk\n"
            f'  configfile "($ab_bootfs)/{HOME}/grub.cfg"\n'
            "fi\n"
            f"{END}\n")


def strip_block(text: str) -> str:
    """custom.cfg without abupgrade's block (and with a final newline when not empty)."""
    lines = text.splitlines(keepends=True)
    if BEGIN + "\n" in lines:
        start = lines.index(BEGIN + "\n")
        end = next((i for i in range(start, len(lines)) if lines[i].rstrip("\n") == END),
                   len(lines) - 1)
        lines = lines[:start] + lines[end + 1:]
    kept = "".join(lines)
    return kept if not kept or kept.endswith("\n") else kept + "\n"


# ---------------------------------------------------------------- undoing


def undo(running: Running, booted: Slot | None, *, trial_pending: bool) -> Undone:
    """Take the machine out from under abupgrade: the hand-over first, then the files adopt
    wrote and the boot hook's integration; the state folder (its history) stays."""
    boot = running.at(BOOT_POINT)
    try:
        record = json.loads((boot / RECORD).read_text())
    except FileNotFoundError:
        raise UsageError("this machine was not brought under abupgrade by `adopt`",
                         hint="nothing to undo") from None
    adopted = Slot(record["booted"])
    if trial_pending:
        raise PolicyRefusal("a trial boot is pending",
                            hint="boot it and let the hook decide, or `abupgrade mark-bad` it")
    if booted != adopted:
        raise PolicyRefusal(
            f"running slot {booted or 'unknown'}, not slot {adopted} that was adopted",
            hint=f"the machine's own grub.cfg boots slot {adopted}'s system: "
                 f"`abupgrade rollback --reboot` to it first, then undo")
    custom = boot / CUSTOM_CFG
    removed: list[Path] = []
    if custom.exists():
        rest = strip_block(custom.read_text())
        if rest or not record.get("custom_cfg_created"):
            atomic_write(custom, rest.encode())
        else:
            custom.unlink()
        fsync_dir(custom.parent)
        removed.append(BOOT_POINT / CUSTOM_CFG)
    os.sync()  # GRUB boots as before from here on
    hook = record.get("hook")
    if hook:
        removed += integrations.remove(hook["init"], running.prefix)
    for name in [*record["files"], str(BOOT_POINT / RECORD)]:
        path = running.at(Path(name))
        path.unlink(missing_ok=True)
        removed.append(Path(name))
    state = Path(record["state_dir"])
    _drop_empty_folders(running, [Path(n) for n in record["files"]])
    kept = [state] if running.at(state).exists() else []
    home = boot / HOME
    if home.is_dir() and not any(home.iterdir()):
        home.rmdir()
    os.sync()
    return Undone(tuple(removed), tuple(kept))
