"""Files: durable updates (temp file in the same folder, write, fsync, rename, fsync the
folder) and inputs opened with one-line errors.

Files a bootloader reads need one step more. GRUB and syslinux read ext2/3/4 without
replaying its journal, so a rename or unlink that fsync made durable can still sit in the
journal, invisible to them, for as long as the kernel leaves it there (seconds to minutes).
`checkpoint` writes the journal out to the filesystem's home blocks, so the next power-on
finds on disk exactly what Linux sees; `boot=True` does that after every change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from abupgrade.errors import OperationalError, UsageError

if TYPE_CHECKING:
    import ctypes

# linux/fs.h and linux/ext4.h
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
EXT4_IOC_CHECKPOINT = 0x4004662B  # Linux 5.13
CHECKPOINT_DRY_RUN = 0x4
EXT_MAGIC = 0xEF53  # statfs f_type of ext2, ext3 and ext4
_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)


def open_input(path: Path, what: str = "") -> io.BufferedReader:
    """`path` opened for reading. A missing file or a folder is a UsageError (exit 2) that
    names `what` the path should have been ("image", "public key"); other failures are
    operational (exit 1)."""
    named = f"{what} {path}" if what else str(path)
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"{named} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{named} is a directory") from None
    except OSError as e:
        raise OperationalError(f"cannot read {named}: {e.strerror}") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint(folder: Path, *, dry_run: bool = False) -> None:
    """Everything the filesystem holding `folder` has committed, at its home blocks, where a
    reader that replays no journal finds it. ext3/ext4: the journal is flushed
    (EXT4_IOC_CHECKPOINT; on kernels before 5.13 a freeze and thaw, which flushes it too);
    ext2, ext4 without a journal and any other filesystem: syncfs. `dry_run` only checks that
    it can be done (a freeze cannot be tried without doing it)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _fs_type(fd) == EXT_MAGIC:
            try:
                flags = CHECKPOINT_DRY_RUN if dry_run else 0
                fcntl.ioctl(fd, EXT4_IOC_CHECKPOINT, struct.pack("I", flags))
                return
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:
                    if not dry_run:
                        _freeze_thaw(fd, folder)
                    return
                if exc.errno != errno.ENODEV:  # ENODEV: no journal, syncfs does it
                    raise _cannot(folder, exc) from None
        if not dry_run:
            _syncfs(fd, folder)
    finally:
        os.close(fd)


def _fs_type(fd: int) -> int:
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first field
    if _libc().fstatfs(fd, buf) != 0:
        return 0
    return int(struct.unpack_from("l", buf.raw)[0])


def _libc() -> ctypes.CDLL:
    import ctypes  # here, not at the top: the boot hook's start does not pay for it

    return ctypes.CDLL(None, use_errno=True)


def _freeze_thaw(fd: int, folder: Path) -> None:
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        raise _cannot(folder, exc) from None
    fcntl.ioctl(fd, FITHAW, 0)


def _syncfs(fd: int, folder: Path) -> None:
    import ctypes

    if _libc().syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise _cannot(folder, OSError(code, os.strerror(code)))


def _cannot(folder: Path, exc: OSError) -> OperationalError:
    return OperationalError(
        f"cannot write the journal of the filesystem of {folder} to disk: {exc.strerror}",
        hint="the bootloader reads the boot filesystem without its journal; keep it on "
             "ext2/3/4 and run abupgrade as root")


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644, *, boot: bool = False) -> Iterator[BinaryIO]:
    """Yield a file that replaces `path` atomically when the block ends without error;
    `boot`: the bootloader reads it, so the change is checkpointed too."""
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    if boot:
        checkpoint(path.parent)


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty, private file `.NAME.RANDOM.tmp` beside `path`, opened for writing, as
    tempfile.mkstemp makes it (without importing tempfile, shutil and lzma at every start)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, boot: bool = False) -> None:
    with atomic_writer(path, mode, boot=boot) as out:
        out.write(data)


def remove(path: Path, *, boot: bool = False) -> bool:
    """Unlink `path` durably (and checkpointed, for a file the bootloader reads); False when
    there was nothing to remove."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    if boot:
        checkpoint(path.parent)
    return True
