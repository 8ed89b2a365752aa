"""Mounts: /proc/self/mountinfo read in one place, and paths moved between mount points.

A mountinfo line is `ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
SUPER_OPTIONS`; the kernel writes space, tab, newline and backslash in POINT and SOURCE as
octal escapes (`\\040`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from abupgrade.errors import OperationalError

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

    point: Path
    devno: int  # the st_dev of files on it
    fstype: str
    source: str  # what was mounted: a /dev path, or a name such as "proc"


def unescape(field: str) -> str:
    """A mountinfo field with its octal escapes decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def parse(text: str) -> list[Mount]:
    """The mounts of a mountinfo text, in its order; malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if not sep or len(fields) < 5 or not after:
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        mounts.append(Mount(Path(unescape(fields[4])), os.makedev(int(major), int(minor)),
                            after[0], unescape(after[1]) if len(after) > 1 else ""))
    return mounts


def read(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The mounts a mountinfo file lists; OperationalError when it cannot be read."""
    try:
        text = mountinfo.read_text()
    except OSError as exc:
        raise OperationalError(f"cannot read {mountinfo}: {exc.strerror}") from None
    return parse(text)


def holding(path: Path, mountinfo: Path = MOUNTINFO) -> Mount | None:
    """The mount `path` is on (the last of the longest matching mount points); None when no
    mount holds it or the mountinfo cannot be read."""
    target = path.resolve()
    try:
        mounts = read(mountinfo)
    except OperationalError:
        return None
    best: Mount | None = None
    for mount in mounts:
        if mount.point != target and mount.point not in target.parents:
            continue
        if best is None or len(mount.point.parts) >= len(best.point.parts):
            best = mount
    return best


def root(mountinfo: Path = MOUNTINFO) -> Mount | None:
    """The mount on / (the last one, as later mounts hide earlier ones)."""
    found = [m for m in read(mountinfo) if m.point == Path("/")]
    return found[-1] if found else None


def point_holding(path: Path, points: Iterable[Path]) -> Path | None:
    """The longest of `points` that is `path` or one of its parents."""
    best: Path | None = None
    for point in points:
        if (path == point or point in path.parents) and (
                best is None or len(point.parts) > len(best.parts)):
            best = point
    return best


def rebase(path: Path, mounted: Mapping[Path, Path]) -> Path:
    """`path`, named under a mount point of `mounted` (mount point -> where it is mounted
    now), moved to where it is now; unchanged when no mount point holds it."""
    point = point_holding(path, mounted)
    return path if point is None else mounted[point] / path.relative_to(point)
