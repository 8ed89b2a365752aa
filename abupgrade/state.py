"""What abupgrade knows beside the bootloader: slot versions and states, the pending trial,
the persistent history, and the lock. Everything lives in `state_dir` (on storage both slots
share) and every write is atomic: a power cut leaves the old or the new file, never a torn one.
The history is JSON lines; a line torn by a power cut is dropped on the next append.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from abupgrade import trust
from abupgrade.errors import OperationalError, PolicyRefusal
from abupgrade.fsutil import atomic_write, fsync_dir
from abupgrade.image.manifest import compare_versions
from abupgrade.model import Slot, SlotState

STATE_FILE = "state.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = "lock"
LAST_BOOT_FILE = "last-boot"  # boot id and outcome of the last boot the hook finished
PROBE_FILE = ".health-probe"
FORMAT = 1


class EventName(enum.StrEnum):
    """The events of the history (`history --json` "event")."""

    INSTALLED = "installed"  # an image was written and read back; the slot is not armed yet
    INSTALL_FAILED = "install-failed"
    DELTA_FALLBACK = "delta-fallback"  # the delta path gave up; the whole image is applied
    INTERRUPTED = "interrupted"
    TRIAL_ARMED = "trial-armed"
    TRIAL_BOOT = "trial-boot"  # the boot hook runs the checks of a trial boot
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"  # a trial failed its checks
    FALLBACK = "fallback"  # a trial never reached the hook, or died in it
    MANUAL_ROLLBACK = "manual-rollback"
    MARKED_BAD = "marked-bad"
    REPAIRED = "repaired"  # the hook put state.json and the bootloader in agreement
    HOOK_FAILED = "hook-failed"  # a notification hook failed
    SECURITY_FLOOR = "security-floor"  # a committed image raised the floor (the event's version)


class TrialPhase(enum.StrEnum):
    ARMED = "armed"  # by apply
    CHECKING = "checking"  # the boot hook ran on the trial slot and started its checks


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SlotRecord:
    """What the state file says of one slot."""

    state: SlotState = SlotState.EMPTY
    version: str | None = None
    installed: str | None = None
    sha256: str | None = None
    security_floor: str | None = None  # the installed image's: the floor once it is committed


@dataclass(frozen=True)
class Trial:
    """A trial boot armed by `apply`; `phase` tells how far the boot hook got with it."""

    slot: Slot
    version: str | None
    previous: str | None
    armed: str
    phase: TrialPhase = TrialPhase.ARMED
    boots: int = 0  # boots of the trial slot the hook has seen


@dataclass(frozen=True)
class State:
    """The state file: both slots, the armed trial and the security floor."""

    slots: dict[Slot, SlotRecord] = field(
        default_factory=lambda: {slot: SlotRecord() for slot in Slot}
    )
    trial: Trial | None = None
    # Raised when a slot whose image declares a floor is committed; never lowered. Lives here,
    # on storage both slots share, because the configuration may be part of a slot's image.
    security_floor: str | None = None

    def with_slot(self, slot: Slot, **changes: Any) -> State:
        slots = dict(self.slots)
        slots[slot] = replace(slots[slot], **changes)
        return replace(self, slots=slots)

    def committed(self, slot: Slot) -> State:
        """`slot` good, and the floor raised to what its image declares (never lowered)."""
        return replace(self.with_slot(slot, state=SlotState.GOOD),
                       security_floor=highest(self.security_floor, self.slots[slot].security_floor))

    def raises_floor(self, slot: Slot) -> str | None:
        """The floor committing `slot` would raise this state's to; None if it stays."""
        raised = self.committed(slot).security_floor
        return raised if raised != self.security_floor else None

    def to_json(self) -> dict[str, Any]:
        trial = None
        if self.trial is not None:
            trial = {
                "slot": str(self.trial.slot), "version": self.trial.version,
                "previous": self.trial.previous, "armed": self.trial.armed,
                "phase": str(self.trial.phase), "boots": self.trial.boots,
            }
        return {
            "format": FORMAT,
            "slots": {
                str(slot): {"state": str(rec.state), "version": rec.version,
                            "installed": rec.installed, "sha256": rec.sha256,
                            "security_floor": rec.security_floor}
                for slot, rec in self.slots.items()
            },
            "trial": trial,
            "security_floor": self.security_floor,
        }

    @classmethod
    def from_json(cls, raw: Any) -> State:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("not an abupgrade state file of a known format")
        slots = {}
        for slot in Slot:
            rec = raw["slots"][str(slot)]
            slots[slot] = SlotRecord(
                state=SlotState(rec["state"]), version=_opt_str(rec.get("version")),
                installed=_opt_str(rec.get("installed")), sha256=_opt_str(rec.get("sha256")),
                security_floor=_opt_str(rec.get("security_floor")),
            )
        trial = None
        if raw.get("trial") is not None:
            t = raw["trial"]
            trial = Trial(
                slot=Slot(t["slot"]), version=_opt_str(t.get("version")),
                previous=_opt_str(t.get("previous")), armed=str(t["armed"]),
                phase=TrialPhase(t.get("phase", TrialPhase.ARMED)), boots=int(t.get("boots", 0)),
            )
        return cls(slots=slots, trial=trial, security_floor=_opt_str(raw.get("security_floor")))


def highest(*versions: str | None) -> str | None:
    """The newest of `versions` that are not None (a floor from several sources)."""
    found: str | None = None
    for version in versions:
        if version is not None and (found is None or compare_versions(version, found) > 0):
            found = version
    return found


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class Event:
    """One line of the history."""

    time: str
    event: EventName | str  # a str: a name this version does not know (kept, not dropped)
    slot: Slot | None
    version: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "event": str(self.event),
                "slot": str(self.slot) if self.slot else None,
                "version": self.version, "detail": self.detail}


class Store:
    """state.json, history.jsonl and the lock in one folder."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def history_path(self) -> Path:
        return self.dir / HISTORY_FILE

    def ensure(self) -> None:
        try:
            self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise OperationalError(f"cannot create state folder {self.dir}: {exc.strerror}") from None

    def load(self) -> State:
        # It holds the security floor and says which slot is good: strict modes apply.
        trust.check(self.state_path, "state file", trust.Kind.FILE)
        try:
            raw = json.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise OperationalError(f"cannot read {self.state_path}: {exc.strerror}") from None
        except ValueError as exc:
            raise OperationalError(
                f"{self.state_path} is corrupt: {exc}",
                hint="move it away; `abupgrade boot-hook` rebuilds it from the bootloader state",
            ) from None
        try:
            return State.from_json(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise OperationalError(
                f"{self.state_path} is corrupt: {exc}",
                hint="move it away; `abupgrade boot-hook` rebuilds it from the bootloader state",
            ) from None

    def save(self, state: State) -> None:
        self.ensure()
        data = json.dumps(state.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        try:
            atomic_write(self.state_path, data)
        except OSError as exc:
            raise OperationalError(
                f"cannot write {self.state_path}: {exc.strerror}",
                hint="the state folder must be on writable storage with free space",
            ) from None

    def record(self, event: EventName, slot: Slot | None = None, version: str | None = None,
               detail: str = "") -> Event:
        """Append one event to the history, durably."""
        self.ensure()
        entry = Event(now(), event, slot, version, detail)
        line = json.dumps(entry.to_json(), sort_keys=True).encode() + b"\n"
        try:
            fd = os.open(self.history_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _drop_torn_tail(fd)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.dir)
        except OSError as exc:
            raise OperationalError(
                f"cannot append to {self.history_path}: {exc.strerror}",
                hint="the state folder must be on writable storage with free space",
            ) from None
        return entry

    def record_floor(self, before: State, slot: Slot) -> None:
        """After `slot` was committed: record it when its image raised the floor of `before`."""
        raised = before.raises_floor(slot)
        if raised is not None:
            self.record(EventName.SECURITY_FLOOR, slot, raised,
                        f"version {before.slots[slot].version} of slot {slot} raised the security "
                        f"floor from {before.security_floor or 'none'} to {raised}")

    def history(self, limit: int | None = None) -> list[Event]:
        trust.check(self.history_path, "history", trust.Kind.FILE)  # a corrupt state is rebuilt from it
        try:
            text = self.history_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise OperationalError(f"cannot read {self.history_path}: {exc.strerror}") from None
        events = []
        for raw in text.split(b"\n"):
            try:
                item = json.loads(raw)
                events.append(Event(
                    time=str(item["time"]), event=_event_name(str(item["event"])),
                    slot=Slot(item["slot"]) if item.get("slot") else None,
                    version=_opt_str(item.get("version")), detail=str(item.get("detail", "")),
                ))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a power cut, or the empty tail
        return events[-limit:] if limit else events

    def quarantine(self) -> Path:
        """Move a corrupt state file aside (kept for a look, never read again); its new path.
        A file that cannot be moved stays, to be replaced by the next save."""
        kept = self.state_path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self.state_path, kept)
        return kept

    def last_boot(self) -> tuple[str, str] | None:
        """(boot id, outcome) the boot hook remembered of the last boot it finished."""
        try:
            boot_id, _, outcome = (self.dir / LAST_BOOT_FILE).read_text().partition("\n")
        except OSError:
            return None
        return boot_id, outcome.strip()

    def remember_boot(self, boot_id: str, outcome: str) -> None:
        atomic_write(self.dir / LAST_BOOT_FILE, f"{boot_id}\n{outcome}\n".encode())

    def probe(self) -> None:
        """Write, fsync and remove a small file; OSError when the folder takes no writes."""
        probe = self.dir / PROBE_FILE
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"ok\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the one abupgrade lock of this machine; refuse at once when another run has it."""
        self.ensure()
        path = self.dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OperationalError(f"cannot open lock {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise PolicyRefusal(
                    f"another abupgrade (pid {holder}) holds the lock {path}",
                    hint="wait for it to finish",
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # the pid is for the message of a refused run only; the lock holds anyway
            yield
        finally:
            os.close(fd)


def _event_name(text: str) -> EventName | str:
    try:
        return EventName(text)
    except ValueError:
        return text


def _drop_torn_tail(fd: int) -> None:
    """Cut a last line that a power cut left without its newline."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    if os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - 65536)
    tail = os.pread(fd, size - start, start)
    cut = tail.rfind(b"\n")
    os.ftruncate(fd, start + cut + 1 if cut >= 0 else start)
