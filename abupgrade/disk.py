"""Disks as temporary changes: attach, mount, open a disk made by `disk init`.

Every context manager here undoes exactly what it did, on every exit path: a loop device
it attached is detached (that one, never another), partition nodes it added are removed,
mounts it made are unmounted and their temporary folders deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import stat
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from abupgrade import blockdev, mounts
from abupgrade import config as configuration
from abupgrade.config import Config
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.partitions import PartitionTable, TableKind, read_table
from abupgrade.run import require_tool, run
from abupgrade.slots import resolve

log = logging.getLogger(__name__)

NODE_TIMEOUT = 10.0
MOUNT_PREFIX = "abupgrade-mnt-"  # our temporary mount points, in TEMP_DIR
TEMP_DIR = Path(tempfile.gettempdir()).resolve()

# QEMU locks an image it opens with OFD byte-range locks, not flock (block/file-posix.c):
# a read lock on byte PERM + n while it holds permission n, on byte SHARED + n while it lets
# no one else have it. abupgrade reads and writes the image and lets no one else write.
PERM, SHARED = 100, 200
READ, WRITE = 0, 1  # QEMU's BLK_PERM_CONSISTENT_READ, BLK_PERM_WRITE (bit numbers)
FLOCK = struct.Struct("hhqqi4x")  # struct flock (64-bit off_t)


@dataclass(frozen=True)
class Disk:
    device: Path  # the whole disk as a block device (a loop device for an image file)
    partitions: Mapping[int, Path]  # partition number -> its block device
    table: PartitionTable | None
    image: Path | None = None  # the image file behind the loop device, if any


def _wait_for_nodes(device: Path, numbers: list[int]) -> dict[int, Path]:
    deadline = time.monotonic() + NODE_TIMEOUT
    while True:
        present = blockdev.partitions(device)
        if all(n in present and present[n].is_block_device() for n in numbers):
            return present
        if time.monotonic() > deadline:
            missing = [n for n in numbers if n not in present or not present[n].is_block_device()]
            raise OperationalError(f"partition nodes {missing} of {device} did not appear",
                                   hint="is devtmpfs mounted on /dev?")
        time.sleep(0.05)


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """`target` (image file or device) held for this run, before anything attaches it: a
    second abupgrade on it is refused, and so is a disk a QEMU has open (its image lock), or
    with a partition mounted anywhere, through any loop device of the same file too (two
    mounts of one ext4 corrupt it)."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{target} does not exist") from None
    except OSError as exc:
        raise OperationalError(f"cannot open {target}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PolicyRefusal(f"another abupgrade is working on {target}",
                                hint="wait for it to finish") from None
        _image_lock(fd, target)
        if mounted_anywhere(target):
            _clear_leftovers(target)
        busy = [f"{m.source} is mounted on {m.point}" for m in mounted_anywhere(target)]
        if busy:
            raise PolicyRefusal(f"{target} is in use: {busy[0]}",
                                hint="unmount it first; abupgrade never works on a mounted disk")
        yield
    finally:
        os.close(fd)


def _ofd_lock(fd: int, command: int, kind: int, byte: int) -> int:
    """One OFD lock call on `byte`; the lock type it leaves in the struct (F_OFD_GETLK:
    F_UNLCK if nothing else holds a lock that conflicts with `kind`)."""
    kind_now: int = FLOCK.unpack(fcntl.fcntl(fd, command, FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)))[0]
    return kind_now


def _image_lock(fd: int, target: Path) -> None:
    """Take `target`'s image lock as QEMU does, then refuse (exit 4) if a QEMU (or another
    program that locks images its way) writes it or keeps others from writing it. Taking the
    bytes first, as QEMU does too, means of two starting together at least one sees the
    other; held, they make a QEMU started during this run refuse the image."""
    try:
        for byte in (PERM + READ, PERM + WRITE, SHARED + WRITE):
            _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # someone holds a write lock there
            _refuse_in_use(target, "writes it")
        log.debug("no image lock on %s: %s", target, exc.strerror)  # QEMU goes on too
        return
    held = {byte for byte in (PERM + WRITE, SHARED + WRITE, SHARED + READ)
            if _ofd_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK}
    if PERM + WRITE in held:
        _refuse_in_use(target, "writes it")
    if held:
        _refuse_in_use(target, "keeps others from writing it" if SHARED + WRITE in held
                       else "keeps others from reading it")


def _refuse_in_use(target: Path, what: str) -> NoReturn:
    holders = [f"{name} (pid {pid})" for pid, name in _openers(target)]
    raise PolicyRefusal(f"{target} is in use: {', '.join(holders) or 'another program'} "
                        f"holds QEMU's image lock and {what}",
                        hint="stop the virtual machine first; abupgrade never works on a "
                             "disk in use")


def _openers(target: Path) -> list[tuple[int, str]]:
    """(pid, command name) of every other process with `target` open."""
    want = target.stat()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            opened = any(os.path.samestat(os.stat(fd), want) for fd in (proc / "fd").iterdir())
            if opened:
                found.append((int(proc.name), (proc / "comm").read_text().strip()))
        except OSError:
            continue
    return sorted(found)


def _clear_leftovers(target: Path) -> None:
    """What a killed abupgrade left of `target` (we hold its lock, so none is running): its
    mounts on temporary folders of ours in this namespace are unmounted, the loop devices of
    an image file that nothing mounts any more are detached. Anything else stays, and refuses."""
    for mount in mounted_anywhere(target):
        if mount.point.name.startswith(MOUNT_PREFIX) and mount.point.parent == TEMP_DIR \
                and mount in mounts.parse(Path("/proc/self/mountinfo").read_text()):
            log.debug("unmounting %s, left by a killed run", mount.point)
            run(["umount", mount.point], check=False)
            with contextlib.suppress(OSError):
                mount.point.rmdir()
    if stat.S_ISREG(target.stat().st_mode) and not mounted_anywhere(target):
        for loop in blockdev.loops_backed_by(target):
            log.debug("detaching %s, left by a killed run", loop)
            run([require_tool("partx", package="util-linux"), "--delete", loop], check=False)
            run([require_tool("losetup", package="mount"), "--detach", loop], check=False)


def mounted_anywhere(target: Path) -> list[mounts.Mount]:
    """Each mount, in every mount namespace this process can see, of `target`'s block
    devices: the device (or, for an image file, every loop device backed by it), their
    partitions and what is stacked on them."""
    st = target.stat()
    disks = [st.st_rdev] if stat.S_ISBLK(st.st_mode) else \
        [os.stat(loop).st_rdev for loop in blockdev.loops_backed_by(target)]
    devices = {devno for disk in disks for devno in blockdev.related(disk)}
    if not devices:
        return []
    seen_ns: set[int] = set()
    found: list[mounts.Mount] = []
    for proc in [Path("/proc/self"), *Path("/proc").glob("[0-9]*")]:
        try:
            ns = os.stat(proc / "ns/mnt").st_ino
            if ns in seen_ns:
                continue
            seen_ns.add(ns)
            listed = mounts.parse((proc / "mountinfo").read_text())
        except OSError:
            continue
        found += [m for m in listed if m.devno in devices and m not in found]
    return found


@contextlib.contextmanager
def attached(target: Path) -> Iterator[Disk]:
    """The disk `target` (image file or block device) with a node for each partition; the
    target is `locked` meanwhile."""
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{target} does not exist") from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(locked(target))
        image = None
        if stat.S_ISBLK(mode):
            device = Path(os.path.realpath(target))
        elif stat.S_ISREG(mode):
            image = target
            device = stack.enter_context(_loop_device(target))
        else:
            raise UsageError(f"{target} is neither a block device nor an image file")
        if image is not None:
            _drop_stale_partitions(device)
        table = read_table(device)
        numbers = [p.number for p in table.partitions] if table else []
        present = blockdev.partitions(device)
        missing = [n for n in numbers if n not in present]
        if missing:
            stack.enter_context(_partx_added(device, missing))
        nodes = _wait_for_nodes(device, numbers)
        yield Disk(device, {n: nodes[n] for n in numbers}, table, image)


def _drop_stale_partitions(device: Path) -> None:
    """Partitions a loop device kept from its previous user (partx-made partitions outlive
    a detach) point at that user's layout, and their page cache holds that user's bytes."""
    stale = blockdev.partitions(device)
    if stale:
        partx = require_tool("partx", package="util-linux")
        log.debug("dropping stale partitions %s of %s", sorted(stale), device)
        run([partx, "--delete", device], check=False)
        if blockdev.partitions(device):
            raise OperationalError(f"{device} carries partitions of its previous user that "
                                   "cannot be removed", hint="is one of them mounted?")


@contextlib.contextmanager
def _loop_device(image: Path) -> Iterator[Path]:
    losetup = require_tool("losetup", package="mount")
    device = Path(run([losetup, "--find", "--show", image]).stdout.strip())
    log.debug("attached %s to %s", image, device)
    try:
        yield device
    finally:
        run([losetup, "--detach", device])
        log.debug("detached %s", device)


@contextlib.contextmanager
def _partx_added(device: Path, numbers: list[int]) -> Iterator[None]:
    partx = require_tool("partx", package="util-linux")
    added: list[int] = []
    try:
        for n in numbers:
            run([partx, "--add", "--nr", f"{n}:{n}", device])
            added.append(n)
        yield
    finally:
        for n in reversed(added):
            run([partx, "--delete", "--nr", f"{n}:{n}", device])


@contextlib.contextmanager
def mounted(device: Path, *, readonly: bool = False) -> Iterator[Path]:
    """`device` mounted on a fresh temporary folder; unmounted and removed afterwards."""
    point = Path(tempfile.mkdtemp(prefix=MOUNT_PREFIX, dir=TEMP_DIR))
    try:
        run(["mount", "-o", "ro" if readonly else "rw", device, point],
            hint=f"is there a filesystem on {device}?")
    except BaseException:
        point.rmdir()
        raise
    try:
        yield point
    finally:
        run(["umount", point])
        point.rmdir()


def mkfs_ext4(
    target: Path,
    label: str,
    *,
    block_size: int = 4096,
    offset: int | None = None,
    size: int | None = None,
    root_dir: Path | None = None,
) -> None:
    """An ext4 on a device, or inside an image file at `offset` (bytes) for `size` bytes."""
    mkfs = require_tool("mkfs.ext4", package="e2fsprogs")
    argv: list[str | Path] = [mkfs, "-q", "-F", "-L", label, "-b", str(block_size)]
    if offset is not None:
        argv += ["-E", f"offset={offset}"]
    if root_dir is not None:
        argv += ["-d", root_dir]
    argv.append(target)
    if size is not None:
        argv.append(f"{size // 1024}k")
    run(argv)


def boot_partition(table: PartitionTable | None, where: Path) -> int:
    """The number of the boot partition: GPT name "boot", or the one MBR bootable one."""
    if table is None:
        raise UsageError(f"{where} has no partition table",
                         hint="lay the disk out with `abupgrade disk init`")
    if table.kind is TableKind.GPT:
        found = table.by_name("boot")
        what = 'a GPT partition named "boot"'
    else:
        found = [p for p in table.partitions if p.bootable]
        what = "a bootable MBR partition"
    if len(found) != 1:
        raise UsageError(f"{where} has {len(found)} boot partitions, expected {what}",
                         hint="lay the disk out with `abupgrade disk init`")
    return found[0].number


@dataclass(frozen=True)
class DiskSession:
    """A disk opened for `--disk`: its configuration rebased onto temporary mounts."""

    disk: Disk
    config: Config  # paths moved under the mounts; slots as this disk's /dev paths
    mounts: Mapping[Path, Path]  # mount point named in the config -> where it is mounted now
    boot: Path  # the boot filesystem, mounted


@contextlib.contextmanager
def open_disk(target: Path, *, readonly: bool = False) -> Iterator[DiskSession]:
    """Attach `target`, mount its boot partition, read the configuration `disk init` put
    there, mount every `[mounts]` entry and hand out the configuration rebased onto them."""
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(attached(target))
        number = boot_partition(disk.table, target)
        boot_device = disk.partitions[number]
        boot = stack.enter_context(mounted(boot_device, readonly=readonly))
        path = boot / configuration.ON_DISK_PATH
        if not path.is_file():
            raise UsageError(f"{target} has no abupgrade configuration on its boot partition",
                             hint="lay the disk out with `abupgrade disk init`")
        loaded = configuration.load(path)
        mounts: dict[Path, Path] = {}
        try:
            for point, spec in loaded.mounts.items():
                device = resolve(spec, within=disk.device)
                if device == boot_device:
                    mounts[point] = boot
                else:
                    mounts[point] = stack.enter_context(mounted(device, readonly=readonly))
            slots = {slot: str(resolve(spec, within=disk.device))
                     for slot, spec in loaded.slots.items()}
            on_disk = loaded.rebased(mounts)
            # the configured bootloader's table too when the file leaves it to defaults:
            # a default device spec must name this disk's partition, never the host's
            tables = {kind: table.resolved(lambda spec: str(resolve(spec, within=disk.device)))
                      for kind, table in {**on_disk.bootloaders,
                                          on_disk.bootloader: on_disk.settings}.items()}
        except UsageError as exc:
            raise UsageError(f"{target}: {exc.message}", hint=exc.hint) from None
        rebased = dataclasses.replace(on_disk, slots=slots, bootloaders=tables)
        yield DiskSession(disk, rebased, mounts, boot)
