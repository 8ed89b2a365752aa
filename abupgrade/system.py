"""The machine abupgrade works on: the running system, or a disk given with `--disk`."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from abupgrade import config as configuration
from abupgrade import run, slots
from abupgrade.bootloader import Bootloader, backend
from abupgrade.config import Config, SystemConfig
from abupgrade.errors import OperationalError, UsageError
from abupgrade.interrupt import critical
from abupgrade.model import Slot
from abupgrade.state import EventName, State, Store

if TYPE_CHECKING:
    from abupgrade.image.keys import Keyring


@dataclass(frozen=True)
class Options:
    """What the command line says about which system to work on."""

    config: Path | None = None
    disk: Path | None = None


@dataclass
class System:
    """The machine a command works on: its configuration, bootloader, state and slots."""

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

    def reboot_command(self) -> tuple[str, ...]:
        """The configured reboot command; for the default (`reboot`) on a root that has
        none (a minimal Debian or busybox root), the kernel's restart after a sync."""
        import shutil

        command = self.config.system.reboot
        if command == SystemConfig().reboot and shutil.which(command[0]) is None:
            return (sys.executable, "-I", "-c", KERNEL_REBOOT)
        return command

    def reboot(self) -> None:
        """Reboot the machine (see `reboot_command`). Where the default `reboot` is there but
        fails (the `reboot` of an init that is not running), the kernel restarts it: a
        machine that must leave a sick slot does not stay up on it."""
        if self.offline:
            raise UsageError("--reboot makes no sense with --disk")
        command = self.reboot_command()
        try:
            run.run(command, timeout=60)
        except OperationalError as exc:
            if command != SystemConfig().reboot:
                raise
            run.run([sys.executable, "-I", "-c", KERNEL_REBOOT], timeout=60,
                    hint=f"{' '.join(command)} failed too ({exc.message}); reboot by hand: "
                         "the bootloader boots the good slot")

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


# The kernel's restart after a sync, as `reboot -f` does it, as a program of its own (the
# deadline timer runs it too); it exits non-zero only when the kernel refused.
KERNEL_REBOOT = ("import ctypes, os, sys\n"
                 "os.sync()\n"
                 "libc = ctypes.CDLL(None, use_errno=True)\n"
                 "libc.reboot(0x01234567)\n"  # LINUX_REBOOT_CMD_RESTART
                 "sys.exit('cannot restart: ' + os.strerror(ctypes.get_errno()))\n")


def bootloader_of(config: Config) -> Bootloader:
    """The configured bootloader backend with its settings."""
    return backend(config.bootloader, config.settings, mountinfo=config.system.mountinfo)


@contextlib.contextmanager
def open_system(options: Options, *, readonly: bool = False,
                mount: bool = False) -> Iterator[System]:
    """The running system by its configuration, or the disk of `--disk` (attached, mounted,
    and cleaned up again when the block ends). With `mount` (the boot hook), the running
    system's boot partition and `[mounts]` are mounted where they are not (bringup.py)."""
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
    path = configuration.config_path(options.config)
    if mount and options.config is None and not path.exists():
        from abupgrade import bringup

        if bringup.mount_boot_partition():
            path = configuration.config_path(None)
    cfg = configuration.load(path)
    if mount and cfg.mounts:
        from abupgrade import bringup

        bringup.mount_listed(cfg)
    yield System(cfg, slots.booted_slot(cfg), False, bootloader_of(cfg), Store(cfg.state_dir))
