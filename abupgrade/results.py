"""What the commands return: frozen results whose `to_json()` is the command's `--json`
document (key order included: scripts and the contract's shapes depend on it)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abupgrade.model import Slot, SlotState

if TYPE_CHECKING:
    from abupgrade.health import Report


def _text(item: object | None) -> str | None:
    return None if item is None else str(item)


@dataclass(frozen=True)
class KeyPair:
    """`keygen`: the key pair written and its key id."""

    private: Path
    public: Path
    key_id: str

    def to_json(self) -> dict[str, Any]:
        return {"private": str(self.private), "public": str(self.public), "key_id": self.key_id}


@dataclass(frozen=True)
class CheckResult:
    """`check`: the registry holds `version`, newer than the `committed` one."""

    reference: str
    version: str
    committed: str | None

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "version": self.version,
                "committed": self.committed}


@dataclass(frozen=True)
class SlotStatus:
    """`status`: one slot's block device, state, version and install time."""

    device: str
    state: SlotState
    version: str | None
    installed: str | None

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "state": str(self.state), "version": self.version,
                "installed": self.installed}


@dataclass(frozen=True)
class Status:
    """`status`: what runs, what boots next, each slot and the bootloader."""

    booted: Slot | None
    next_boot: Slot
    trial: Slot | None  # a trial with boots left
    trial_boots_left: int | None  # None when no trial is pending
    committed: Slot
    bootloader: str
    firmware: str  # "bios" or "uefi"
    secure_boot: bool
    slots: Mapping[Slot, SlotStatus]
    notes: tuple[str, ...]
    security_floor: str | None = None  # no image below it is accepted (ops.security_floor)
    counters: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "booted": _text(self.booted),
            "next_boot": str(self.next_boot),
            "trial": _text(self.trial),
            "trial_boots_left": self.trial_boots_left,
            "committed": str(self.committed),
            "bootloader": self.bootloader,
            "firmware": self.firmware,
            "secure_boot": self.secure_boot,
            "slots": {str(slot): self.slots[slot].to_json() for slot in Slot},
            "notes": list(self.notes),
            "security_floor": self.security_floor,
        }
        if self.counters:
            found[self.bootloader] = dict(self.counters)
        return found


@dataclass(frozen=True)
class Installed:
    """`apply`: the image that went (or, in a dry run, would go) into `slot`."""

    slot: Slot
    version: str
    compatible: str
    written: int  # bytes written to the slot and the boot files
    dry_run: bool
    seconds: float | None = None  # None in a dry run
    tries: int | None = None  # boots the armed trial gets; None until armed
    traffic: Traffic | None = None  # None in a dry run

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"slot": str(self.slot), "version": self.version,
                                 "compatible": self.compatible, "written": self.written,
                                 "dry_run": self.dry_run}
        if self.seconds is not None:
            found["seconds"] = self.seconds
        if self.tries is not None:
            found["tries"] = self.tries
        if self.traffic is not None:
            found.update(self.traffic.to_json())
        return found


@dataclass(frozen=True)
class Traffic:
    """What an install cost and saved, in bytes (`apply --json`)."""

    downloaded: int  # bytes received from the image's source over the network
    written: int  # bytes written to the slot (the boot files are in Installed.written)
    reused_from_target: int  # payload bytes the target already held: not written again
    copied_from_active: int  # payload bytes read from the active slot instead of fetched
    delta: str  # "delta", "full", or "full: <why the delta path was not taken>"

    def to_json(self) -> dict[str, Any]:
        return {"bytes_downloaded": self.downloaded, "bytes_written": self.written,
                "bytes_reused_from_target": self.reused_from_target,
                "bytes_copied_from_active": self.copied_from_active, "update": self.delta}

    def summary(self) -> str:
        """One line for people: what the network and the slot were spared."""
        def mib(n: int) -> str:
            return f"{n / (1 << 20):.1f} MiB"
        return (f"{self.delta}: {mib(self.downloaded)} downloaded, {mib(self.written)} written, "
                f"{mib(self.reused_from_target)} already in place, "
                f"{mib(self.copied_from_active)} copied from the running slot")


@dataclass(frozen=True)
class SlotVersion:
    """`mark-good`, `rollback`: the slot that is (or boots next as) the committed one."""

    slot: Slot
    version: str | None

    def to_json(self) -> dict[str, Any]:
        return {"slot": str(self.slot), "version": self.version}


@dataclass(frozen=True)
class MarkedBad:
    """`mark-bad`: the slot marked bad and the slot that boots next."""

    slot: Slot
    next_boot: Slot

    def to_json(self) -> dict[str, Any]:
        return {"slot": str(self.slot), "next_boot": str(self.next_boot)}


@dataclass(frozen=True)
class DiskMade:
    """`disk init`: the disk laid out (and the first image, if one was installed)."""

    target: Path
    bootloader: str
    slot_size: int
    compatible: str
    version: str | None  # of the first image, when one was installed

    def to_json(self) -> dict[str, Any]:
        return {"target": str(self.target), "bootloader": self.bootloader,
                "slot_size": self.slot_size, "compatible": self.compatible,
                "version": self.version}


@dataclass(frozen=True)
class HookInstalled:
    """`install-hook`: the init integration and what was written for it."""

    init: str
    root: Path
    written: tuple[Path, ...]

    def to_json(self) -> dict[str, Any]:
        return {"init": self.init, "root": str(self.root),
                "written": [str(p) for p in self.written]}


class Outcome(enum.StrEnum):
    """What the boot hook made of a boot."""

    COMMITTED = "committed"  # the trial was healthy and is the default now
    ROLLED_BACK = "rolled-back"  # the trial was sick: disabled, reboot to the other slot
    FALLBACK = "fallback"  # the trial never got to the hook; the bootloader went back
    TRIAL_PENDING = "trial-pending"  # a trial is armed for the next boot
    COMMITTED_BOOT = "committed-boot"  # a normal boot of the committed slot
    ALREADY_DONE = "already-done"  # the hook already ran in this boot

    @property
    def notifies(self) -> bool:
        """Whether the fleet's notification hooks hear of it (`<hooks_dir>/<outcome>.d/`)."""
        return self in (Outcome.COMMITTED, Outcome.ROLLED_BACK, Outcome.FALLBACK)


@dataclass(frozen=True)
class HookResult:
    """`boot-hook`: what this boot was and what the hook did about it."""

    slot: Slot
    outcome: Outcome
    summary: str
    health: Report | None = None  # the checks of a trial boot
    repaired: tuple[str, ...] | None = None  # a committed boot: what was put right
    problems: tuple[str, ...] | None = None  # ... and what could not be

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"slot": str(self.slot), "outcome": str(self.outcome),
                                 "summary": self.summary}
        if self.health is not None:
            found["health"] = self.health.to_json()
        if self.repaired is not None:
            found["repaired"] = list(self.repaired)
        if self.problems is not None:
            found["problems"] = list(self.problems)
        return found
