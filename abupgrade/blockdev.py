"""Block devices: their size, sector size and queue limits, zeroing, and what sysfs tells
about them (partitions, holders, loop devices, device-mapper and RAID). Image files answer
the same questions where that makes sense (their size, 512-byte sectors)."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from abupgrade.errors import OperationalError, PolicyRefusal

SYS_DEV_BLOCK = Path("/sys/dev/block")
SYS_CLASS_BLOCK = Path("/sys/class/block")

_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268
_BLKZEROOUT = 0x127F
_BLKROGET = 0x125E
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def fd_capacity(fd: int) -> int:
    """Bytes of an open block device (BLKGETSIZE64), or the size of an open file."""
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return os.fstat(fd).st_size
    size: int = struct.unpack("=Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
    return size


def capacity(path: Path) -> int:
    """Bytes of a block device or a file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_capacity(fd)
    finally:
        os.close(fd)


def writable(path: Path) -> bool:
    """Whether `path` takes writes: for a block device, that it is not read-only (BLKROGET:
    `blockdev --setro`, a write-protect switch; opening it for writing still succeeds)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return True
        flag: int = struct.unpack("=i", fcntl.ioctl(fd, _BLKROGET, b"\0" * 4))[0]
        return flag == 0
    finally:
        os.close(fd)


def require_fits(size: int, room: int, where: str) -> None:
    """Refuse (exit 4) a root filesystem of `size` bytes for a slot of `room` bytes."""
    if size > room:
        raise PolicyRefusal(f"image's root filesystem ({size:,} bytes) is larger than {where} "
                            f"({room:,} bytes)", hint="build the image for this disk's slot size")


def sector_size(fd: int) -> int:
    """The logical sector size of an open block device (BLKSSZGET); 512 for a file."""
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return 512
    size: int = struct.unpack("=i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
    return size


def zero_out(fd: int, length: int, *, offset: int = 0) -> bool:
    """Make `length` bytes from `offset` of an open block device read zeros with the device's
    own write-zeroes (both sector-aligned); False when the device refuses.

    First as a hole punched in the device (fallocate PUNCH_HOLE): the kernel's write-zeroes
    that may also deallocate (NVMe deallocate, thin provisioning; a loop device punches a
    hole in its backing file), never emulated by writing zeros; then BLKZEROOUT, which keeps
    the blocks allocated (a loop device on tmpfs takes only the first, on ext4 both)."""
    try:
        if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return True
    except OperationalError:
        pass  # a read-only or failing device: the writes that follow say so
    try:
        fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("=QQ", offset, length))
    except OSError:
        return False
    return True


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with flags (os.posix_fallocate has none); False when unsupported."""
    import ctypes  # here: the boot hook, which imports this module, never needs it

    if _libc_fallocate()(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OperationalError(f"fallocate failed: {os.strerror(err)}")


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    """libc's fallocate, looked up once (a zero run of the writer calls it each)."""
    import ctypes

    call = ctypes.CDLL(None, use_errno=True).fallocate  # the libc this process runs on
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return call


def sysfs_dir(devno: int) -> Path:
    return SYS_DEV_BLOCK / f"{os.major(devno)}:{os.minor(devno)}"


def queue_limit(device: Path, name: str) -> int:
    """A value of the device's request queue in sysfs (a partition's is its disk's); 0 when
    there is none."""
    sysdir = sysfs_dir(device.stat().st_rdev)
    queue = sysdir / "queue"
    if not queue.is_dir():
        queue = sysdir / ".." / "queue"
    try:
        return int((queue / name).read_text())
    except (OSError, ValueError):
        return 0


def partitions(disk: Path) -> dict[int, Path]:
    """Partition number -> device node of the partitions the kernel knows of `disk`."""
    sysdir = SYS_CLASS_BLOCK / disk.name
    found = {}
    if sysdir.is_dir():
        for child in sysdir.iterdir():
            number = child / "partition"
            if number.exists():
                found[int(number.read_text())] = Path("/dev") / child.name
    return found


def related(devno: int) -> Iterator[int]:
    """devno, its partitions and everything stacked on top (holders), recursively."""
    todo, done = [devno], set()
    while todo:
        current = todo.pop()
        if current in done:
            continue
        done.add(current)
        yield current
        sysdir = sysfs_dir(current)
        if not sysdir.exists():
            continue
        sysdir = sysdir.resolve()
        for child in sysdir.iterdir():
            if (child / "partition").exists():
                todo.append(_read_devno(child))
        holders = sysdir / "holders"
        if holders.is_dir():
            todo.extend(_read_devno(h.resolve()) for h in holders.iterdir())


def _read_devno(sysdir: Path) -> int:
    major, minor = (sysdir / "dev").read_text().strip().split(":")
    return os.makedev(int(major), int(minor))


def loops_backed_by(image: Path) -> list[str]:
    """The loop devices whose backing file is `image` (by its path, or by its inode when it
    was attached under another name)."""
    real = os.path.realpath(image)
    st = os.stat(image)
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
            other = os.stat(name) if name != real else st
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                found.append("/dev/" + backing.parent.parent.name)
        except OSError:
            continue
    return found


def stacked_kind(devno: int, source: str) -> str | None:
    """"LVM/device-mapper" or "software RAID" when the device (number `devno`, named
    `source` in mountinfo) is one, else None."""
    name = Path(source).name
    sysdir = sysfs_dir(devno)
    if source.startswith("/dev/mapper/") or name.startswith("dm-") or (sysdir / "dm").is_dir():
        return "LVM/device-mapper"
    if re.fullmatch(r"md\d+(p\d+)?|md/.+", name) or source.startswith("/dev/md/") \
            or (sysdir / "md").is_dir():
        return "software RAID"
    return None
