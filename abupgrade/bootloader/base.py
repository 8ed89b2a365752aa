"""The interface every bootloader backend implements.

Vocabulary:
- the *default* slot is the committed one: what boots when no trial is pending;
- a slot is *bootable* when the bootloader may pick it (as default, trial or fallback);
- a *trial* is a slot that gets `tries_left` more boots before the bootloader goes back
  to the default on its own.
Every method that changes state is atomic with respect to power loss: after a cut at any
instant the bootloader reads either the old or the new state, both of which boot a good slot.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from abupgrade.config import Config
from abupgrade.model import Slot


@dataclass(frozen=True)
class BootState:
    default: Slot
    bootable: frozenset[Slot]
    trial: Slot | None = None
    tries_left: int = 0

    @property
    def next_boot(self) -> Slot:
        if self.trial is not None and self.tries_left > 0:
            return self.trial
        return self.default


@dataclass(frozen=True)
class DiskLayout:
    """What `disk init` made, handed to a backend's `install`.

    `boot_root` is the boot filesystem, mounted; `disk` is the whole disk (block device or
    image file); `boot_partition` is the boot partition's number on it; `slot_partitions`
    the slots' partition numbers (GRUB needs them for `(hd0,gptN)`); `slot_roots` the
    device specs the kernel gets as `root=`.
    """

    disk: Path
    boot_root: Path
    boot_partition: int
    slot_partitions: Mapping[Slot, int]
    slot_roots: Mapping[Slot, str]
    kernel_cmdline: str = "console=ttyS0 panic=5"


class Bootloader(abc.ABC):
    name: ClassVar[str]
    # Boots a trial gets at most; None when any number up to the config's `tries` works.
    max_tries: ClassVar[int | None] = None
    # Boot files ("kernel", "initrd") an image must carry for this bootloader to boot it.
    requires_boot_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Config) -> None:
        self.config = config

    @abc.abstractmethod
    def preflight(self) -> None:
        """Refuse (UsageError, exit 2, with a hint) storage the state cannot be kept on safely."""

    @abc.abstractmethod
    def read(self) -> BootState:
        """The state as the bootloader will see it on the next boot."""

    @abc.abstractmethod
    def disable(self, slot: Slot) -> None:
        """Make `slot` unbootable: not trial, not fallback; if it is the default, the other
        (bootable) slot becomes the default. Called before a slot is written."""

    @abc.abstractmethod
    def arm_trial(self, slot: Slot, tries: int) -> None:
        """Boot `slot` for up to `tries` boots (capped at max_tries), then the default again."""

    @abc.abstractmethod
    def commit(self, slot: Slot) -> None:
        """`slot` becomes the bootable default; any trial is cleared."""

    @abc.abstractmethod
    def boot_file_path(self, slot: Slot, name: str) -> Path:
        """Where the boot file `name` ("kernel" or "initrd") of `slot` lives on the boot fs."""

    def problems(self) -> list[str]:
        """What is wrong with the bootloader's state that it cannot fix itself (damaged
        copies of it, for example); each a sentence for `status`."""
        return []

    def repair(self) -> list[str]:
        """Rewrite what `problems` finds and can be rewritten safely; what was done."""
        return []

    @abc.abstractmethod
    def install(self, layout: DiskLayout) -> None:
        """`disk init`: install the bootloader, its configuration and a fresh state in which
        slot A is the default and nothing is bootable but A."""
