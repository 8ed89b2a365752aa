"""Files on a FAT filesystem, above all the EFI system partition (ESP).

Two ways in, chosen at run time by `open_fat`:

- **the kernel** (`KernelFat`): where the partition is mounted (a running machine's
  /boot/efi) its mount is used; where it is not but the kernel has a vfat driver, it is
  mounted on a temporary folder for the duration. Plain file calls, each change followed by
  fsync of the file and of its folder.
- **mtools** (`MtoolsFat`): where the kernel has no vfat driver (containers, build hosts,
  this project's test machines), or for a FAT inside an image file at a byte offset.
  `mmd`, `mcopy`, `mren`, `mdel`, `mdir` work on a private drive definition that opens the
  device with O_SYNC and O_EXCL: every write is on the disk before the next one starts, and
  a device the kernel has mounted is refused rather than written behind its back.

Paths are relative to the filesystem's root, "/"-separated, and restricted to letters,
digits and `._+-~@=,` (mtools expands wildcards; FAT forbids more). FAT compares names
without regard to case; so do lookups here.

What FAT gives on a power cut
-----------------------------
FAT has no journal and no atomic operation above a single sector write (512 bytes; most
storage writes one sector whole or not at all, which is all that is assumed here). What a
change writes, in order (mtools 4.0.32 with O_SYNC, traced with strace - see
fixtures/fatlog.py; Linux's vfat does the same steps, ordered by fsync here):

- a new file: its data clusters and its directory entry (one write when they are
  adjacent, whose sectors the device may persist in any order), then both FAT copies,
  then the FSInfo sector. A cut can leave an entry whose clusters the FAT still calls
  free, or the right length of garbage: **a file is complete only when the call that
  wrote it has returned**, whatever its name says.
- a rename inside one folder: one write of the directory sectors holding the old and the
  new entry - one sector when they share it, else a cut can leave both names (on the same
  clusters; readers accept it, fsck.fat repairs it) or, with the new entry's sector not
  written yet, only the old name.
- a rename onto an existing name (`replace=True`): the target's own entry is rewritten to
  point at the source's clusters (mtools, and Linux's vfat_rename, reuse it), the source's
  entry is removed, then the FAT copies free the old clusters. The target name never
  disappears: before its sector is written it is the old file, after it the new one; a cut
  can leave the source name as well, or lost clusters, both harmless.
- a delete: the directory sector, then the FAT copies.
- FAT copies 1 and 2 can differ after a cut; firmware reads copy 1, fsck.fat reconciles.

So `write` and `copy_in` never write the final name directly: they write
`<name>.abupgrade-new`, then rename it onto the name. After a cut at any sector the name
reads whole, old bytes or new (tests/test_fat.py replays every cut of the recorded writes);
a left-over `.abupgrade-new` is garbage the next write of that name removes. Whoever reads
such a folder (firmware, a boot loader) must ignore names it does not expect. What FAT
cannot give is a change of several names at once: a state machine kept in file names
(systemd-boot's tries counters) must make every intermediate set of names bootable.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Self

from abupgrade import blockdev, mounts
from abupgrade.disk import mounted
from abupgrade.errors import OperationalError, UsageError
from abupgrade.fsutil import fsync_dir
from abupgrade.run import require_tool, run

log = logging.getLogger(__name__)

NEW_SUFFIX = ".abupgrade-new"
_NAME = re.compile(r"[A-Za-z0-9._+\-~@=,]+")


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool


def fat_path(path: str | PurePosixPath) -> PurePosixPath:
    """`path` checked: relative, no `.`/`..`, only names FAT and mtools take literally."""
    p = PurePosixPath(path)
    if p.is_absolute():
        p = p.relative_to("/")
    if not p.parts or any(part in (".", "..") or not _NAME.fullmatch(part) for part in p.parts):
        raise UsageError(f"{str(path)!r} is not a usable path on a FAT filesystem",
                         hint="use letters, digits and ._+-~@=, in each name")
    return p


class Fat(abc.ABC):
    """A FAT filesystem. Every change is on the disk when the call returns."""

    def __init__(self, where: str) -> None:
        self.where = where  # for messages: a mount point or a device

    @abc.abstractmethod
    def list(self, folder: str | PurePosixPath = "") -> list[Entry]:
        """The entries of `folder` ("" is the root); FileNotFoundError when it is missing."""

    @abc.abstractmethod
    def read(self, path: str | PurePosixPath) -> bytes:
        """The file's bytes; FileNotFoundError when it is missing."""

    @abc.abstractmethod
    def mkdir(self, path: str | PurePosixPath) -> None:
        """`path` and its missing parents; nothing when it exists."""

    @abc.abstractmethod
    def rename(self, source: str | PurePosixPath, target: str | PurePosixPath, *,
               replace: bool = False) -> None:
        """Rename within one folder. An existing `target` is FileExistsError unless
        `replace`."""

    @abc.abstractmethod
    def remove(self, path: str | PurePosixPath) -> None:
        """Delete a file; FileNotFoundError when it is missing."""

    @abc.abstractmethod
    def _put(self, path: PurePosixPath, source: Path) -> None:
        """Copy the host file `source` to the new name `path` (no file there)."""

    @abc.abstractmethod
    def writable(self) -> bool:
        """Whether changes can be made (a read-only mount or device says no)."""

    def exists(self, path: str | PurePosixPath) -> bool:
        p = fat_path(path)
        try:
            entries = self.list(p.parent if p.parent.parts else "")
        except FileNotFoundError:
            return False
        return any(e.name.upper() == p.name.upper() for e in entries)

    def copy_in(self, path: str | PurePosixPath, source: Path) -> None:
        """The host file `source` as `path` (replacing it), through `<path>.abupgrade-new`:
        after a power cut `path` is the old file or the new one (see the module docstring)."""
        p = fat_path(path)
        new = p.with_name(p.name + NEW_SUFFIX)
        if self.exists(new):
            self.remove(new)
        self._put(new, source)
        self.rename(new, p, replace=True)

    def write(self, path: str | PurePosixPath, data: bytes) -> None:
        """`data` as the file `path`, replacing it; like copy_in."""
        with tempfile.NamedTemporaryFile(prefix="abupgrade-fat-") as tmp:
            tmp.write(data)
            tmp.flush()
            self.copy_in(path, Path(tmp.name))


# ------------------------------------------------------------------ through the kernel

class KernelFat(Fat):
    """A FAT filesystem the kernel has mounted at `root`."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = root

    def _host(self, path: str | PurePosixPath) -> Path:
        return self.root / fat_path(path) if str(path) not in ("", ".") else self.root

    def list(self, folder: str | PurePosixPath = "") -> list[Entry]:
        with os.scandir(self._host(folder)) as found:
            return sorted((Entry(e.name, e.is_dir(follow_symlinks=False)) for e in found),
                          key=lambda e: e.name)

    def read(self, path: str | PurePosixPath) -> bytes:
        return self._host(path).read_bytes()

    def mkdir(self, path: str | PurePosixPath) -> None:
        target = self._host(path)
        missing = [p for p in (target, *target.parents) if p != self.root
                   and self.root in p.parents and not p.exists()]
        target.mkdir(parents=True, exist_ok=True)
        for made in reversed(missing):
            fsync_dir(made.parent)

    def rename(self, source: str | PurePosixPath, target: str | PurePosixPath, *,
               replace: bool = False) -> None:
        src, dst = self._host(source), self._host(target)
        if src.parent != dst.parent:
            raise ValueError("FAT renames here stay inside one folder")
        if not replace and dst.exists() and dst.name.upper() != src.name.upper():
            raise FileExistsError(f"{target} exists on {self.where}")
        os.replace(src, dst)
        fsync_dir(dst.parent)

    def remove(self, path: str | PurePosixPath) -> None:
        host = self._host(path)
        host.unlink()
        fsync_dir(host.parent)

    def writable(self) -> bool:
        return os.access(self.root, os.W_OK) and \
            not os.statvfs(self.root).f_flag & os.ST_RDONLY

    def _put(self, path: PurePosixPath, source: Path) -> None:
        host = self._host(path)
        with open(source, "rb") as src, open(host, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        fsync_dir(host.parent)


# ------------------------------------------------------------------ through mtools

class MtoolsFat(Fat):
    """The FAT filesystem in `image` (a block device or a file) starting `offset` bytes in,
    through mtools. Use as a context manager (it keeps a private mtools configuration)."""

    DRIVE = "z:"

    def __init__(self, image: Path, offset: int = 0) -> None:
        super().__init__(f"{image}" + (f" at byte {offset}" if offset else ""))
        if '"' in str(image) or "\n" in str(image):
            raise UsageError(f"mtools cannot name {image!r}")
        self.image = image
        self.offset = offset
        self._rc: Path | None = None

    def __enter__(self) -> Self:
        require_tool("mcopy", package="mtools")
        fd, name = tempfile.mkstemp(prefix="abupgrade-mtoolsrc-")
        # sync: O_SYNC, each write on the disk before the next; exclusive: O_EXCL, which
        # a block device the kernel has mounted refuses.
        text = (f'drive {self.DRIVE}\n  file="{os.path.abspath(self.image)}" '
                f"offset={self.offset} sync exclusive\n")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self._rc = Path(name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rc is not None:
            self._rc.unlink(missing_ok=True)
            self._rc = None

    def _m(self, *argv: str | Path, check: bool = True) -> str:
        if self._rc is None:
            raise RuntimeError("MtoolsFat is used outside its `with` block")
        env = {**os.environ, "MTOOLSRC": str(self._rc), "MTOOLS_SKIP_CHECK": "1",
               "LC_ALL": "C.UTF-8"}
        # stdin empty: a question mtools would ask (a name clash) fails instead of waiting
        proc = run(argv, env=env, check=False, timeout=120, input=b"")
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise OperationalError(f"{argv[0]} on {self.where} failed: {tail[0]}",
                                   hint="is it a FAT filesystem, not mounted or in use? "
                                        "fsck.fat -n checks it")
        return proc.stdout

    def writable(self) -> bool:
        return blockdev.writable(self.image)

    def _z(self, path: str | PurePosixPath) -> str:
        return self.DRIVE + ("/" + str(fat_path(path)) if str(path) not in ("", ".") else "/")

    def list(self, folder: str | PurePosixPath = "") -> list[Entry]:
        if str(folder) not in ("", ".") and not self._is_dir(fat_path(folder)):
            raise FileNotFoundError(f"{folder} is not a folder on {self.where}")
        out = self._m("mdir", "-a", "-b", self._z(folder))
        entries = []
        for line in out.splitlines():
            line = line.strip()
            if not line:
                continue
            is_dir = line.endswith("/")
            name = line.rstrip("/").rsplit("/", 1)[-1]
            if name not in (".", ".."):
                entries.append(Entry(name, is_dir))
        return sorted(entries, key=lambda e: e.name)

    def _is_dir(self, path: PurePosixPath) -> bool:
        if not path.parts:
            return True
        parent = self.list(path.parent if path.parent.parts else "")
        return any(e.is_dir and e.name.upper() == path.name.upper() for e in parent)

    def _require_file(self, path: PurePosixPath) -> None:
        try:
            entries = self.list(path.parent if path.parent.parts else "")
        except FileNotFoundError:
            entries = []
        if not any(not e.is_dir and e.name.upper() == path.name.upper() for e in entries):
            raise FileNotFoundError(f"{path} does not exist on {self.where}")

    def read(self, path: str | PurePosixPath) -> bytes:
        p = fat_path(path)
        self._require_file(p)
        with tempfile.TemporaryDirectory(prefix="abupgrade-fat-") as tmp:
            out = Path(tmp) / "file"
            self._m("mcopy", self._z(p), out)
            return out.read_bytes()

    def mkdir(self, path: str | PurePosixPath) -> None:
        p = fat_path(path)
        for depth in range(1, len(p.parts) + 1):
            part = PurePosixPath(*p.parts[:depth])
            if not self._is_dir(part):
                self._m("mmd", self._z(part))

    def rename(self, source: str | PurePosixPath, target: str | PurePosixPath, *,
               replace: bool = False) -> None:
        src, dst = fat_path(source), fat_path(target)
        if src.parent != dst.parent:
            raise ValueError("FAT renames here stay inside one folder")
        self._require_file(src)
        if self.exists(dst) and src.name.upper() != dst.name.upper():
            if not replace:
                raise FileExistsError(f"{dst} exists on {self.where}")
            self._m("mren", "-D", "o", self._z(src), self._z(dst))
        else:
            self._m("mren", self._z(src), self._z(dst))

    def remove(self, path: str | PurePosixPath) -> None:
        p = fat_path(path)
        self._require_file(p)
        self._m("mdel", self._z(p))

    def _put(self, path: PurePosixPath, source: Path) -> None:
        self._m("mcopy", source, self._z(path))


# ------------------------------------------------------------------ choosing one

def kernel_has_vfat() -> bool:
    """The running kernel can mount vfat (built in, loaded, or as a module it can load)."""
    try:
        if any(line.split()[-1] == "vfat" for line in
               Path("/proc/filesystems").read_text().splitlines() if line.strip()):
            return True
    except OSError:
        return False
    modules = Path("/lib/modules", os.uname().release, "kernel/fs/fat")
    return any(modules.glob("vfat.ko*"))


def mount_point_of(device: Path, mountinfo: Path = mounts.MOUNTINFO) -> Path | None:
    """Where the kernel has `device` (a block device) mounted, if it has."""
    try:
        devno = device.stat().st_rdev
    except OSError:
        return None
    for m in mounts.read(mountinfo):
        if m.devno == devno:
            return m.point
    return None


@contextlib.contextmanager
def open_fat(device: Path, *, offset: int = 0, mountinfo: Path = mounts.MOUNTINFO) -> Iterator[Fat]:
    """The FAT filesystem on `device`: its mount if the kernel has it mounted; else mounted
    here if the kernel has vfat; else mtools (also for an image file, at `offset` bytes)."""
    try:
        is_block = stat.S_ISBLK(device.stat().st_mode)
    except FileNotFoundError:
        raise UsageError(f"{device} does not exist") from None
    if is_block and offset == 0:
        point = mount_point_of(device, mountinfo)
        if point is not None:
            yield KernelFat(point)
            return
        if kernel_has_vfat():
            with contextlib.ExitStack() as stack:
                try:
                    root = stack.enter_context(mounted(device))
                except OperationalError as exc:
                    log.debug("mounting %s failed (%s); using mtools", device, exc)
                else:
                    yield KernelFat(root)
                    return
    with MtoolsFat(device, offset) as fat:
        yield fat


def mkfs_fat32(target: Path, *, label: str, offset: int = 0, size: int | None = None) -> None:
    """A FAT32 filesystem on a device, or inside an image file at `offset` for `size` bytes
    (both multiples of 512)."""
    mkfs = require_tool("mkfs.fat", package="dosfstools")
    argv: list[str | Path] = [mkfs, "-F", "32", "-n", label]
    if offset:
        argv += ["--offset", str(offset // 512)]
    argv.append(target)
    if size is not None:
        argv.append(str(size // 1024))
    run(argv, hint="a FAT32 filesystem needs at least 33 MiB")
