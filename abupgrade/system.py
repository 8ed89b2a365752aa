"""The machine abupgrade works on: the running system, or a disk given with `--disk`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from abupgrade import config as configuration
from abupgrade import slots
from abupgrade.bootloader import Bootloader, backend
from abupgrade.config import Config
from abupgrade.interrupt import critical
from abupgrade.model import Slot
from abupgrade.state import EventName, State, Store

if TYPE_CHECKING:
    from abupgrade.image.keys import Keyring


@dataclass(frozen=True)
class Options:
    config: Path | None = None
    disk: Path | None = None


@dataclass
class System:
    config: Config
    booted: Slot | None
    offline: bool  # a disk serviced from outside: nothing of it is running
    bootloader: Bootloader
    store: Store
    _devices: dict[Slot, Path] = field(default_factory=dict)
    # How to name a slot's device to the user when its /dev path is only ours for a while.
    _names: dict[Slot, str] = field(default_factory=dict)

    def device(self, slot: Slot) -> Path:
        if slot not in self._devices:
            self._devices[slot] = slots.resolve(self.config.slots[slot])
        return self._devices[slot]

    def device_text(self, slot: Slot) -> str:
        """The slot's device for display; its spec when it does not resolve."""
        if slot in self._names:
            return self._names[slot]
        try:
            return str(self.device(slot))
        except Exception:
            return self.config.slots[slot]

    def is_in_use(self, device: Path) -> bool:
        return slots.is_mounted(device, self.config.system.mountinfo)

    def keyring(self) -> Keyring:
        from abupgrade.image.keys import Keyring  # cryptography: only where keys are used

        return Keyring.from_dir(self.config.keyring)

    def transition(self, event: EventName, slot: Slot | None, version: str | None, detail: str,
                   *, bootloader: Callable[[Bootloader], object] | None = None,
                   state: Callable[[State], State]) -> State:
        """One change of the machine's state, as a critical section (a signal waits for its
        end): the `bootloader` step first (what the next boot does), then `state` applied to
        state.json, then the event in the history. The bootloader is the truth at boot: a
        power cut after its step leaves a state.json the boot hook reconciles with it."""
        with critical():
            if bootloader is not None:
                bootloader(self.bootloader)
            changed = state(self.store.load())
            self.store.save(changed)
            self.store.record(event, slot, version, detail)
        return changed


def bootloader_of(config: Config) -> Bootloader:
    """The configured bootloader backend with its settings."""
    return backend(config.bootloader, config.settings, mountinfo=config.system.mountinfo)


@contextlib.contextmanager
def open_system(options: Options, *, readonly: bool = False) -> Iterator[System]:
    """The running system by its configuration, or the disk of `--disk` (attached, mounted,
    and cleaned up again when the block ends)."""
    if options.disk is not None:
        from abupgrade.disk import open_disk

        with open_disk(options.disk, readonly=readonly) as session:
            cfg = session.config
            devices = {slot: Path(os.path.realpath(spec)) for slot, spec in cfg.slots.items()}
            numbers = {node: n for n, node in session.disk.partitions.items()}
            names = {slot: f"{options.disk} partition {numbers[dev]}"
                     for slot, dev in devices.items() if dev in numbers}
            yield System(cfg, None, True, bootloader_of(cfg), Store(cfg.state_dir), devices, names)
        return
    cfg = configuration.load(configuration.config_path(options.config))
    yield System(cfg, slots.booted_slot(cfg), False, bootloader_of(cfg), Store(cfg.state_dir))
