"""Bootloader backends behind one interface; the rest of abupgrade never names one."""

from __future__ import annotations

import importlib

from abupgrade.bootloader.base import Bootloader, BootState
from abupgrade.config import Config
from abupgrade.model import BootloaderKind

__all__ = ["Bootloader", "BootState", "backend", "backend_class"]

_MODULES = {
    BootloaderKind.GRUB: ("abupgrade.bootloader.grub", "Grub"),
    BootloaderKind.SYSLINUX: ("abupgrade.bootloader.syslinux", "Syslinux"),
}


def backend_class(kind: BootloaderKind) -> type[Bootloader]:
    module_name, class_name = _MODULES[kind]
    cls: type[Bootloader] = getattr(importlib.import_module(module_name), class_name)
    return cls


def backend(config: Config) -> Bootloader:
    """The configured backend, imported lazily."""
    return backend_class(config.bootloader)(config)
