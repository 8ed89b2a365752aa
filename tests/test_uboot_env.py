"""The U-Boot environment: fw_env.config lines, the redundant format, the choice of the copy
in force, and round trips with the real fw_printenv / fw_setenv (libubootenv-tool) on the
same bytes, power cuts inside a write included."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from abupgrade.bootloader.uboot import MANAGED, EnvState, updated
from abupgrade.bootloader.ubootenv import (
    HEADER,
    EnvCopy,
    Environment,
    EnvLocation,
    check_storage,
    current,
    format_copy,
    newer,
    parse_copy,
    parse_locations,
)
from abupgrade.errors import UsageError
from abupgrade.model import Slot

SIZE = 0x4000
OFFSETS = (0x100000, 0x104000)


# ---------------------------------------------------------------- fw_env.config lines

@pytest.mark.parametrize(("line", "expected"), [
    ("/dev/mmcblk0 0x100000 0x4000", EnvLocation("/dev/mmcblk0", 0x100000, 0x4000)),
    ("/dev/mmcblk0 1048576 4000", EnvLocation("/dev/mmcblk0", 0x100000, 0x4000)),
    ("/dev/sda 0400 0x200 0x200 1", EnvLocation("/dev/sda", 0o400, 0x200, 0x200, 1)),
    ("/dev/mmcblk0 -0x8000 0x4000  # at the end", EnvLocation("/dev/mmcblk0", -0x8000, 0x4000)),
])
def test_location_lines_are_read_as_libubootenv_reads_them(line: str,
                                                           expected: EnvLocation) -> None:
    assert EnvLocation.parse(line) == expected
    assert EnvLocation.parse(expected.line()) == expected


@pytest.mark.parametrize("line", ["/dev/mmcblk0 0x100000", "/dev/mmcblk0 0x1g 0x4000",
                                  "/dev/mmcblk0 0x100000 0x4", "/dev/x 0 0x4000 1 2 3",
                                  "/dev/mmcblk0 08 0x4000"])
def test_malformed_location_lines_are_usage_errors(line: str) -> None:
    with pytest.raises(UsageError):
        EnvLocation.parse(line)


@pytest.mark.parametrize("lines", [
    ["/dev/mmcblk0 0x100000 0x4000"],
    ["/dev/mmcblk0 0x100000 0x4000", "/dev/mmcblk0 0x104000 0x2000"],
    ["/dev/mmcblk0 0x100000 0x4000", "/dev/mmcblk0 0x102000 0x4000"],
])
def test_copies_must_be_two_of_one_size_apart(lines: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        parse_locations(lines)
    assert info.value.hint or "overlap" in info.value.message


# ---------------------------------------------------------------- one copy, and the choice

def test_a_copy_is_crc_flags_then_nul_separated_entries() -> None:
    data = format_copy([("b", "2"), ("a", "one = 1")], 64, 0x107)
    assert len(data) == 64 and data[4] == 0x07
    assert data[HEADER:].rstrip(b"\0") == b"b=2\0a=one = 1"
    assert int.from_bytes(data[:4], "little") == zlib.crc32(data[HEADER:])
    copy = parse_copy(data)
    assert copy == EnvCopy(True, 7, (("b", "2"), ("a", "one = 1")))
    torn = data[:10] + b"x" + data[11:]
    assert not parse_copy(torn).valid


@pytest.mark.parametrize(("name", "value"), [("", "x"), ("a=b", "x"), ("#c", "x"), (" a", "x"),
                                             ("a", ""), ("a", "x\0y")])
def test_names_and_values_u_boot_would_misread_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        format_copy([(name, value)], 64, 1)


def test_a_full_environment_is_refused() -> None:
    with pytest.raises(ValueError):
        format_copy([("a", "x" * 60)], 64, 1)


@pytest.mark.parametrize(("flags", "expected"), [
    ((1, 2), 1), ((2, 1), 0), ((0xFF, 0), 1), ((0, 0xFF), 0), ((7, 7), 0),
    ((0xFE, 0xFF), 1), ((0x10, 0xFF), 1),
])
def test_the_newer_copy_has_the_greater_flags_and_zero_follows_255(
        flags: tuple[int, int], expected: int) -> None:
    copies = [EnvCopy(True, f) for f in flags]
    assert newer(copies) == expected
    assert newer([EnvCopy(False, flags[0]), EnvCopy(True, flags[1])]) == 1
    assert newer([EnvCopy(True, flags[0]), EnvCopy(False, flags[1])]) == 0
    assert newer([EnvCopy(False, flags[0]), EnvCopy(False, flags[1])]) is None


# ---------------------------------------------------------------- the real tools

FW_PRINTENV = shutil.which("fw_printenv")
FW_SETENV = shutil.which("fw_setenv")


@pytest.fixture
def area(tmp_path: Path) -> tuple[Environment, Path]:
    """A 2 MiB disk image file with both copies valid (state: A good, the default), and
    the fw_env.config that names them."""
    if FW_PRINTENV is None or FW_SETENV is None:
        pytest.skip("fw_printenv/fw_setenv are not installed (apt-get install libubootenv-tool)")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(2 << 20)
    lines = [f"{disk} {offset:#x} {SIZE:#x}" for offset in OFFSETS]
    config = tmp_path / "fw_env.config"
    config.write_text("# two copies\n" + "\n".join(lines) + "\n")
    env = Environment([(disk, loc) for loc in parse_locations(lines)])
    fresh = EnvState(default=Slot.A, good=frozenset({Slot.A})).variables()
    env.write(fresh.items())
    env.write(fresh.items())
    return env, config


def printenv(config: Path) -> dict[str, str]:
    assert FW_PRINTENV is not None
    out = subprocess.run([FW_PRINTENV, "-c", str(config)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def setenv(config: Path, *args: str) -> None:
    assert FW_SETENV is not None
    subprocess.run([FW_SETENV, "-c", str(config), *args], check=True, timeout=30,
                   capture_output=True)


@pytest.mark.loop
def test_fw_printenv_reads_every_write_of_abupgrade_across_the_flags_wrap(
        area: tuple[Environment, Path]) -> None:
    env, config = area
    seen_flags = set()
    for n in range(260):
        variables = {**env.current().variables, "bootcount": str(n % 10), "round": str(n)}
        after = env.write(variables.items())
        seen_flags.add(after.flags)
        if n % 37 == 0 or after.flags in (0xFF, 0, 1):
            assert printenv(config) == variables, (n, after)
    assert {0xFF, 0x00} <= seen_flags
    assert printenv(config) == env.current().variables


@pytest.mark.loop
def test_abupgrade_reads_what_fw_setenv_writes_and_keeps_it(
        area: tuple[Environment, Path], tmp_path: Path) -> None:
    env, config = area
    setenv(config, "bootcount", "2")
    setenv(config, "board_serial", "x 1=2")
    script = tmp_path / "script"
    script.write_text("ab_trial=B\nupgrade_available=1\n")
    setenv(config, "-s", str(script))
    now = env.current()
    assert now.variables["board_serial"] == "x 1=2"
    state = EnvState.from_vars(now.variables)
    assert (state.trial, state.bootcount, state.tries_left) == (Slot.B, 2, 1)
    # abupgrade's write keeps what it does not manage; fw_printenv sees both.
    env.write(updated(now.variables, EnvState(default=Slot.B, good=frozenset(Slot))))
    printed = printenv(config)
    assert printed["board_serial"] == "x 1=2" and printed["ab_default"] == "B"
    assert printed["upgrade_available"] == "0" and printed["ab_trial"] == "-"
    assert set(MANAGED) <= set(printed)
    setenv(config, "board_serial")  # deleted by fw_setenv: gone for abupgrade too
    assert "board_serial" not in env.current().variables


@pytest.mark.loop
def test_a_write_cut_at_any_byte_leaves_the_old_or_the_new_state_for_both_readers(
        area: tuple[Environment, Path]) -> None:
    """The write of a trial into the older copy, cut after k bytes (the rest of that copy
    as it was): abupgrade and fw_printenv agree on every such disk, and it is the old
    state until the very last changed byte is written."""
    env, config = area
    disk = env.copies[0][0]
    before = disk.read_bytes()
    old = env.current()
    new_vars = updated(old.variables, EnvState(default=Slot.A, good=frozenset({Slot.A}),
                                               trial=Slot.B, bootlimit=3))
    env.write(new_vars)
    after = disk.read_bytes()
    target = OFFSETS[old.target]
    new_copy = after[target:target + SIZE]
    old_copy = before[target:target + SIZE]
    changed = [i for i in range(SIZE) if new_copy[i] != old_copy[i]]
    last = changed[-1] + 1
    cuts = sorted({*range(0, last + 2), *range(0, SIZE + 1, 512)})
    seen = set()
    for k in cuts:
        torn = new_copy[:k] + old_copy[k:]
        disk.write_bytes(before[:target] + torn + before[target + SIZE:])
        mine = env.current().variables
        assert mine == (dict(new_vars) if k >= last else old.variables), k
        assert printenv(config) == mine, k
        seen.add(k >= last)
    assert seen == {False, True}


@pytest.mark.parametrize(("line", "complaint"), [
    ("{disk} 0x100000 0x4000", None),
    ("{disk} 0x1000 0x4000", "overlaps the partition table"),
    ("{disk} 0x1fc000 0x8000", "overlaps partition 1"),
    ("{disk} -0x2000 0x1000", "overlaps the backup partition table"),
    ("{disk} 0x7ff000 0x4000", "does not fit"),
    ("/dev/null 0x0 0x4000", "raw flash"),
    ("{disk}.d 0x0 0x4000", "neither a block device nor a file"),
    ("{disk}.missing 0x0 0x4000", "does not exist"),
])
def test_storage_a_write_would_damage_is_refused(tmp_path: Path, line: str,
                                                 complaint: str | None) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk is not installed")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"label: gpt\nstart=2M, size=2M\n",
                   check=True, capture_output=True)
    (tmp_path / "disk.img.d").mkdir()
    location = EnvLocation.parse(line.format(disk=disk))
    if complaint is None:
        check_storage(Path(location.device), location)
        return
    with pytest.raises(UsageError, match=complaint):
        check_storage(Path(location.device), location)


def test_the_state_of_an_environment_as_boot_scr_reads_it() -> None:
    state = EnvState.from_vars({"ab_default": "B", "ab_A": "g", "ab_B": "g", "ab_trial": "A",
                                "upgrade_available": "1", "bootcount": "1", "bootlimit": "3"})
    assert (state.default, state.trial, state.tries_left) == (Slot.B, Slot.A, 2)
    assert state.boot_state().next_boot is Slot.A
    spent = EnvState.from_vars({**state.variables(), "bootcount": "3"})
    assert spent.tries_left == 0 and spent.boot_state().next_boot is Slot.B
    # Not pending without upgrade_available=1; garbage counts are no boots left.
    assert EnvState.from_vars({**state.variables(), "upgrade_available": "0"}).trial is None
    assert EnvState.from_vars({**state.variables(), "bootcount": "x"}).tries_left == 0
    assert EnvState.from_vars({**state.variables(), "bootlimit": "10"}).tries_left == 0


def test_no_valid_copy_reads_as_nothing_and_the_first_write_goes_to_copy_0() -> None:
    blank = bytes(SIZE)
    now = current([blank, blank])
    assert now.index is None and now.variables == {} and now.target == 0
    written = format_copy([("a", "1")], SIZE, now.flags + 1)
    assert current([written, blank]).index == 0
