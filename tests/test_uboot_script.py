"""boot.scr's selection on real U-Boot (Debian's arm64 and x86 builds, in QEMU): every
decision compared with abupgrade's model of it, and power cuts at every kind of byte of
every environment write - abupgrade's and the script's own - decided by U-Boot itself.

One U-Boot start per architecture; each decision is `source` of boot.scr at U-Boot's
prompt against env bytes the host has just written (tens of milliseconds). The slots hold
no kernel, so the script ends after its choice."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from abupgrade.bootloader.base import Arch
from abupgrade.bootloader.uboot import (
    ARCHES,
    MANAGED,
    SCRIPT_NAME,
    EnvState,
    ScriptParams,
    compile_script,
    render_script,
    updated,
)
from abupgrade.bootloader.ubootenv import (
    Environment,
    current,
    format_copy,
    parse_copy,
    parse_locations,
)
from abupgrade.model import Slot
from fixtures.guest import GuestUnavailable, partition_disk, require_tools
from fixtures.uboot import Console, script_lines

pytestmark = [pytest.mark.boot]

SIZE = 0x4000
OFFSETS = (0x100000, 0x104000)
LAYOUT = """label: gpt
first-lba: 4096
size=8M, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=boot
size=1M, name=rootfs_a
size=1M, name=rootfs_b
"""
ROOTS = {Slot.A: "PARTLABEL=rootfs_a", Slot.B: "PARTLABEL=rootfs_b"}
FRESH = EnvState(default=Slot.A, good=frozenset({Slot.A}))


@dataclass(frozen=True)
class Verdict:
    lines: list[str]
    boot: str
    fallback: str
    copy: str
    tried: bool
    after: list[bytes]  # both copies once the script ran


class Judge:
    """A decision disk (env area, FAT boot partition with boot.scr, empty slots) and a
    U-Boot console on it."""

    def __init__(self, disk: Path, console: Console) -> None:
        self.disk = disk
        self.console = console
        self.runs = 0

    def area(self) -> list[bytes]:
        with open(self.disk, "rb") as f:
            return [os.pread(f.fileno(), SIZE, off) for off in OFFSETS]

    def put(self, raw: Sequence[bytes]) -> None:
        with open(self.disk, "r+b") as f:
            for data, off in zip(raw, OFFSETS, strict=True):
                os.pwrite(f.fileno(), data, off)

    def decide(self, raw: Sequence[bytes]) -> Verdict:
        self.put(raw)
        self.runs += 1
        lines = script_lines(self.console.command("source ${scriptaddr}"))
        chosen = [ln for ln in lines if ln.startswith("boot slot=")]
        assert len(chosen) == 1, lines
        found = re.fullmatch(r"boot slot=(\S+) fallback=(\S+) copy=(\S+)", chosen[0])
        assert found, chosen
        tried = any(ln.startswith("try slot=") for ln in lines)
        return Verdict(lines, found[1], found[2], found[3], tried, self.area())


def make_decision_disk(work: Path, arch: str) -> Path:
    require_tools("sfdisk", "mkfs.vfat", "mcopy", "mkimage")
    disk = partition_disk(work / f"decide-{arch}.img", 16 << 20, LAYOUT)
    locations = parse_locations([f"{disk} {off:#x} {SIZE:#x}" for off in OFFSETS])
    text = render_script(ScriptParams(
        locations=locations, storage="virtio 0", boot_partition=1,
        slot_partitions={Slot.A: 2, Slot.B: 3}, slot_roots=ROOTS,
        cmdline=f"console={ARCHES[Arch(arch)].console} panic=5", arch=ARCHES[Arch(arch)]))
    script = work / SCRIPT_NAME
    script.write_bytes(compile_script(text, ARCHES[Arch(arch)]))
    fat = work / f"boot-{arch}.fat"
    fat.unlink(missing_ok=True)
    subprocess.run(["mkfs.vfat", "-C", str(fat), str(8 * 1024)], check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", str(fat), str(script), "::" + SCRIPT_NAME], check=True)
    with open(disk, "r+b") as out:
        os.pwrite(out.fileno(), fat.read_bytes(), 2 << 20)
    return disk


@pytest.fixture(scope="module", params=["arm64", "amd64"])
def judge(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Judge]:
    arch = str(request.param)
    try:
        disk = make_decision_disk(tmp_path_factory.mktemp(f"uboot-{arch}"), arch)
        with Console(disk, arch=arch) as console:
            console.command("setenv devtype virtio; setenv devnum 0; virtio scan")
            console.command(f"load virtio 0:1 ${{scriptaddr}} {SCRIPT_NAME}")
            yield Judge(disk, console)
    except GuestUnavailable as exc:
        pytest.skip(str(exc))


def copies(state: EnvState, *, flags: tuple[int, int] = (1, 2),
           extra: Mapping[str, str] | None = None) -> list[bytes]:
    """Both copies holding `state`, copy 1 newer unless `flags` say otherwise."""
    variables = updated(dict(extra or {}), state)
    return [format_copy(variables, SIZE, f) for f in flags]


def expected(raw: Sequence[bytes]) -> tuple[str, bool, EnvState | None]:
    """What abupgrade's model says boot.scr does with these bytes: the slot it boots, whether
    it spends a trial boot, and the state it leaves (None: no valid copy)."""
    now = current(raw)
    if now.index is None:
        return "A", False, None
    state = EnvState.from_vars(now.variables)
    boot = state.boot_state()
    spend = boot.trial is not None and boot.tries_left > 0
    return boot.next_boot.value, spend, state


def check(judge: Judge, raw: Sequence[bytes]) -> Verdict:
    """U-Boot's decision on `raw` must be the model's, and so must what it wrote."""
    verdict = judge.decide(raw)
    boot, spend, state = expected(raw)
    assert (verdict.boot, verdict.tried) == (boot, spend), (verdict.lines, state)
    before, after = current(raw), current(verdict.after)
    if not spend:
        assert verdict.after == list(raw), verdict.lines
        return verdict
    assert state is not None and before.index is not None
    assert verdict.copy == str(before.index)
    assert after.index == before.target, "the script wrote the copy in force"
    assert verdict.after[before.index] == raw[before.index]
    assert after.variables == {**{k: v for k, v in before.variables.items() if k in MANAGED},
                               "bootcount": str(state.bootcount + 1)}
    return verdict


TRIAL = replace(FRESH, trial=Slot.B, bootlimit=3)
BOTH = EnvState(default=Slot.B, good=frozenset(Slot))
CASES = {
    "fresh": copies(FRESH),
    "default-B-both-good": copies(BOTH),
    "default-bad-other-good": copies(replace(BOTH, good=frozenset({Slot.A}))),
    "trial-first-boot": copies(TRIAL),
    "trial-last-boot": copies(replace(TRIAL, bootcount=2)),
    "trial-spent": copies(replace(TRIAL, bootcount=3)),
    "trial-of-A-on-B": copies(replace(BOTH, trial=Slot.A, bootlimit=9, bootcount=8)),
    "copy-0-newer": copies(TRIAL, flags=(9, 8)),
    "flags-wrap": [format_copy(updated({}, FRESH), SIZE, 0xFF),
                   format_copy(updated({}, TRIAL), SIZE, 0x00)],
    "flags-255-current": [format_copy(updated({}, TRIAL), SIZE, 0xFF),
                          format_copy(updated({}, FRESH), SIZE, 0xFE)],
    "copy-1-torn": [format_copy(updated({}, TRIAL), SIZE, 4),
                    format_copy(updated({}, FRESH), SIZE, 5)[:100] + bytes(SIZE - 100)],
    "both-torn": [bytes(SIZE), b"\xff" * SIZE],
    "foreign-variables": copies(TRIAL, extra={"board": "rev 2", "bootcmd": "reset"}),
}


@pytest.mark.parametrize("case", CASES)
def test_u_boot_decides_as_the_model_says(judge: Judge, case: str) -> None:
    verdict = check(judge, CASES[case])
    if case == "both-torn":
        assert "no valid environment copy, booting slot A" in verdict.lines
    if case == "flags-255-current":
        assert parse_copy(verdict.after[1]).flags == 0  # 0 follows 255
    if case == "trial-first-boot":
        assert verdict.fallback == "A"


def test_garbage_counts_and_limits_never_boot_the_trial(judge: Judge) -> None:
    for bootcount, bootlimit in (("x", "3"), ("10", "11"), ("3", "x"), ("-1", "3"), ("", "3")):
        variables = {**dict(updated({}, TRIAL)), "bootcount": bootcount, "bootlimit": bootlimit}
        raw = [format_copy([(k, v) for k, v in variables.items() if v], SIZE, f)
               for f in (1, 2)]
        verdict = check(judge, raw)
        assert not verdict.tried and verdict.boot == "A", (bootcount, bootlimit)


def cut_points(old: bytes, new: bytes) -> list[int]:
    """Where a write of `new` over `old` may stop: every byte of the header and of the
    first entries, every 8th byte up to the last changed one and around it, and every
    sector boundary."""
    changed = [i for i in range(len(new)) if new[i] != old[i]]
    last = changed[-1] + 1 if changed else 0
    points = {*range(0, 16), *range(0, last + 8, 8), last - 1, last, last + 1,
              *range(0, len(new) + 1, 512)}
    return sorted(p for p in points if 0 <= p <= len(new))


# The arm64 build only: the x86 build runs the same script through the cases above.
@pytest.mark.parametrize("judge", ["arm64"], indirect=True)
def test_power_cuts_in_every_write_of_a_trial_story(judge: Judge, tmp_path: Path) -> None:
    """A trial from arming to commit, every write cut at many bytes: abupgrade arms B
    (writes 1-2), the script spends three boots (writes 3-5), abupgrade commits B (6).
    After every cut U-Boot boots what the model says, which is the state before or after
    that write, and never finds the environment unreadable."""
    area = tmp_path / "area.img"
    with open(area, "wb") as f:
        f.truncate(OFFSETS[1] + SIZE)
    env = Environment([(area, loc) for loc in parse_locations(
        [f"{area} {off:#x} {SIZE:#x}" for off in OFFSETS])])
    raw = copies(FRESH)
    judge.put(raw)

    def abupgrade(state: EnvState) -> list[bytes]:
        with open(area, "r+b") as f:
            for data, off in zip(raw, OFFSETS, strict=True):
                os.pwrite(f.fileno(), data, off)
        env.write(updated(env.current().variables, state))
        with open(area, "rb") as f:
            return [os.pread(f.fileno(), SIZE, off) for off in OFFSETS]

    writes = 0
    cuts = 0
    steps: list[str] = ["disable B", "arm B", "boot", "boot", "boot", "commit B"]
    for step in steps:
        if step == "boot":
            new = judge.decide(raw).after
        elif step == "disable B":
            new = abupgrade(FRESH)
        elif step == "arm B":
            new = abupgrade(TRIAL)
        else:
            new = abupgrade(BOTH)
        index = [i for i in (0, 1) if new[i] != raw[i]]
        assert len(index) == 1, f"{step}: one copy changes per write"
        target = index[0]
        outcomes = {expected(raw)[0], expected(new)[0]}
        for k in cut_points(raw[target], new[target]):
            torn = list(raw)
            torn[target] = new[target][:k] + raw[target][k:]
            verdict = check(judge, torn)
            assert verdict.boot in outcomes, (step, k)
            assert verdict.copy != "none", (step, k)
            cuts += 1
        raw = new
        writes += 1
    state = EnvState.from_vars(current(raw).variables)
    assert (state.default, state.trial, state.good) == (Slot.B, None, frozenset(Slot))
    assert writes == len(steps) and cuts > 300
