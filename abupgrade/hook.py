"""The boot hook: a trial boot is committed only once its health checks pass; a sick trial is
rolled back and rebooted; a boot that is not the trial we armed is recorded as a fallback.
Run once per boot by init; running it again in the same boot changes nothing."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from abupgrade import health, mounts, notify, run
from abupgrade.bootloader import Bootloader, BootState
from abupgrade.errors import AbupgradeError, HealthFailed, OperationalError, UsageError
from abupgrade.model import Slot, SlotState
from abupgrade.results import HookResult, Outcome
from abupgrade.state import EventName, SlotRecord, State, Trial, TrialPhase, highest
from abupgrade.system import System

if TYPE_CHECKING:  # imported where a trial boot needs them: not on every boot
    import subprocess
    import threading

# The deadline timer: a program of its own that sleeps, says why, and runs the reboot command.
_TIMER = ("import os, sys, time\n"
          "time.sleep(float(sys.argv[1]))\n"
          "os.write(2, sys.argv[2].encode())\n"
          "os.execvp(sys.argv[3], sys.argv[3:])\n")


class Deadline:
    """Reboot the machine if the block does not end within `seconds`; keep /dev/watchdog
    fed meanwhile, so a hang of the whole machine also ends in a reboot.

    The timer is a process in a session of its own, so a hung hook cannot stop it. It keeps
    nothing of the hook open: not the lock (a hook that died would keep it), not the state
    folder's files (a mount would stay busy), not its output pipes (whoever reads the hook's
    output would wait for the timer). What it has to say goes to the console."""

    def __init__(self, seconds: float, reboot: tuple[str, ...], watchdog: Path) -> None:
        import threading

        self.seconds = seconds
        self.reboot = reboot
        self.watchdog_path = watchdog
        self.timer: subprocess.Popen[bytes] | None = None
        self._watchdog: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Deadline:
        import subprocess
        import threading

        message = f"abupgrade: boot hook deadline of {self.seconds:g} s passed; rebooting\n"
        try:
            console: int = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            console = subprocess.DEVNULL
        try:
            self.timer = run.spawn([sys.executable, "-I", "-c", _TIMER, str(self.seconds),
                                    message, *self.reboot],
                                   stdout=console, stderr=console, new_session=True)
        finally:
            if console != subprocess.DEVNULL:
                os.close(console)
        try:
            self._watchdog = os.open(self.watchdog_path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self._watchdog = None  # no watchdog, or a daemon owns it
        if self._watchdog is not None:
            self._thread = threading.Thread(target=self._feed, daemon=True)
            self._thread.start()
        return self

    def _feed(self) -> None:
        while not self._stop.wait(1.0):
            if self._watchdog is not None:
                with contextlib.suppress(OSError):
                    os.write(self._watchdog, b"\0")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                os.write(self._watchdog, b"V")  # magic close: disarm what we armed
            os.close(self._watchdog)
        if self.timer is not None:
            self.timer.kill()
            self.timer.wait()


def bootloader_marks(system: System) -> dict[str, Slot]:
    """What the bootloader could not do, from the kernel command line (see grub.cfg.in):
    "fallback": it could not load that slot and booted its fallback entry; "unsaved": a
    trial of that slot was due but its boot count could not be saved."""
    try:
        words = system.config.system.cmdline.read_text().split()
    except OSError:
        return {}
    found = {}
    for word in words:
        key, _, value = word.partition("=")
        if key in ("abupgrade.fallback", "abupgrade.unsaved") and value in ("A", "B"):
            found[key.removeprefix("abupgrade.")] = Slot(value)
    return found


def _boot_id(system: System) -> str:
    try:
        return system.config.system.boot_id.read_text().strip()
    except OSError:
        return ""


def _load_or_rebuild(system: System, boot: BootState) -> State:
    """The state file, or - when it is corrupt - one rebuilt from the bootloader's view."""
    try:
        return system.store.load()
    except OperationalError as exc:
        kept = system.store.quarantine()
        installed, floor = _from_history(system)
        state = State(slots={
            slot: SlotRecord(state=SlotState.GOOD, version=installed[slot][0],
                             installed=installed[slot][1]) if slot in boot.bootable
            else SlotRecord(state=SlotState.BAD)
            for slot in Slot
        }, security_floor=floor)
        system.store.save(state)
        system.store.record(EventName.REPAIRED, None, None,
                            f"{exc.message}; kept as {kept.name}, rebuilt from the bootloader "
                            "and the history")
        return state


def _from_history(system: System) -> tuple[dict[Slot, tuple[str | None, str | None]], str | None]:
    """(version, time) of each slot's last complete install, and the security floor committed
    images raised, by the history."""
    found: dict[Slot, tuple[str | None, str | None]] = {slot: (None, None) for slot in Slot}
    floor: str | None = None
    with contextlib.suppress(OperationalError):
        for event in system.store.history():
            if event.event == EventName.SECURITY_FLOOR:
                floor = highest(floor, event.version)
            if event.slot is None:
                continue
            if event.event == EventName.INSTALLED:
                found[event.slot] = (event.version, event.time)
            elif event.event in (EventName.INSTALL_FAILED, EventName.INTERRUPTED):
                found[event.slot] = (None, None)
    return found, floor


def _builtins(system: System, slot: Slot) -> dict[str, health.Builtin]:
    def root_is_slot() -> str | None:
        root = mounts.root(system.config.system.mountinfo)
        device = system.device(slot)
        if root is not None and root.devno == device.stat().st_rdev:
            return None
        where = root.source if root is not None else "unknown"
        return f"the root filesystem ({where}) is not slot {slot} ({device})"

    def state_writable() -> str | None:
        system.store.probe()
        return None

    return {"root-is-slot": root_is_slot, "state-writable": state_writable}


def _check_env(slot: Slot, state: State, trial: Trial | None) -> dict[str, str]:
    return {
        "ABUPGRADE_SLOT": str(slot),
        "ABUPGRADE_VERSION": (trial.version if trial else state.slots[slot].version) or "",
        "ABUPGRADE_PREVIOUS_VERSION": (trial.previous or "") if trial else "",
        "ABUPGRADE_TRIAL": "1" if trial else "0",
    }


def check_now(system: System) -> health.Report:
    """`abupgrade health`: the checks, run now, for the booted slot; nothing changes."""
    slot = system.booted
    if slot is None:
        raise UsageError("cannot tell which slot is booted",
                         hint="the kernel command line needs abupgrade.slot=A or B")
    state = system.store.load()
    trial = state.trial if state.trial and state.trial.slot == slot else None
    return health.run_all(system.config.health.dir, timeout=system.config.health.timeout,
                          env=_check_env(slot, state, trial), builtins=_builtins(system, slot))


def boot(system: System, *, reboot: bool) -> HookResult:
    booted = system.booted
    if booted is None:
        raise UsageError("cannot tell which slot is booted",
                         hint="the kernel command line needs abupgrade.slot=A or B")
    system.store.ensure()
    boot_id = _boot_id(system)
    last = system.store.last_boot()
    if boot_id and last is not None and last[0] == boot_id:
        return HookResult(booted, Outcome.ALREADY_DONE,
                          f"the boot hook already ran in this boot ({last[1]})")
    loader = system.bootloader.read()
    state = _load_or_rebuild(system, loader)
    trial = state.trial
    if trial is None and loader.trial == booted and state.slots[booted].state is not SlotState.EMPTY:
        # armed in the bootloader, but the power went before state.json said so
        trial = Trial(slot=booted, version=state.slots[booted].version,
                      previous=state.slots[booted.other].version, armed="unknown")
        state = replace(state, trial=trial)

    marks = bootloader_marks(system)
    if trial is not None and trial.slot == booted:
        result = _trial_boot(system, state, trial, reboot=reboot)
    elif trial is not None:
        result = _fallback(system, trial, booted, loader, marks)
    else:
        result = _committed_boot(system, state, booted, loader, marks)
    if boot_id:
        system.store.remember_boot(boot_id, result.outcome)
    if result.outcome.notifies:
        _notify(system, result.outcome, state, trial)
    if result.outcome is Outcome.ROLLED_BACK:
        if reboot:
            try:
                system.reboot()
            except AbupgradeError as exc:  # still exit 5: the rollback itself is done
                raise HealthFailed(f"{result.summary}; {exc.message}", hint=exc.hint,
                                   report=result.health) from None
        raise HealthFailed(result.summary, hint="see `abupgrade history` for the check's output",
                           report=result.health)
    return result


def _notify(system: System, outcome: Outcome, state: State, trial: Trial | None) -> None:
    """Tell the fleet agent's hooks; a failing hook is recorded, never fatal."""
    if system.config.hooks_dir is None or trial is None:
        return
    problems = notify.run_hooks(system.config.hooks_dir, outcome,
                                _check_env(trial.slot, state, trial))
    for problem in problems:
        system.store.record(EventName.HOOK_FAILED, trial.slot, trial.version, problem)


def _trial_boot(system: System, state: State, trial: Trial, *, reboot: bool) -> HookResult:
    slot = trial.slot
    earlier = trial.phase
    trial = replace(trial, phase=TrialPhase.CHECKING, boots=trial.boots + 1)
    system.store.save(replace(state, trial=trial))  # progress first: a hang is told apart
    system.store.record(EventName.TRIAL_BOOT, slot, trial.version,
                        f"boot {trial.boots} of the trial; running health checks"
                        + (" again (the last boot died during them)"
                           if earlier is TrialPhase.CHECKING else ""))
    cfg = system.config
    with Deadline(cfg.health.deadline, system.reboot_command(), cfg.health.watchdog):
        report = health.run_all(cfg.health.dir, timeout=cfg.health.timeout,
                                env=_check_env(slot, state, trial),
                                builtins=_builtins(system, slot))
    if report.healthy:
        system.transition(
            EventName.COMMITTED, slot, trial.version, report.summary(),
            bootloader=lambda loader: loader.commit(slot),
            state=lambda now: replace(now.committed(slot), trial=None))
        system.store.record_floor(state, slot)
        return HookResult(slot, Outcome.COMMITTED,
                          f"slot {slot} (version {trial.version}) is healthy and committed",
                          health=report)
    failed = report.first_failure
    assert failed is not None
    detail = f"{report.summary()}; back to slot {slot.other}"
    if failed.output.strip():
        detail += f"; output: {' | '.join(failed.output.strip().splitlines()[-5:])}"
    system.transition(
        EventName.ROLLED_BACK, slot, trial.version, detail,
        bootloader=lambda loader: loader.disable(slot),
        state=lambda now: replace(now.with_slot(slot, state=SlotState.BAD), trial=None))
    return HookResult(slot, Outcome.ROLLED_BACK,
                      f"slot {slot} failed its health checks ({report.summary()}); "
                      f"rolled back to slot {slot.other}" + ("" if reboot else ", reboot to finish"),
                      health=report)


def _fallback(system: System, trial: Trial, booted: Slot, boot: BootState,
              marks: dict[str, Slot]) -> HookResult:
    """We run on the other slot although a trial was armed: the trial never made it."""
    unloadable = marks.get("fallback") == trial.slot
    if not unloadable and marks.get("unsaved") == trial.slot and boot.trial == trial.slot:
        # The bootloader could not save the trial's count, so it did not try the slot.
        problems = system.bootloader.problems()
        done = system.bootloader.repair()
        if done:
            system.store.record(EventName.REPAIRED, trial.slot, trial.version,
                                "the bootloader could not save the trial's boot count, so it "
                                f"booted slot {booted}: {'; '.join(done)}; the trial runs at "
                                "the next boot")
            return HookResult(booted, Outcome.TRIAL_PENDING,
                              f"the bootloader could not save slot {trial.slot}'s trial count: "
                              f"{'; '.join(done)}; the trial runs at the next boot",
                              repaired=tuple(done))
        unloadable = True  # it cannot be repaired: the trial is over
        why = ("the bootloader could not save the trial's boot count ("
               + ("; ".join(problems) or "it cannot write its state") + ")")
    elif not unloadable and boot.trial == trial.slot and boot.tries_left > 0:
        # The trial is still armed: we are on the old slot before the trial boot (a second
        # hook run after apply, or apply from this very boot). Nothing happened yet.
        return HookResult(booted, Outcome.TRIAL_PENDING,
                          f"slot {trial.slot} is armed for a trial on the next boot")
    elif unloadable:
        why = "the bootloader could not load the trial slot's kernel or initrd"
    elif trial.phase is TrialPhase.CHECKING:
        why = (f"the trial slot booted {trial.boots} time(s) and died or hung during its "
               "health checks")
    else:
        why = "the trial slot never reached the boot hook (kernel or init failed)"

    def back(loader: Bootloader) -> None:
        loader.disable(trial.slot)
        if boot.default != booted and booted in boot.bootable:
            loader.commit(booted)

    def update(now: State) -> State:
        now = replace(now.with_slot(trial.slot, state=SlotState.BAD), trial=None)
        if now.slots[booted].state is not SlotState.GOOD:
            now = now.with_slot(booted, state=SlotState.GOOD)
        return now

    system.transition(EventName.FALLBACK, trial.slot, trial.version,
                      f"{why}; the bootloader went back to slot {booted}",
                      bootloader=back, state=update)
    return HookResult(booted, Outcome.FALLBACK,
                      f"the trial of slot {trial.slot} (version {trial.version}) failed: {why}; "
                      f"running on slot {booted}")


def _committed_boot(system: System, state: State, booted: Slot, boot: BootState,
                    marks: dict[str, Slot]) -> HookResult:
    """A normal boot: compare the bootloader with state.json, repair what is safe."""
    repaired: list[str] = system.bootloader.repair()
    problems: list[str] = system.bootloader.problems()
    if marks.get("fallback") is not None:
        problems.append(f"the bootloader could not load slot {marks['fallback']}'s kernel or "
                        f"initrd and booted slot {booted} instead")
    if boot.default == booted and state.slots[booted].state is not SlotState.GOOD:
        state = state.with_slot(booted, state=SlotState.GOOD)
        repaired.append(f"slot {booted} is committed and booted: recorded as good")
    other = booted.other
    if (other in boot.bootable and state.slots[other].state in (SlotState.BAD, SlotState.EMPTY)
            and boot.trial != other):
        system.bootloader.disable(other)
        repaired.append(f"slot {other} is {state.slots[other].state} but was bootable: disabled")
    if boot.default != booted:
        problems.append(f"booted slot {booted} is not the committed slot {boot.default} "
                        "(the bootloader fell back, or a rollback waits for its reboot)")
    if state.slots[other].state is SlotState.GOOD and other not in boot.bootable:
        problems.append(f"slot {other} is good in the state file but the bootloader will not boot it")
    if repaired:
        system.store.save(state)
        system.store.record(EventName.REPAIRED, booted, state.slots[booted].version,
                            "; ".join(repaired))
    summary = f"slot {booted} is committed; nothing to do"
    if repaired or problems:
        summary = f"slot {booted}: " + "; ".join(repaired + problems)
    return HookResult(booted, Outcome.COMMITTED_BOOT, summary,
                      repaired=tuple(repaired), problems=tuple(problems))
