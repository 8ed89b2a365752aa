"""Power cuts in everything the systemd-boot backend writes to the ESP, decided from the bytes.

Each operation (an install into a slot, a commit, a rollback, a mark-bad) runs on a real
FAT32 image through fat.py's mtools path, with every write recorded (fixtures/fatlog:
mtools opens the image O_SYNC, so writes reach the disk in order; within one write the
sectors may land in any subset). For every cut state:
1. the loader's choice is decided from what mtools reads of the image (bls.py has
   systemd-boot's rules): something must boot, it must be abupgrade's entry, and its
   kernel and initrd must be one complete image the slot holds at that instant;
2. the machine then goes on as in the field: it boots (the loader's counter rename), the
   hook commits that slot if it was a trial, an update goes into the other slot, its
   trial boots and runs out, and the first slot must boot again, its files intact;
3. fsck.fat must then find no file on freed clusters and no clusters shared but by names
   of one slot (kin: a cut rename's 8.3 remnant), which are only ever removed together.
Layouts: a fresh ESP, and an "aged" one whose entries straddle directory sectors.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from abupgrade.bootloader.base import BOOT_FILES
from abupgrade.bootloader.systemd_boot import (
    ENTRIES,
    LOADER_CONF,
    Esp,
    Name,
    boot_path,
    entry_name,
    entry_text,
    execute,
    kernel_options,
    kin_of,
    plan_arm_trial,
    plan_commit,
    plan_disable,
    plan_drop_files,
    plan_tidy,
    read_esp,
)
from abupgrade.fat import Fat, MtoolsFat, mkfs_fat32
from abupgrade.model import Slot
from fixtures.fatlog import RecordingFat, cut_states
from fixtures.reliability import record
from fixtures.sdboot import esp_of_image, lookup, read_image, snapshot

A, B = Slot.A, Slot.B
SIZE = 40 << 20
TRIES = 3
KERNEL_SIZE, INITRD_SIZE = 2 << 10, 1 << 10  # several clusters each (and few sectors)

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("mkfs.fat", "fsck.fat", "mcopy", "strace")),
    reason="needs dosfstools, mtools and strace (scripts/setup installs them)")


def payload(slot: Slot, version: str, name: str) -> bytes:
    size = KERNEL_SIZE if name == "kernel" else INITRD_SIZE
    seed = hashlib.sha256(f"{slot}/{version}/{name}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def version_of(slot: Slot, name: str, data: bytes) -> str | None:
    for version in "123456789":
        if data == payload(slot, version, name):
            return version
    return None


def options(slot: Slot) -> str:
    return kernel_options(slot, f"root=PARTLABEL=rootfs_{slot.value.lower()} console=ttyS0")


Mark = Callable[[Slot, set[str]], None]


def _no_mark(slot: Slot, versions: set[str]) -> None:
    pass


# ---------------------------------------------------------------- the backend's operations


Reader = Callable[[Fat], Esp]


def fast(scratch: Path) -> Reader:
    """Two mtools calls per read (the sweep's own reads; the operations under test read
    through the backend's read_esp)."""
    def read(fat: Fat) -> Esp:
        assert isinstance(fat, MtoolsFat)
        return esp_of_image(fat.image, scratch)
    return read


def tidy(fat: Fat, read: Reader = read_esp) -> None:
    execute(fat, plan_tidy(read(fat)))


def install(fat: Fat, slot: Slot, version: str, scratch: Path, mark: Mark = _no_mark,
            tries: int = TRIES, read: Reader = read_esp) -> None:
    """What `apply` does on the ESP: disable, drop the old files, write, arm."""
    tidy(fat, read)
    esp = read(fat)
    if esp.names(slot):
        execute(fat, plan_disable(esp, slot))
    mark(slot, set())  # from here the slot's rootfs is being written
    execute(fat, plan_drop_files(read(fat), slot))
    for name in BOOT_FILES:
        source = scratch / f"{slot}-{version}-{name}"
        source.write_bytes(payload(slot, version, name))
        fat.copy_in(boot_path(slot, name), source)
    mark(slot, {version})
    execute(fat, plan_arm_trial(read(fat), slot, tries, options=options(slot)))


def commit(fat: Fat, slot: Slot, read: Reader = read_esp) -> None:
    tidy(fat, read)
    execute(fat, plan_commit(read(fat), slot, options=options(slot)))


def disable(fat: Fat, slot: Slot) -> None:
    tidy(fat)
    execute(fat, plan_disable(read_esp(fat), slot))


def loader_boot(fat: Fat, read: Reader = read_esp) -> Slot:
    """One start of systemd-boot: its choice, and the counter rename (mtools stands in for
    the firmware's FAT driver here; the real loader's renames are swept in the boot tier)."""
    esp = read(fat)
    chosen = esp.choice()
    assert chosen is not None, "the loader finds nothing to boot"
    name = Name.parse(chosen.name)
    assert name is not None, f"the loader boots {chosen.name}"
    if chosen.counter is not None:
        target = chosen.counter.bumped().name()
        if not fat.exists(f"{ENTRIES}/{target}"):
            fat.rename(f"{ENTRIES}/{chosen.name}", f"{ENTRIES}/{target}")
    return name.slot


# ---------------------------------------------------------------- machines


def new_esp(image: Path, *, fillers: int) -> None:
    """A fresh disk's ESP: slot A's files and its entry, after `fillers` one-slot names in
    loader/entries that move the entries written later across directory sectors."""
    with open(image, "wb") as f:
        f.truncate(SIZE)
    mkfs_fat32(image, label="ESP")
    with MtoolsFat(image) as fat:
        for folder in (ENTRIES, f"abupgrade/{A}", f"abupgrade/{B}"):
            fat.mkdir(folder)
        fat.write("loader/loader.conf", LOADER_CONF.encode())
        for i in range(fillers):
            fat.write(f"{ENTRIES}/F{i}.TXT", b"x")
        for name in BOOT_FILES:
            fat.write(boot_path(A, name), payload(A, "1", name))
        fat.write(f"{ENTRIES}/{entry_name(A)}", entry_text(A, 1, options=options(A), initrd=True))


@dataclass
class Outcome:
    states: int = 0
    continued: int = 0
    boots: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)


# Free cluster counts (FSInfo), lost clusters and orphaned long-name parts are leaks: harmless.
FSCK_BAD = re.compile(r"contains a free cluster|cluster chain length|bad fat|bad cluster|"
                      r"invalid|corrupt", re.IGNORECASE)


def fsck_problems(image: Path) -> list[str]:
    """fsck.fat's findings that matter: files on free clusters, sizes beyond the chain, and
    clusters shared but by kin of one slot (never removed one without the other; fsck's
    truncation of the second of such a pair is its repair, not a finding)."""
    out = subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True,
                         check=False).stdout
    blocks: list[tuple[list[str], list[str]]] = []  # (paths, messages)
    for line in out.splitlines()[1:]:
        if line.startswith("/"):
            if blocks and not blocks[-1][1]:
                blocks[-1][0].append(line.strip().removesuffix("and").strip())
            else:
                blocks.append(([line.strip().removesuffix("and").strip()], []))
        elif line.startswith("  ") and blocks:
            blocks[-1][1].append(line.strip())
    problems, truncated = [], set()
    for paths, messages in blocks:
        text = " ".join(messages)
        if "share clusters" in text:
            slots = {kin_of(Path(p).name) for p in paths}
            if len(slots) == 1 and None not in slots:
                truncated.add(paths[-1])
                continue
            problems.append(f"{' and '.join(paths)}: {text}")
        elif paths[0] in truncated and "cluster chain length is 0 bytes" in text:
            continue
        elif FSCK_BAD.search(text):
            problems.append(f"{paths[0]}: {text}")
    return problems


def check_boot(image: Path, scratch: Path,
               complete: dict[Slot, set[str]]) -> tuple[Slot, str, dict[str, bytes]]:
    """What the loader boots from the bytes of `image` (the slot, the version of its files,
    and the files mtools reads); an AssertionError when that is not a complete image of a
    slot."""
    files, unreadable = read_image(image, scratch)
    esp = snapshot(files)
    entries_unreadable = [p for p in unreadable if p.lower().startswith(ENTRIES + "/")
                          and p.lower().endswith(".conf")]
    assert not entries_unreadable, f"the loader's view is unknown: {entries_unreadable} unreadable"
    chosen = esp.choice()
    assert chosen is not None and chosen.linux is not None, "nothing to boot: the loader waits"
    name = Name.parse(chosen.name)
    assert name is not None, f"the loader boots {chosen.name}, not abupgrade's"
    kernel = lookup(files, chosen.linux)
    assert kernel is not None and kernel not in unreadable
    version = version_of(name.slot, "kernel", files[kernel])
    assert version in complete[name.slot], \
        f"slot {name.slot} boots kernel version {version}, complete: {complete[name.slot]}"
    initrds = [lookup(files, p) for p in chosen.initrds]
    assert len(initrds) == 1, f"{chosen.name} names initrds {chosen.initrds}"
    initrd = initrds[0]
    assert initrd is not None and initrd not in unreadable, "the initrd is missing: the loader hangs"
    assert version_of(name.slot, "initrd", files[initrd]) == version
    assert chosen.options is not None and f"abupgrade.slot={name.slot}" in chosen.options
    return name.slot, version, files


def go_on(image: Path, scratch: Path, booted: Slot, version: str, *, full: bool) -> None:
    """The machine after the cut: it boots, the hook commits a trial and tidies; then the
    FAT must be consistent but for kin sharing clusters (so no later allocation can land on
    a file in use). With `full`, also: an update goes into the other slot, its trial runs
    out, and `booted` boots again, its files intact."""
    work = scratch / "go-on.img"
    shutil.copyfile(image, work)
    read = fast(scratch)
    with MtoolsFat(work) as fat:
        assert loader_boot(fat, read) is booted
        if not any(p.counter is None for p in read(fat).names(booted).values()):
            commit(fat, booted, read)  # the hook: healthy trial
        tidy(fat, read)
        if full:
            install(fat, booted.other, "9", scratch, tries=1, read=read)
            assert loader_boot(fat, read) is booted.other
            assert loader_boot(fat, read) is booted  # the trial ran out
    if full:
        slot, again, _ = check_boot(work, scratch, {booted: {version}, booted.other: set()})
        assert (slot, again) == (booted, version)
    problems = fsck_problems(work)
    assert not problems, problems


def structure(image: Path, files: dict[str, bytes]) -> str:
    """What the continuation depends on: the reserved sectors (FSInfo's next-free hint
    steers allocation), the first FAT (what mtools and firmware read; the second is only
    fsck's), every directory's clusters and the entries' contents - not what other files
    hold (states that differ only in how much of a kernel reached the disk go on alike)."""
    with open(image, "rb") as f:
        boot = f.read(512)
        sector, per_cluster = int.from_bytes(boot[11:13], "little"), boot[13]
        reserved, fats = int.from_bytes(boot[14:16], "little"), boot[16]
        fat_sectors = int.from_bytes(boot[36:40], "little")
        data = (reserved + fats * fat_sectors) * sector
        h = hashlib.sha256(boot + f.read((reserved + fat_sectors) * sector - 512))
        env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
        dirs = ["::/", *sorted({"::/" + str(Path(p).parent) for p in files if "/" in p})]
        chains = subprocess.run(["mshowfat", "-i", str(image), *dirs], capture_output=True,
                                text=True, env=env, check=False).stdout
        for first, last in re.findall(r"<(\d+)(?:-(\d+))?>", chains):
            for cluster in range(int(first), int(last or first) + 1):
                if cluster >= 2:
                    f.seek(data + (cluster - 2) * per_cluster * sector)
                    h.update(f.read(per_cluster * sector))
    for name in sorted(files):
        if name.lower().startswith(ENTRIES + "/"):
            h.update(name.encode() + b"\0" + files[name])
    return h.hexdigest()


Op = Callable[[Fat, Path, Mark], None]


def sweep(tmp: Path, *, fillers: int, setup: Callable[[Fat, Path], None], op: Op,
          complete: dict[Slot, set[str]]) -> Outcome:
    image, before = tmp / "esp.img", tmp / "before.img"
    new_esp(image, fillers=fillers)
    with MtoolsFat(image) as fat:
        setup(fat, tmp)
    shutil.copyfile(image, before)
    marks: list[tuple[int, Slot, set[str]]] = []
    with RecordingFat(image) as rec:
        op(rec, tmp, lambda slot, versions: marks.append((len(rec.writes), slot, versions)))
    outcome = Outcome()
    checked: set[tuple[Slot, str, str]] = set()
    carried_on: set[tuple[Slot, str, tuple[str, ...]]] = set()
    for what, state in cut_states(before, rec.writes, tmp):
        m = re.match(r"after (?:all )?(\d+)", what)
        assert m is not None, what
        done = int(m[1])
        now = {slot: set(versions) for slot, versions in complete.items()}
        for at, slot, versions in marks:
            if at <= done:
                now[slot] = versions
        outcome.states += 1
        try:
            slot, version, files = check_boot(state, tmp, now)
            outcome.boots[f"{slot}{version}"] += 1
            key = (slot, version, structure(state, files))
            names = (slot, version, tuple(sorted(p.lower() for p in files)))
            if key not in checked:
                checked.add(key)
                full = names not in carried_on
                carried_on.add(names)
                outcome.continued += full
                go_on(state, tmp, slot, version, full=full)
        except AssertionError as exc:
            outcome.bad.append(f"{what}: {exc}")
    return outcome


# ---------------------------------------------------------------- the cases


def _nothing(fat: Fat, scratch: Path) -> None:
    pass


def _b_on_trial(fat: Fat, scratch: Path) -> None:
    install(fat, B, "2", scratch)
    assert loader_boot(fat) is B


def _b_committed(fat: Fat, scratch: Path) -> None:
    _b_on_trial(fat, scratch)
    commit(fat, B)


def _b_spent(fat: Fat, scratch: Path) -> None:
    install(fat, B, "2", scratch)
    for _ in range(TRIES):
        assert loader_boot(fat) is B
    assert loader_boot(fat) is A


CASES: dict[str, tuple[Callable[[Fat, Path], None], Op, dict[Slot, set[str]]]] = {
    "install B": (_nothing, lambda f, s, m: install(f, B, "2", s, m), {A: {"1"}, B: set()}),
    "commit B": (_b_on_trial, lambda f, s, m: commit(f, B), {A: {"1"}, B: {"2"}}),
    "mark-bad B on trial": (_b_on_trial, lambda f, s, m: disable(f, B), {A: {"1"}, B: {"2"}}),
    "fallback: B marked bad": (_b_spent, lambda f, s, m: disable(f, B), {A: {"1"}, B: {"2"}}),
    "rollback to A": (_b_committed, lambda f, s, m: commit(f, A), {A: {"1"}, B: {"2"}}),
    "install A over A": (_b_committed, lambda f, s, m: install(f, A, "3", s, m),
                         {A: {"1"}, B: {"2"}}),
    "install B over spent B": (_b_spent, lambda f, s, m: install(f, B, "4", s, m),
                               {A: {"1"}, B: {"2"}}),
}


# Layouts (fillers before slot A's entry): with 9 the new entries of an install, with 10 the
# renames of commit and rollback straddle a directory sector boundary (found by trying 0-15).
LAYOUTS = {"install B": (0, 9), "install A over A": (0, 9), "install B over spent B": (0, 9)}


@pytest.mark.parametrize(("case", "fillers"), [
    (case, fillers) for case in CASES for fillers in LAYOUTS.get(case, (0, 10))])
def test_every_cut_boots_a_complete_slot(tmp_path: Path, case: str, fillers: int) -> None:
    setup, op, complete = CASES[case]
    out = sweep(tmp_path, fillers=fillers, setup=setup, op=op, complete=complete)
    record("powercut", f"systemd-boot/{case}/{fillers}", tried=out.states, bricks=len(out.bad))
    assert out.states > 1
    assert not out.bad, f"{len(out.bad)} of {out.states} cut states:\n" + "\n".join(out.bad[:8])
