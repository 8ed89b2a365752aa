"""Files: durable updates (temp file in the same folder, write, fsync, rename, fsync the
folder) and inputs opened with one-line errors."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from abupgrade.errors import OperationalError, UsageError


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


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a file that replaces `path` atomically when the block ends without error."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(path, mode) as out:
        out.write(data)
