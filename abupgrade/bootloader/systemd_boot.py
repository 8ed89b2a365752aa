"""The systemd-boot backend (UEFI): Boot Loader Specification entries on the ESP, and
systemd-boot's own boot counting.

What is on the EFI system partition:
- `EFI/BOOT/BOOTX64.EFI`: systemd-boot (package systemd-boot-efi), at the removable-media
  path every UEFI firmware boots without a boot entry;
- `loader/loader.conf`: no menu (`timeout 0`, `editor no`), no automatic entries, no
  random-seed writes, and `default slot-*` (abupgrade's entries, never another OS's);
- `abupgrade/<A|B>/vmlinuz`, `initrd.img`: each slot's kernel and initrd (the loader reads
  nothing but the ESP);
- `loader/entries/slot-<a|b>[+LEFT-DONE].conf`: one entry per slot, `sort-key abupgrade`,
  `version G` where G is abupgrade's generation (not the image version: see below).

The state is in the entry names (see bls.py for how the loader reads them):
- `slot-b.conf`: slot B is good;
- `slot-b+3-0.conf`: a trial of B with 3 boots left. The loader renames it `+2-1`, `+1-2`,
  `+0-3` before each boot; with 0 left it sorts after every other entry, so the good slot
  boots: the fallback needs nothing from the OS;
- `slot-b+0-K.conf`: spent, a trial that ran out: booted only when no other entry can be;
- `slot-b-kept+0-K.conf`: a good slot a rollback set aside: spent to the loader too, good
  to abupgrade (a rollback or a mark-bad of the other slot makes it `slot-b.conf` again);
- no name: the slot cannot boot.
The loader boots the first entry of its order: non-spent before spent, then the highest
`version`. A trial is armed with a generation above every entry's, so it boots first;
committing renames it `slot-b.conf` and it keeps its place; a rollback renames the entry
of the slot it leaves `slot-a-kept+0-0.conf`. No entry is ever rewritten in place: every
change is one file created under a name the loader ignores and renamed once, a rename, or a
removal.
Image versions do not order anything, so downgrades and rollbacks work like upgrades.

Power cuts (the ESP is FAT: no journal; see abupgrade/fat.py for what each call writes):
- a rename is one directory write; cut, the loader sees the old name, the new one, or
  neither (LFN and 8.3 parts in different sectors: the 8.3 remnant `SLOT-B~1.CON` is no
  `.conf` to the loader). Every step below is ordered so that each of these leaves an
  entry for a complete, good slot first in the loader's order;
- names that may share clusters after a cut (a slot's names, its `.abupgrade-new`
  leftovers and 8.3 remnants) are only removed together, in one step with no file created
  in between; leftovers of a slot are removed before anything is written for it.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, ClassVar, cast

from abupgrade import slots
from abupgrade.bootloader import bls
from abupgrade.bootloader.base import (
    BOOT_FILES,
    KERNEL_CMDLINE,
    SLOT_NAMES,
    Bootloader,
    BootState,
    DiskLayout,
    DiskPlan,
    Firmware,
    PlannedPartition,
    Platform,
    Role,
)
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.fat import NEW_SUFFIX, Fat, open_fat
from abupgrade.model import Slot
from abupgrade.partitions import EFI_SYSTEM, PartitionSpec, TableKind
from abupgrade.schema import Table, error

ENTRIES = bls.ENTRIES_DIR
BOOT_DIR = "abupgrade"
LOADER_EFI = "EFI/BOOT/BOOTX64.EFI"
SORT_KEY = "abupgrade"
LOADER_SOURCE = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")  # systemd-boot-efi
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # systemd-boot's EFI variables
EFIVARS = Path("/sys/firmware/efi/efivars")
ESP_SIZE = 256 << 20  # systemd-boot, and a kernel and initrd per slot
MAX_TRIES = 99

LOADER_CONF = """\
# Managed by abupgrade. systemd-boot boots the first entry of its order: entries with tries
# left before spent ones (+0-N), then the highest version (abupgrade's generation).
timeout 0
editor no
auto-entries no
auto-firmware no
random-seed-mode off
default slot-*
"""

_NAME = re.compile(r"slot-([ab])(-kept)?(?:\+(\d+)(?:-(\d+))?)?\.conf", re.IGNORECASE)
KEPT = "-kept"  # a good slot set aside by a rollback: slot-a-kept+0-0.conf
# The 8.3 name left when a cut separates a long name from its short entry (mtools and
# Linux both make `SLOT-B~1.CON` of `slot-b...conf`, `SLOT-B~1.ABU` of its leftover).
_REMNANT = re.compile(r"SLOT-([AB])~\d+\.(CON|ABU)", re.IGNORECASE)


def entry_name(slot: Slot, left: int | None = None, done: int = 0, *, kept: bool = False) -> str:
    base = f"slot-{slot.value.lower()}" + (KEPT if kept else "")
    return f"{base}.conf" if left is None else f"{base}+{left}-{done}.conf"


def boot_path(slot: Slot, name: str) -> str:
    """A boot file's path on the ESP ("kernel" or "initrd")."""
    try:
        return f"{BOOT_DIR}/{slot.value}/{BOOT_FILES[name]}"
    except KeyError:
        raise ValueError(f"unknown boot file {name!r}; known: {', '.join(BOOT_FILES)}") from None


@dataclass(frozen=True)
class Name:
    """An entry file name of abupgrade's: `slot-b.conf` (good), `slot-b+L-D.conf` (a trial,
    spent when L is 0), `slot-b-kept+0-D.conf` (good, set aside: sorted last)."""

    slot: Slot
    counter: bls.Counter | None
    kept: bool = False

    @property
    def left(self) -> int | None:
        return self.counter.left if self.counter else None

    @property
    def spent(self) -> bool:
        return self.counter is not None and self.counter.left == 0

    @classmethod
    def parse(cls, name: str) -> Name | None:
        m = _NAME.fullmatch(name)
        if m is None:
            return None
        counter = bls.parse_counter(name)
        kept = m[2] is not None
        if kept and (counter is None or counter.left):
            return None  # not a name abupgrade writes; the loader would put it first
        return cls(Slot(m[1].upper()), counter, kept)


def kin_of(name: str) -> Slot | None:
    """The slot whose entry a file of loader/entries may share clusters with: its names,
    their `.abupgrade-new` leftovers and 8.3 remnants."""
    base = name[: -len(NEW_SUFFIX)] if name.lower().endswith(NEW_SUFFIX) else name
    parsed = Name.parse(base)
    if parsed is not None:
        return parsed.slot
    m = _REMNANT.fullmatch(name)
    return Slot(m[1].upper()) if m else None


def entry_text(slot: Slot, generation: int, *, options: str, initrd: bool) -> bytes:
    lines = [f"title abupgrade slot {slot}", f"sort-key {SORT_KEY}", f"version {generation}",
             f"linux /{boot_path(slot, 'kernel')}"]
    if initrd:
        lines.append(f"initrd /{boot_path(slot, 'initrd')}")
    lines.append(f"options {options}")
    return ("\n".join(lines) + "\n").encode()


def kernel_options(slot: Slot, line: str) -> str:
    """A slot's kernel command line as its entry passes it: the configured one with a
    `panic=` timeout (5 s unless it sets one) and `abupgrade.slot=` last, so that nothing
    overrides it."""
    words = [w for w in line.split() if not w.startswith("abupgrade.slot=")]
    if not any(w.startswith("panic=") for w in words):
        words.append("panic=5")
    return " ".join([*words, f"abupgrade.slot={slot.value}"])


# ---------------------------------------------------------------- what is on the ESP


@dataclass(frozen=True)
class Esp:
    """What the loader reads: the files of loader/entries (name -> bytes, None where a file
    could not be read), the paths of the files that exist (lower-case: FAT ignores case;
    at least each slot's folder and every file an entry names), loader.conf, and the EFI
    variables that steer the loader."""

    entries: Mapping[str, bytes | None]
    files: frozenset[str]
    loader_conf: bytes | None = LOADER_CONF.encode()
    efivars: bls.EfiVars = field(default_factory=bls.EfiVars)

    def exists(self, path: str) -> bool:
        return path.lower() in self.files

    def slot_files(self, slot: Slot) -> list[str]:
        """The names in the slot's folder."""
        folder = f"{BOOT_DIR}/{slot.value}/".lower()
        return sorted(f[len(folder):] for f in self.files
                      if f.startswith(folder) and "/" not in f[len(folder):])

    def has_file(self, slot: Slot, name: str) -> bool:
        return self.exists(boot_path(slot, name))

    def names(self, slot: Slot) -> dict[str, Name]:
        return {n: p for n in self.entries if (p := Name.parse(n)) is not None and p.slot is slot}

    def kin(self, slot: Slot) -> list[str]:
        return sorted(n for n in self.entries if kin_of(n) is slot)

    def loader_entries(self) -> list[bls.Entry]:
        readable = {n: c for n, c in self.entries.items() if c is not None}
        return bls.load_entries(readable, self.exists)

    def ours(self) -> list[tuple[Name, bls.Entry]]:
        return [(p, e) for e in self.loader_entries() if (p := Name.parse(e.name)) is not None]

    def generation(self) -> int:
        """The highest `version` among abupgrade's entries (0 when there is none)."""
        found = [int(e.version) for _, e in self.ours() if e.version and e.version.isdigit()]
        return max(found, default=0)

    def choice(self, *, spend_trials: bool = False) -> bls.Entry | None:
        """The entry the loader boots next; with `spend_trials`, once every trial of
        abupgrade's has no boots left."""
        entries = self.loader_entries()
        if spend_trials:
            entries = [_spent(e) for e in entries]
        return bls.choose(entries, bls.LoaderConf.parse(self.loader_conf), self.efivars)

    def state(self) -> BootState:
        """The BootState the loader will act on (see base.BootState): the default is what
        boots once any trial is spent; a slot is bootable while it has an entry the loader
        keeps (spent ones too: the loader boots them when nothing else is left); a trial is
        a slot without a good name whose counting entry boots next. With no entry at all
        (a new disk) slot A is the default and nothing is bootable."""
        chosen = self.choice()
        if chosen is None:  # a new disk before its first image: nothing boots yet
            return BootState(default=Slot.A, bootable=frozenset())
        first = _slot_of(chosen)
        default = _slot_of(self.choice(spend_trials=True) or chosen)
        ours = self.ours()
        good = {p.slot for p, _ in ours if p.counter is None}
        parsed = Name.parse(chosen.name)
        if parsed is not None and parsed.left and first not in good:
            return BootState(default=default, bootable=frozenset(p.slot for p, _ in ours),
                             trial=first, tries_left=parsed.left)
        return BootState(default=default, bootable=frozenset(p.slot for p, _ in ours))


def _spent(entry: bls.Entry) -> bls.Entry:
    if entry.counter is None or Name.parse(entry.name) is None:
        return entry
    return entry.with_name(bls.Counter(entry.counter.prefix, 0, entry.counter.done).name())


def _slot_of(entry: bls.Entry) -> Slot:
    parsed = Name.parse(entry.name)
    if parsed is None:
        raise OperationalError(f"systemd-boot would boot {entry.name}, which is not abupgrade's",
                               hint=f"remove it from {ENTRIES} or set `default` in loader.conf")
    return parsed.slot


# ---------------------------------------------------------------- planning (pure)


@dataclass(frozen=True)
class Remove:
    path: str


@dataclass(frozen=True)
class Create:
    """A new file: written under a name the loader ignores, then renamed (fat.write)."""

    path: str
    data: bytes


@dataclass(frozen=True)
class Rename:
    source: str
    target: str


Step = Remove | Create | Rename


def _entries(name: str) -> str:
    return f"{ENTRIES}/{name}"


def plan_tidy(esp: Esp) -> list[Step]:
    """Leftovers of interrupted writes, removed before anything is created: every kin of
    a slot that has no entry (its leftovers, remnants), and `.abupgrade-new` files of the
    slots' folders when the slot has no entry. A slot with an entry keeps its remnants:
    they may share clusters with it."""
    steps: list[Step] = []
    for slot in Slot:
        if esp.names(slot):
            continue
        steps += [Remove(_entries(n)) for n in sorted(esp.kin(slot))]
    return steps


def plan_disable(esp: Esp, slot: Slot) -> list[Step]:
    """Remove every name of `slot` (spent and counting ones first, the good name last) and
    its kin; when the other slot boots only as a set-aside entry, that becomes its good
    name first. Refused when the other slot could then not boot."""
    steps: list[Step] = []
    names = esp.names(slot)
    other = [(p, e) for p, e in esp.ours() if p.slot is slot.other]
    if names and not any(not p.spent for p, _ in other):
        kept = bls.sort_entries([e for p, e in other if p.kept])
        if not kept:
            raise PolicyRefusal(f"cannot disable slot {slot}: slot {slot.other} cannot boot",
                                hint="the machine would be left without a bootable slot")
        steps.append(Rename(_entries(kept[0].name), _entries(entry_name(slot.other))))
    order = sorted(esp.kin(slot), key=lambda n: (n in names and names[n].counter is None, n))
    return steps + [Remove(_entries(n)) for n in order]


def plan_drop_files(esp: Esp, slot: Slot) -> list[Step]:
    """Every file of the slot's folder (boot files, leftovers, remnants: they may share
    clusters). An entry of the slot the loader would still start is refused; entries it
    skips already (their kernel is missing) go first, with their kin."""
    if any(p.slot is slot for p, _ in esp.ours()):
        raise OperationalError(f"slot {slot} still has an entry; its files stay",
                               hint=f"abupgrade mark-bad {slot} first")
    steps: list[Step] = [Remove(_entries(n)) for n in esp.kin(slot)] if esp.names(slot) else []
    return steps + [Remove(f"{BOOT_DIR}/{slot.value}/{f}") for f in esp.slot_files(slot)]


def plan_arm_trial(esp: Esp, slot: Slot, tries: int, *, options: str) -> list[Step]:
    """A new entry `slot-x+N-0.conf` above every other one. The slot must have no entry
    (`disable` ran before its files were written) and its files must be in place."""
    if tries < 1:
        raise ValueError("a trial needs at least one boot")
    if esp.names(slot):
        raise OperationalError(f"slot {slot} still has an entry; it must be disabled first",
                               hint=f"abupgrade mark-bad {slot}")
    _require_files(esp, slot, "try")
    text = entry_text(slot, esp.generation() + 1, options=options,
                      initrd=esp.has_file(slot, "initrd"))
    return [Create(_entries(entry_name(slot, tries)), text)]


def plan_commit(esp: Esp, slot: Slot, *, options: str) -> list[Step]:
    """`slot` good and first: its counting, spent or set-aside name renamed `slot-x.conf`
    (nothing when it has a good name already), then every good entry ranked above it set
    aside (`slot-y-kept+0-K.conf`). A slot without an entry (the first image of a disk) gets
    a new one above every other."""
    _require_files(esp, slot, "commit")
    names = esp.names(slot)
    if not names:
        text = entry_text(slot, esp.generation() + 1, options=options,
                          initrd=esp.has_file(slot, "initrd"))
        return [Create(_entries(entry_name(slot)), text)]
    steps: list[Step] = []
    taken = set(esp.entries)
    if not any(p.counter is None for p in names.values()):
        source = _best(esp, slot)
        steps.append(Rename(_entries(source), _entries(entry_name(slot))))
        taken.add(entry_name(slot))
    for rival in _outranking(esp, slot):
        target = _kept_name(slot.other, taken)
        taken.add(target)
        steps.append(Rename(_entries(rival), _entries(target)))
    return steps


def _best(esp: Esp, slot: Slot) -> str:
    """Which of the slot's names the loader would pick (the first of its order)."""
    mine = [e for p, e in esp.ours() if p.slot is slot]
    if not mine:
        raise OperationalError(f"the entry of slot {slot} cannot be read or names no kernel",
                               hint=f"abupgrade mark-bad {slot}, then install it again")
    return bls.sort_entries(mine)[0].name


def _outranking(esp: Esp, slot: Slot) -> list[str]:
    """Good names of the other slot that the loader would put before `slot`'s entry."""
    mine = [e for p, e in esp.ours() if p.slot is slot]
    if not mine:
        return []
    own = bls.sort_entries(mine)[0]
    own = own.with_name(entry_name(slot))  # as it will be named
    return sorted(e.name for p, e in esp.ours()
                  if p.slot is slot.other and p.counter is None and bls.compare(e, own) < 0)


def _kept_name(slot: Slot, taken: Iterable[str]) -> str:
    used = {n.lower() for n in taken}
    done = 0
    while entry_name(slot, 0, done, kept=True).lower() in used:
        done += 1
    return entry_name(slot, 0, done, kept=True)


def _require_files(esp: Esp, slot: Slot, action: str) -> None:
    if not esp.has_file(slot, "kernel"):
        raise OperationalError(f"cannot {action} slot {slot}: its kernel is not on the ESP",
                               hint="install an image into the slot first")


# ---------------------------------------------------------------- on a FAT filesystem


def read_esp(fat: Fat, efivars: bls.EfiVars | None = None) -> Esp:
    """The ESP as the loader reads it (through fat.py: mtools or the kernel)."""
    entries: dict[str, bytes | None] = {}
    try:
        listed = fat.list(ENTRIES)
    except FileNotFoundError:
        listed = []
    for found in listed:
        if found.is_dir:
            continue
        content: bytes | None = None
        if found.name.lower().endswith(bls.SUFFIX):
            try:
                content = fat.read(f"{ENTRIES}/{found.name}")
            except (OperationalError, FileNotFoundError):
                content = None  # unreadable here; its kin say what it is
        entries[found.name] = content
    files: set[str] = set()
    for slot in Slot:
        folder = f"{BOOT_DIR}/{slot.value}"
        try:
            files |= {f"{folder}/{e.name}".lower() for e in fat.list(folder) if not e.is_dir}
        except FileNotFoundError:
            pass
    for name, content in entries.items():
        entry = bls.Entry.parse(name, content) if content is not None else None
        for path in (entry.linux, *entry.initrds) if entry and entry.linux else ():
            if path.lower() not in files and fat.exists(path):
                files.add(path.lower())
    try:
        conf: bytes | None = fat.read(bls.LOADER_CONF_PATH)
    except FileNotFoundError:
        conf = None
    return Esp(entries=entries, files=frozenset(files), loader_conf=conf,
               efivars=efivars or bls.EfiVars())


def execute(fat: Fat, steps: Iterable[Step]) -> None:
    """Carry out planned steps in order, each on the disk before the next."""
    for step in steps:
        if isinstance(step, Remove):
            fat.remove(step.path)
        elif isinstance(step, Create):
            fat.write(step.path, step.data)
        else:
            fat.rename(step.source, step.target)


# ---------------------------------------------------------------- the backend


@dataclass(frozen=True)
class SystemdBootConfig(Table):
    """`[systemd-boot]`: the EFI system partition (a device spec, or a FAT image file), the
    boots a trial gets, each slot's kernel command line (abupgrade adds `abupgrade.slot=`,
    and `panic=5` when it names no `panic=`), and where the running machine shows its EFI
    variables."""

    esp: str = field(default="PARTLABEL=esp",
                     metadata={"device": True, "what": "a device spec (PARTLABEL=, ...)"})
    tries: int = 3
    options_a: str = f"root=PARTLABEL={SLOT_NAMES[Slot.A]} {KERNEL_CMDLINE}"
    options_b: str = f"root=PARTLABEL={SLOT_NAMES[Slot.B]} {KERNEL_CMDLINE}"
    efivars: Path | None = field(default=EFIVARS, metadata={"host": True})

    def check(self, where: str) -> None:
        if not 1 <= self.tries <= MAX_TRIES:
            raise error(where, f"tries must be between 1 and {MAX_TRIES}")
        for key in ("options_a", "options_b"):
            if "panic=0" in getattr(self, key).split():
                raise error(where, f"{key}: panic=0 never reboots a panicking kernel, so a "
                                   "trial that panics would never fall back")

    def options(self, slot: Slot) -> str:
        return kernel_options(slot, self.options_a if slot is Slot.A else self.options_b)


class SystemdBoot(Bootloader):
    """Boot Loader Specification entries on the ESP; systemd-boot counts the trials."""

    name = "systemd-boot"
    settings_type = SystemdBootConfig
    settings: SystemdBootConfig
    requires_boot_files: ClassVar[tuple[str, ...]] = ("kernel",)
    platforms: ClassVar[tuple[Platform, ...]] = (Platform(Firmware.UEFI),)

    # -- disk init

    @classmethod
    def plan(cls, platform: Platform, *, slot_size: int, boot_size: int) -> DiskPlan:
        """GPT: the ESP (which holds the slots' kernels), then the A/B layout."""
        cls.require_platform(platform)
        esp = PlannedPartition(Role.ESP, PartitionSpec(ESP_SIZE, EFI_SYSTEM, "esp"))
        return DiskPlan.ab(TableKind.GPT, slot_size=slot_size, boot_size=boot_size,
                           before=(esp,), platform=platform)

    @classmethod
    def new_settings(cls, plan: DiskPlan) -> SystemdBootConfig:
        def options(slot: Slot) -> str:
            name = plan.partitions[plan.number(Role.of(slot)) - 1].spec.name
            return f"root=PARTLABEL={name} {KERNEL_CMDLINE}"

        esp = plan.partitions[plan.number(Role.ESP) - 1].spec.name
        return SystemdBootConfig(esp=f"PARTLABEL={esp}", options_a=options(Slot.A),
                                 options_b=options(Slot.B))

    def install(self, layout: DiskLayout) -> None:
        """systemd-boot at the removable-media path, loader.conf, the folders; no entry yet
        (the first image's commit writes slot A's)."""
        if not LOADER_SOURCE.is_file():
            raise OperationalError(f"{LOADER_SOURCE} is missing",
                                   hint="apt-get install systemd-boot-efi")
        with open_fat(layout.esp, mountinfo=self.mountinfo) as fat:
            for folder in (str(PurePosixPath(LOADER_EFI).parent), ENTRIES,
                           *(f"{BOOT_DIR}/{slot.value}" for slot in Slot)):
                fat.mkdir(folder)
            fat.copy_in(LOADER_EFI, LOADER_SOURCE)
            fat.write(bls.LOADER_CONF_PATH, LOADER_CONF.encode())

    # -- the running machine

    @contextlib.contextmanager
    def _esp(self) -> Iterator[Fat]:
        """The ESP: the partition `esp` names, or a FAT image file (building an image)."""
        spec = self.settings.esp
        image = Path(spec)
        device = image if image.is_absolute() and image.is_file() else slots.resolve(spec)
        with open_fat(device, mountinfo=self.mountinfo) as fat:
            yield fat

    def _efivars(self) -> bls.EfiVars:
        folder = self.settings.efivars
        if folder is None:
            return bls.EfiVars()
        return bls.EfiVars(entry_default=efivar(folder, "LoaderEntryDefault"),
                           entry_oneshot=efivar(folder, "LoaderEntryOneShot"))

    def _read(self, fat: Fat) -> Esp:
        return read_esp(fat, self._efivars())

    def _change(self, plan: Callable[[Esp], list[Step]]) -> None:
        """Leftovers of an interrupted change first (before anything is allocated), then
        the planned steps."""
        with self._esp() as fat:
            execute(fat, plan_tidy(self._read(fat)))
            execute(fat, plan(self._read(fat)))

    def preflight(self) -> None:
        where = "lay the disk out with `abupgrade disk init --bootloader systemd-boot`"
        with self._esp() as fat:
            if not fat.exists(LOADER_EFI):
                raise UsageError(f"no systemd-boot at {LOADER_EFI} on the ESP ({fat.where})",
                                 hint=where)
            try:
                conf = bls.LoaderConf.parse(fat.read(bls.LOADER_CONF_PATH))
            except FileNotFoundError:
                raise UsageError(f"no {bls.LOADER_CONF_PATH} on the ESP ({fat.where})",
                                 hint=where) from None
            if conf.default is not None and not all(
                    bls.efi_fnmatch(conf.default.lower(), n) for n in _SAMPLE_NAMES):
                raise UsageError(f"{bls.LOADER_CONF_PATH} says `default {conf.default}`, which "
                                 "overrides the order abupgrade's trials rely on",
                                 hint="set `default slot-*` there, or remove the line")
            self._read(fat).state()
            if not fat.writable():
                raise UsageError(f"the ESP ({fat.where}) is not writable",
                                 hint="mount it read-write (blockdev --setrw for a device)")
        chosen = self._efivars().entry_default
        if chosen is not None:
            raise UsageError(f"the EFI variable LoaderEntryDefault ({chosen!r}) makes "
                             "systemd-boot ignore abupgrade's order of entries",
                             hint="remove it: bootctl set-default ''")

    def read(self) -> BootState:
        with self._esp() as fat:
            return self._read(fat).state()

    def disable(self, slot: Slot) -> None:
        self._change(lambda esp: plan_disable(esp, slot))

    def arm_trial(self, slot: Slot, tries: int) -> None:
        options = self.settings.options(slot)
        self._change(lambda esp: plan_arm_trial(esp, slot, tries, options=options))

    def commit(self, slot: Slot) -> None:
        options = self.settings.options(slot)
        self._change(lambda esp: plan_commit(esp, slot, options=options))

    def trial_boots(self) -> int:
        return self.settings.tries

    def platform(self) -> Platform:
        return self.platforms[0]

    def notes(self) -> tuple[str, ...]:
        """The entry systemd-boot started in this boot (LoaderEntrySelected), and whether it
        failed to count it: it sets LoaderBootCountPath only after its rename worked."""
        folder = self.settings.efivars
        selected = efivar(folder, "LoaderEntrySelected") if folder is not None else None
        if selected is None or folder is None:
            return ()
        notes = [f"systemd-boot started {selected} in this boot"]
        if bls.parse_counter(selected) and efivar(folder, "LoaderBootCountPath") is None:
            notes.append(f"systemd-boot could not count this boot of {selected} (its rename "
                         "failed): a second name of the entry may be on the ESP")
        return tuple(notes)

    # -- boot files, on the ESP

    def boot_file_path(self, slot: Slot, name: str) -> Path:
        """The boot file's path on the ESP (from its root)."""
        return Path("/", boot_path(slot, name))

    @contextlib.contextmanager
    def boot_file_writer(self, slot: Slot, name: str) -> Iterator[BinaryIO]:
        boot_path(slot, name)  # an unknown name fails before anything is written
        with tempfile.NamedTemporaryFile(prefix=f"abupgrade-{name}-") as tmp:
            yield cast(BinaryIO, tmp)
            tmp.flush()
            with self._esp() as fat:
                execute(fat, plan_tidy(self._read(fat)))
                fat.copy_in(boot_path(slot, name), Path(tmp.name))

    def drop_boot_files(self, slot: Slot) -> None:
        self._change(lambda esp: plan_drop_files(esp, slot))

    def check_boot_files(self, slot: Slot) -> None:
        """systemd-boot starts EFI executables only: a kernel without the EFI stub would
        stop it in its menu."""
        with self._esp() as fat:
            kernel = fat.read(boot_path(slot, "kernel"))
        if not efi_executable(kernel):
            raise PolicyRefusal("the image's kernel is not an EFI executable; systemd-boot "
                                "boots only kernels built with the EFI stub (CONFIG_EFI_STUB)",
                                hint="build the image with a kernel that has the EFI stub "
                                     "(Debian's do)")


BACKEND = SystemdBoot

# Names of abupgrade's a loader.conf `default` must match for the trials to work.
_SAMPLE_NAMES = tuple(entry_name(slot, *counter) for slot in Slot
                      for counter in ((), (3, 0), (0, 3)))


def efivar(folder: Path, name: str) -> str | None:
    """A string variable of systemd-boot's (vendor GUID `LOADER_GUID`) as efivarfs shows
    it: 4 bytes of attributes, then UTF-16LE; None when it is not set."""
    try:
        raw = (folder / f"{name}-{LOADER_GUID}").read_bytes()
    except OSError:
        return None
    return raw[4:].decode("utf-16-le", errors="replace").split("\0", 1)[0] or None


def efi_executable(data: bytes) -> bool:
    """A PE image (`MZ`, and `PE\\0\\0` where its header points)."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return False
    pe = int.from_bytes(data[0x3C:0x40], "little")
    return data[pe:pe + 4] == b"PE\0\0"
