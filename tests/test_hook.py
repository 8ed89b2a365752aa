"""The boot hook on loop disks, both bootloaders: commit, rollback, fallback, timeouts,
idempotence, repair. A boot is emulated by what a bootloader and kernel leave behind: the
command line, the root mount and a new boot id (see fixtures/machine.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abupgrade.model import Slot
from fixtures.machine import Machine, running_machine
from fixtures.procs import dies_within
from fixtures.tiers import any_bootloader

pytestmark = pytest.mark.loop


@pytest.fixture
def machine(ab_disk: Path, tmp_path: Path) -> Iterator[Machine]:
    with running_machine(ab_disk, tmp_path / "machine", booted=Slot.A, health_timeout=3,
                         deadline=60) as m:
        yield m


def status(m: Machine) -> dict[str, object]:
    proc = m.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def slot_state(m: Machine, slot: str) -> str:
    slots = status(m)["slots"]
    assert isinstance(slots, dict)
    return str(slots[slot]["state"])


def events(m: Machine) -> list[dict[str, str]]:
    data: list[dict[str, str]] = json.loads(m.cli("history", "--json").stdout)
    return data


def armed(m: Machine, make_image: Callable[..., Path], version: str = "2.0") -> None:
    proc = m.cli("apply", str(make_image(version)))
    assert proc.returncode == 0, proc.stderr


def test_healthy_trial_is_committed(machine: Machine, make_image: Callable[..., Path]) -> None:
    env_dump = machine.workdir / "check-env"
    machine.add_check("required", "10-env",
                      f"env | grep -E '^ABUPGRADE_(SLOT|VERSION|PREVIOUS_VERSION|TRIAL)=' "
                      f"| sort > {env_dump}")
    armed(machine, make_image)
    machine.boot(Slot.B)
    proc = machine.cli("boot-hook", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "committed" in proc.stdout
    st = status(machine)
    assert st["next_boot"] == "B" and st["trial"] is None and slot_state(machine, "B") == "good"
    assert env_dump.read_text().split() == [
        "ABUPGRADE_PREVIOUS_VERSION=1.0", "ABUPGRADE_SLOT=B", "ABUPGRADE_TRIAL=1",
        "ABUPGRADE_VERSION=2.0"]
    assert [e["event"] for e in events(machine)][-2:] == ["trial-boot", "committed"]
    # a second run in the same boot changes nothing
    before = events(machine)
    again = machine.cli("boot-hook", "--no-reboot")
    assert again.returncode == 0 and "already ran" in again.stdout
    assert events(machine) == before
    # the next boot is a committed boot: nothing to do, nothing recorded
    machine.boot(Slot.B)
    proc = machine.cli("boot-hook", "--no-reboot", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["outcome"] == "committed-boot"
    assert events(machine) == before


def test_failing_required_check_rolls_back_and_reboots(
        machine: Machine, make_image: Callable[..., Path]) -> None:
    machine.add_check("required", "20-app", "echo starting app; echo 'app: port 443 closed' >&2; exit 3")
    machine.add_check("wanted", "30-nice", "exit 1")
    armed(machine, make_image)
    machine.boot(Slot.B)
    proc = machine.cli("boot-hook")
    assert proc.returncode == 5, proc.stderr
    assert "20-app" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "app: port 443 closed | (exit status 3)" in proc.stderr  # the tail of its output
    assert machine.reboot_marker.exists(), "the hook did not run the reboot command"
    st = status(machine)
    assert st["next_boot"] == "A" and slot_state(machine, "B") == "bad"
    last = events(machine)[-1]
    assert last["event"] == "rolled-back" and last["slot"] == "B"
    assert "20-app" in last["detail"] and "port 443 closed" in last["detail"]
    # back on A: a committed boot, nothing more to do; B is never tried again
    machine.boot(Slot.A)
    assert machine.cli("boot-hook", "--no-reboot").returncode == 0
    assert status(machine)["next_boot"] == "A"


@any_bootloader
def test_failing_wanted_check_is_only_recorded(
        machine: Machine, make_image: Callable[..., Path]) -> None:
    machine.add_check("wanted", "50-telemetry", "echo no network; exit 1")
    armed(machine, make_image)
    machine.boot(Slot.B)
    proc = machine.cli("boot-hook", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "50-telemetry" in events(machine)[-1]["detail"]
    assert status(machine)["next_boot"] == "B"


@any_bootloader
def test_hung_check_and_its_children_are_killed(
        machine: Machine, make_image: Callable[..., Path]) -> None:
    pidfile = machine.workdir / "child.pid"
    machine.add_check("required", "40-hang", f"sleep 300 & echo $! > {pidfile}; sleep 300")
    armed(machine, make_image)
    machine.boot(Slot.B)
    started = time.monotonic()
    proc = machine.cli("boot-hook", "--no-reboot")
    assert proc.returncode == 5
    assert time.monotonic() - started < 30
    assert "timed out" in proc.stderr
    assert dies_within(int(pidfile.read_text()), b"sleep\x00300\x00")
    assert slot_state(machine, "B") == "bad"


@any_bootloader
def test_lingering_child_of_a_passing_check_is_killed(
        machine: Machine, make_image: Callable[..., Path]) -> None:
    pidfile = machine.workdir / "child.pid"
    machine.add_check("required", "10-fork", f"sleep 300 & echo $! > {pidfile}; exit 0")
    armed(machine, make_image)
    machine.boot(Slot.B)
    started = time.monotonic()
    assert machine.cli("boot-hook", "--no-reboot").returncode == 0
    assert time.monotonic() - started < 30
    assert dies_within(int(pidfile.read_text()), b"sleep\x00300\x00")


@pytest.mark.parametrize("died_during_checks", [False, True], ids=["before-hook", "during-checks"])
def test_fallback_is_detected_and_recorded(
        machine: Machine, make_image: Callable[..., Path], died_during_checks: bool) -> None:
    armed(machine, make_image)
    if died_during_checks:
        # the trial booted, the hook recorded its progress, then the machine died: emulate the
        # death with a check that kills the hook itself
        machine.add_check("required", "10-die", "kill -9 $PPID; sleep 5")
        machine.boot(Slot.B)
        machine.cli("boot-hook", "--no-reboot")
        (machine.config.health.dir / "required.d/10-die").unlink()
        assert machine.cli("mark-bad", "B").returncode == 0  # the bootloader gives up on B ...
        # ... as GRUB does when the tries run out (syslinux after one boot); but the state
        # still says a trial is running: re-arm nothing, just boot the old slot
        from abupgrade.state import Store

        store = Store(machine.config.state_dir)
        state = store.load()
        assert state.trial is None  # mark-bad cleared it; put it back as the dead hook left it
    machine.boot(Slot.A)
    if not died_during_checks:
        assert machine.cli("mark-bad", "B").returncode == 0  # the bootloader ran out of tries
        _restore_trial(machine, phase="armed")
    else:
        _restore_trial(machine, phase="checking")
    proc = machine.cli("boot-hook", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    last = events(machine)[-1]
    assert last["event"] == "fallback" and last["slot"] == "B"
    expected = "during its health checks" if died_during_checks else "never reached the boot hook"
    assert expected in last["detail"]
    assert slot_state(machine, "B") == "bad" and status(machine)["next_boot"] == "A"


def _restore_trial(machine: Machine, *, phase: str) -> None:
    from dataclasses import replace

    from abupgrade.model import SlotState
    from abupgrade.state import Store, Trial, TrialPhase

    store = Store(machine.config.state_dir)
    state = store.load()
    store.save(replace(state.with_slot(Slot.B, state=SlotState.TRIAL),
                       trial=Trial(slot=Slot.B, version="2.0", previous="1.0", armed="t",
                                   phase=TrialPhase(phase), boots=1 if phase == "checking" else 0)))


@any_bootloader
def test_deadline_reboots_a_hook_that_overruns(
        ab_disk: Path, tmp_path: Path, make_image: Callable[..., Path]) -> None:
    with running_machine(ab_disk, tmp_path / "m", booted=Slot.A, health_timeout=30,
                         deadline=2) as m:
        m.add_check("required", "10-slow", "sleep 6")
        armed(m, make_image)
        m.boot(Slot.B)
        m.cli("boot-hook", "--no-reboot")
        assert m.reboot_marker.exists(), "the deadline did not reboot"


@any_bootloader
def test_corrupt_state_file_is_rebuilt(machine: Machine, make_image: Callable[..., Path]) -> None:
    state_file = machine.config.state_dir / "state.json"
    state_file.write_text('{"format": 1, "slots": {"A": ')
    assert machine.cli("status").returncode == 1
    proc = machine.cli("boot-hook", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert events(machine)[-1]["event"] == "repaired"
    assert slot_state(machine, "A") == "good"
    assert list(machine.config.state_dir.glob("state.json.corrupt-*"))
    armed(machine, make_image)  # and the machine takes updates again


@any_bootloader
def test_health_command_reports(machine: Machine) -> None:
    machine.add_check("required", "10-ok", "echo fine")
    machine.add_check("wanted", "20-meh", "echo meh; exit 1")
    proc = machine.cli("health", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    results = {c["name"]: c["result"] for c in report["checks"]}
    assert results == {"root-is-slot": "pass", "state-writable": "pass", "10-ok": "pass",
                       "20-meh": "fail"}
    machine.add_check("required", "30-bad", "exit 1")
    assert machine.cli("health").returncode == 5


@any_bootloader
def test_event_hooks_hear_of_commit_and_rollback(
        machine: Machine, make_image: Callable[..., Path]) -> None:
    assert machine.config.hooks_dir is not None
    heard = machine.workdir / "heard"
    for event in ("committed", "rolled-back"):
        hook = machine.config.hooks_dir / f"{event}.d" / "10-report"
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text(f"#!/bin/sh\necho $ABUPGRADE_EVENT $ABUPGRADE_SLOT $ABUPGRADE_VERSION >> {heard}\n")
        hook.chmod(0o755)
    armed(machine, make_image)
    machine.boot(Slot.B)
    assert machine.cli("boot-hook", "--no-reboot").returncode == 0
    assert heard.read_text().splitlines() == ["committed B 2.0"]
    armed(machine, make_image, "3.0")  # into A, from B
    machine.add_check("required", "10-no", "exit 1")
    machine.boot(Slot.A)
    assert machine.cli("boot-hook", "--no-reboot").returncode == 5
    assert heard.read_text().splitlines() == ["committed B 2.0", "rolled-back A 3.0"]
