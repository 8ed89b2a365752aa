"""Strict modes: a file that decides trust or runs as root is used only when nobody but root
(or the user abupgrade runs as) could have put it there.

As OpenSSH's StrictModes, sudo and cron do, every path is walked from `/`: each folder on the
way and the object itself must be owned by root or by us and not writable by group or others.
Symlinks are followed component by component and judged by their target, and the folders on
the way to the target are judged too.

A sticky folder that others may write (`/tmp`, 1777) is accepted on the way only when it is
owned by root or by us and the entry we step into exists and is owned by root or by us: the
kernel then lets nobody else rename, remove or replace that entry (the rule the kernel's
`fs.protected_symlinks` builds on). The object itself never gets this exception: a keyring or
a check folder that others may write lets them add a key or a check, sticky bit or not.
OpenSSH refuses sticky folders outright, but it walks only up to the user's home; abupgrade
walks to `/`, and refusing `/tmp` would refuse every disk it mounts there for `--disk`.

Group-writable means writable whatever the group is (as OpenSSH); a POSIX ACL that lets
anyone else write shows as the group write bit (the ACL mask), so it is refused too.
"""

from __future__ import annotations

import enum
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

from abupgrade.errors import UsageError

MAX_SYMLINKS = 40  # as the kernel's ELOOP limit


class Kind(enum.Enum):
    FILE = "file"  # a regular file that is read or run (config, key, check, hook, ...)
    FOLDER = "folder"  # a folder whose entries are trusted (keyring, required.d, hooks)


class UnsafePath(UsageError):
    """A trust-deciding path that someone else could have written (exit 2)."""

    def __init__(self, what: str, path: Path, problem: str, fix: str) -> None:
        super().__init__(f"refusing {what} {path}: {problem}", hint=fix)
        self.path = path
        self.problem = problem

    def line(self) -> str:
        """What and the fix in one line, for reports that are not an error exit."""
        return f"{self.message} (hint: {self.hint})"


def trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _writers(mode: int) -> str:
    group, other = mode & stat.S_IWGRP, mode & stat.S_IWOTH
    return "group and others" if group and other else ("group" if group else "others")


def check(path: Path, what: str, kind: Kind) -> Path | None:
    """The real path of `path` when it and every folder on the way may be trusted; None when
    it does not exist (and nobody but root or us could create it). Raises UnsafePath.

    `what` names the path for the message: "configuration", "keyring", "health check", ...
    """
    owners = trusted_owners()
    path = path if path.is_absolute() else Path.cwd() / path  # `..` is resolved as walked

    def refuse(at: str, problem: str, fix: str) -> UnsafePath:
        return UnsafePath(what, path, f"{at} {problem}", fix)

    def judge(at: str, st: os.stat_result, *, final: bool = False, entry: str = "",
              entry_st: os.stat_result | None = None) -> None:
        """`at` (with `st`) on the way to `entry` in it (`entry_st`: None when missing)."""
        if st.st_uid not in owners:
            raise refuse(at, f"is owned by {_owner(st.st_uid)}, not root", f"chown root {at}")
        mode = st.st_mode
        if not mode & (stat.S_IWGRP | stat.S_IWOTH):
            return
        why = f"is writable by {_writers(mode)} (mode {stat.S_IMODE(mode):04o})"
        if not final and mode & stat.S_ISVTX:
            if entry_st is None:
                why += f" and {entry} in it does not exist yet"
            elif entry_st.st_uid not in owners:
                why += f" and {entry} in it is owned by {_owner(entry_st.st_uid)}"
            else:
                return  # sticky: nobody else can rename, remove or replace the entry
        raise refuse(at, why, f"chmod go-w {at}")

    # Walk like the kernel does, with lstat, following symlinks ourselves.
    todo = list(reversed(path.parts[1:]))
    current = "/"
    current_st = os.lstat("/")
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current) or "/"
            current_st = os.lstat(current)
            continue
        step = os.path.join(current, name)
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            judge(current, current_st, entry=name)
            return None
        except OSError as exc:
            raise refuse(step, f"cannot be checked: {exc.strerror}", "run abupgrade as root") from None
        judge(current, current_st, entry=name, entry_st=st)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise refuse(step, "leads through too many symlinks", f"fix the links of {path}")
            target = os.readlink(step)
            todo.extend(reversed(Path(target).parts))
            if target.startswith("/"):
                todo.pop()  # the leading "/"
                current, current_st = "/", os.lstat("/")
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise refuse(step, "is not a folder", f"fix the path {path}")
        current, current_st = step, st

    real = Path(current)
    judge(current, current_st, final=True)
    mode = current_st.st_mode
    if kind is Kind.FOLDER and not stat.S_ISDIR(mode):
        raise refuse(current, "is not a folder", f"make {path} a folder")
    if kind is not Kind.FOLDER and not stat.S_ISREG(mode):
        raise refuse(current, "is not a regular file", f"make {path} a regular file")
    return real


def executables(folder: Path, what: str) -> Iterator[tuple[Path, UnsafePath | None]]:
    """The executables of `folder` in name order (dot files left out), each with its refusal
    when it fails the strict-mode check, else None. A folder that fails it comes back as one
    refused entry, and none of its executables. A missing folder has none."""
    try:
        real = check(folder, f"{what} folder", Kind.FOLDER)
    except UnsafePath as refusal:
        yield folder, refusal
        return
    if real is None:
        return
    for entry in sorted(real.iterdir()):
        try:
            st = entry.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or entry.name.startswith("."):
            continue
        try:
            if check(entry, what, Kind.FILE) is not None:
                yield entry, None
        except UnsafePath as refusal:
            yield entry, refusal
