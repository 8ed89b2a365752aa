"""Finding block devices by spec, the booted slot, and whether a device is in use.

This is the one module that talks to pyudev. Without udevd (containers, initramfs, test
machines) udev knows nothing beyond sysfs, so partition names and UUIDs come from the
parent's partition table (partitions.py) and filesystem labels from `blkid -p`. Without
libudev itself (busybox, OpenRC and runit machines often have none) the block devices are
read from sysfs directly, the same way (`--debug` says so).
A spec that matches no device or more than one is an error: we never guess.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abupgrade import blockdev, mounts
from abupgrade.config import Config
from abupgrade.errors import OperationalError, UsageError
from abupgrade.model import Slot
from abupgrade.partitions import PartitionTable, read_table
from abupgrade.run import run

# PTUUID names a whole disk by its partition table's id (GPT disk GUID, MBR signature).
SPEC_KEYS = ("PARTLABEL", "PARTUUID", "LABEL", "UUID", "PTUUID")
SYSFS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class BlockDevice:
    """A block device as sysfs/udev list it."""

    node: Path  # /dev/...
    name: str  # kernel name: sda2, loop3p1
    devno: int
    size: int  # bytes
    parent: Path | None  # the whole disk, for a partition
    number: int | None  # partition number, for a partition
    properties: Mapping[str, str]  # udev properties (only uevent ones without udevd)


def block_devices() -> list[BlockDevice]:
    """Every block device with a size: as udev knows them, or from sysfs where there is no
    libudev (or no pyudev)."""
    try:
        import pyudev

        context = pyudev.Context()
    except ImportError as exc:  # pyudev says "No library named udev" without libudev.so
        import logging

        logging.getLogger(__name__).debug(
            "no udev (%s): block devices from %s and the partition tables", exc, SYSFS_BLOCK)
        return sysfs_block_devices()
    found = []
    for dev in context.list_devices(subsystem="block"):
        node = dev.device_node
        if node is None:
            continue
        props = {str(k): str(dev.properties[k]) for k in dev.properties}
        try:
            size = int(dev.attributes.asint("size")) * 512
        except (KeyError, ValueError):
            size = 0
        parent = dev.parent if dev.device_type == "partition" else None
        found += _device(Path(str(node)), str(dev.sys_name), size, props,
                         Path(str(parent.device_node)) if parent is not None else None)
    return found


def sysfs_block_devices(sysfs: Path = SYSFS_BLOCK, dev: Path = Path("/dev")) -> list[BlockDevice]:
    """Every block device with a size, read from sysfs: its uevent (MAJOR, MINOR, DEVNAME,
    PARTN, and PARTNAME where the kernel parsed the table), `size`, and the disk a partition
    belongs to (its parent folder)."""
    found = []
    for entry in sorted(sysfs.iterdir()):
        try:
            uevent = (entry / "uevent").read_text()
            sectors = int((entry / "size").read_text())
        except (OSError, ValueError):
            continue
        props = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)
        parent = None
        if (entry / "partition").exists():
            disk = entry.resolve().parent
            parent = dev / _devname(disk) if (disk / "dev").exists() else None
        found += _device(dev / props.get("DEVNAME", entry.name), entry.name, sectors * 512,
                         props, parent)
    return found


def _devname(folder: Path) -> str:
    try:
        uevent = (folder / "uevent").read_text()
    except OSError:
        return folder.name
    names = [line[8:] for line in uevent.splitlines() if line.startswith("DEVNAME=")]
    return names[0] if names else folder.name


def _device(node: Path, name: str, size: int, props: dict[str, Any],
            parent: Path | None) -> list[BlockDevice]:
    """The BlockDevice, in a list of one; none for a device without a size (unbound loop
    devices, empty drives) or numbers."""
    if size == 0 or "MAJOR" not in props or "MINOR" not in props:
        return []
    number = props.get("PARTN")
    return [BlockDevice(node=node, name=name,
                        devno=os.makedev(int(props["MAJOR"]), int(props["MINOR"])),
                        size=size, parent=parent if number else None,
                        number=int(number) if number else None, properties=props)]


def parse_spec(spec: str) -> tuple[str, str]:
    """("PARTLABEL", "rootfs_a") for "PARTLABEL=rootfs_a"; ("PATH", "/dev/x") for a path."""
    if spec.startswith("/"):
        return "PATH", spec
    key, sep, value = spec.partition("=")
    if not sep or key.upper() not in SPEC_KEYS or not value:
        raise UsageError(f"device spec {spec!r} is not understood",
                         hint="use PARTLABEL=, PARTUUID=, LABEL=, UUID=, PTUUID= or a /dev path")
    return key.upper(), value


class _Prober:
    """Looks up identifiers of devices, reading each table or superblock at most once."""

    def __init__(self) -> None:
        self._tables: dict[Path, PartitionTable | None] = {}
        self._blkid: dict[Path, dict[str, str]] = {}

    def value(self, dev: BlockDevice, key: str) -> str | None:
        if key in ("PARTLABEL", "PARTUUID"):
            return self._partition_value(dev, key)
        if key == "PTUUID":
            table = self._table(dev.node) if dev.parent is None else None
            return table.disk_id if table is not None else None
        udev = dev.properties.get(f"ID_FS_{key}")
        if udev is not None:
            return udev
        return self.blkid(dev.node).get(key)

    def _partition_value(self, dev: BlockDevice, key: str) -> str | None:
        if dev.parent is None or dev.number is None:
            return None
        udev_key = "ID_PART_ENTRY_NAME" if key == "PARTLABEL" else "ID_PART_ENTRY_UUID"
        if udev_key in dev.properties:
            return dev.properties[udev_key]
        if key == "PARTLABEL" and "PARTNAME" in dev.properties:
            return dev.properties["PARTNAME"]
        table = self._table(dev.parent)
        if table is None:
            return None
        for part in table.partitions:
            if part.number == dev.number:
                return part.name if key == "PARTLABEL" else part.partuuid
        return None

    def _table(self, disk: Path) -> PartitionTable | None:
        if disk not in self._tables:
            try:
                self._tables[disk] = read_table(disk)
            except OperationalError:
                self._tables[disk] = None
        return self._tables[disk]

    def blkid(self, node: Path) -> dict[str, str]:
        if node not in self._blkid:
            proc = run(["blkid", "-p", "-o", "export", node], check=False, timeout=30)
            self._blkid[node] = dict(
                line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line
            ) if proc.returncode == 0 else {}
        return self._blkid[node]


def _same(key: str, a: str, b: str) -> bool:
    return a.lower() == b.lower() if key in ("PARTUUID", "UUID", "PTUUID") else a == b


def resolve(spec: str, *, within: Path | None = None) -> Path:
    """The one block device `spec` names; `within` limits the search to one disk."""
    key, value = parse_spec(spec)
    if key == "PATH":
        path = Path(os.path.realpath(value))
        try:
            if stat.S_ISBLK(path.stat().st_mode):
                return path
        except FileNotFoundError:
            pass
        raise UsageError(f"{value} is not a block device",
                         hint="check the [slots] and [mounts] device specs in the configuration")
    candidates = block_devices()
    if within is not None:
        disk = Path(os.path.realpath(within))
        candidates = [d for d in candidates if d.node == disk or d.parent == disk]
    prober = _Prober()
    matches = []
    seen = []
    for dev in candidates:
        found = prober.value(dev, key)
        if found is None:
            continue
        seen.append(f"{found} ({dev.node})")
        if _same(key, found, value):
            matches.append(dev.node)
    where = f" on {within}" if within is not None else ""
    if len(matches) == 1:
        return matches[0]
    if not matches:
        listing = ", ".join(seen[:12]) or "none"
        raise UsageError(f"no block device{where} has {key}={value}",
                         hint=f"{key} values found: {listing}")
    raise UsageError(f"{len(matches)} block devices{where} have {key}={value}: "
                     + ", ".join(str(m) for m in matches),
                     hint="make the spec unique (for example PARTUUID= or a /dev path)")


def cmdline_slot(cmdline: Path) -> Slot | None:
    """The `abupgrade.slot=` the bootloader put on the kernel command line, if any."""
    try:
        words = cmdline.read_text().split()
    except FileNotFoundError:
        return None
    for word in reversed(words):
        if word.startswith("abupgrade.slot="):
            return Slot.parse(word.removeprefix("abupgrade.slot="))
    return None


def _source_devno(source: str) -> int | None:
    if not source.startswith("/"):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def booted_slot(config: Config) -> Slot | None:
    """The slot the running system booted from, or None when that cannot be told."""
    slot = cmdline_slot(config.system.cmdline)
    if slot is not None:
        return slot
    root = mounts.root(config.system.mountinfo)
    if root is None:
        return None
    devnos = {root.devno, _source_devno(root.source)}
    for slot, spec in config.slots.items():
        try:
            device = resolve(spec)
        except UsageError:
            continue
        if device.stat().st_rdev in devnos:
            return slot
    return None


def mounts_of(device: Path, mountinfo: Path = mounts.MOUNTINFO) -> list[Path]:
    """Mount points of `device`, of its partitions and of whatever is stacked on it."""
    st = device.stat()
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"{device} is not a block device")
    related = set(blockdev.related(st.st_rdev))
    return [m.point for m in mounts.read(mountinfo)
            if m.devno in related or _source_devno(m.source) in related]


def is_mounted(device: Path, mountinfo: Path = mounts.MOUNTINFO) -> bool:
    return bool(mounts_of(device, mountinfo))
