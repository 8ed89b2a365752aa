"""Bootloader backends behind one interface (base.py); the rest of abupgrade never names one.

`BootloaderKind` is the registry: one member per backend. Its value is the configuration's
`bootloader` name, the name of the backend's `[settings]` table and the `disk init
--bootloader` choice; the backend lives in `abupgrade/bootloader/<value, - as _>.py`, which
names its class `BACKEND`, and is imported only when it is used.
"""

from __future__ import annotations

import enum
import importlib
from pathlib import Path

from abupgrade.bootloader.base import Bootloader, BootState
from abupgrade.mounts import MOUNTINFO
from abupgrade.schema import Table

__all__ = ["Bootloader", "BootState", "BootloaderKind", "backend", "backend_class"]


class BootloaderKind(enum.StrEnum):
    GRUB = "grub"
    SYSLINUX = "syslinux"
    UBOOT = "uboot"
    SYSTEMD_BOOT = "systemd-boot"


def backend_class(kind: BootloaderKind) -> type[Bootloader]:
    module = importlib.import_module(f"{__name__}.{kind.value.replace('-', '_')}")
    cls: type[Bootloader] = module.BACKEND
    if cls.name != kind.value:
        raise RuntimeError(f"{module.__name__}.BACKEND is named {cls.name!r}, not {kind.value!r}")
    return cls


def backend(kind: BootloaderKind, settings: Table, *, mountinfo: Path = MOUNTINFO) -> Bootloader:
    """The backend of `kind` with its settings, imported lazily."""
    return backend_class(kind)(settings, mountinfo=mountinfo)
