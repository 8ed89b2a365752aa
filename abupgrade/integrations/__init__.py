"""Ready integrations that run `abupgrade boot-hook` once per boot under common init systems.

Each is a data file of this package, installed into a root filesystem (the running system
or an image tree) by `install`. `detect` tells which init system a root filesystem uses.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from abupgrade.errors import PolicyRefusal, UsageError
from abupgrade.fsutil import atomic_write

SERVICE = "abupgrade-boot-hook"


@dataclass(frozen=True)
class Integration:
    kind: str
    data: str  # the data file of this package
    path: PurePosixPath  # where it goes, relative to the root filesystem
    mode: int
    summary: str


INTEGRATIONS = {
    i.kind: i for i in (
        Integration("sysvinit", "sysvinit.init", PurePosixPath("etc/init.d", SERVICE), 0o755,
                    "an init.d script with an LSB header, started in runlevels 2-5"),
        Integration("openrc", "openrc.init", PurePosixPath("etc/init.d", SERVICE), 0o755,
                    "an openrc-run service in the default runlevel, after localmount"),
        Integration("runit", "runit.run", PurePosixPath("etc/sv", SERVICE, "run"), 0o755,
                    "a runit service that runs once per boot (sv once)"),
        Integration("busybox", "busybox.inittab", PurePosixPath("etc/inittab"), 0o644,
                    "a ::sysinit: line in /etc/inittab, after the other sysinit lines"),
        Integration("systemd", "systemd.service",
                    PurePosixPath("etc/systemd/system", f"{SERVICE}.service"), 0o644,
                    "a oneshot unit wanted by multi-user.target, after local-fs.target"),
    )
}
KINDS = tuple(INTEGRATIONS)

# Where runit looks for enabled services, by distribution (the first that exists is used).
RUNIT_SERVICE_DIRS = ("etc/runit/runsvdir/default", "etc/service", "var/service")
SYSV_RUNLEVELS = ("2", "3", "4", "5")
# busybox init without /etc/inittab behaves as if it held these lines.
BUSYBOX_DEFAULT_INITTAB = """::sysinit:/etc/init.d/rcS
::askfirst:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/sbin/swapoff -a
::shutdown:/bin/umount -a -r
::restart:/sbin/init
"""


def data(kind: str) -> str:
    """The text of an integration's data file."""
    return (resources.files(__package__) / _get(kind).data).read_text()


def _get(kind: str) -> Integration:
    try:
        return INTEGRATIONS[kind]
    except KeyError:
        raise UsageError(f"no integration for init system {kind!r}",
                         hint=f"choose one of: {', '.join(KINDS)}") from None


def _inside(root: Path, link: str, base: PurePosixPath) -> PurePosixPath:
    """A symlink's target as a path relative to `root`, resolved as inside a chroot."""
    parts: list[str] = [] if link.startswith("/") else list(base.parts)
    for part in PurePosixPath(link).parts:
        if part in ("/", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _resolve(root: Path, relative: str) -> PurePosixPath | None:
    """Follow symlinks of `root/relative` without leaving `root`; None if it does not exist."""
    path = PurePosixPath(relative)
    for _ in range(40):
        done = PurePosixPath(".")
        for i, part in enumerate(path.parts):
            here = root / done / part
            if here.is_symlink():
                target = _inside(root, os.readlink(here), done)
                path = target.joinpath(*path.parts[i + 1:])
                break
            if not here.exists():
                return None
            done = done / part
        else:
            return path
    return None


def _exists(root: Path, relative: str) -> bool:
    return _resolve(root, relative) is not None


def detect(root: Path) -> str:
    """The init system of the root filesystem at `root`: one of KINDS."""
    init = _resolve(root, "sbin/init")
    name = init.name if init is not None else ""
    if name == "systemd" or _exists(root, "run/systemd/system"):
        return "systemd"
    if any(_exists(root, p) for p in ("sbin/openrc-run", "usr/sbin/openrc-run",
                                      "sbin/openrc", "usr/sbin/openrc")):
        return "openrc"  # also on busybox init (Alpine): OpenRC runs the services there
    if name in ("runit-init", "runit") or _exists(root, "etc/runit/1"):
        return "runit"
    if name == "busybox":
        return "busybox"
    if init is not None and _exists(root, "etc/inittab") and _exists(root, "etc/init.d"):
        return "sysvinit"
    raise UsageError(f"cannot tell the init system of {root}",
                     hint=f"name it with --init ({', '.join(KINDS)})")


def install(kind: str, root: Path, *, force: bool = False) -> list[Path]:
    """Install the `kind` integration into the root filesystem at `root`; the paths written
    or linked now (none when it was installed already). A different file already in the
    way is refused unless `force`."""
    integration = _get(kind)
    if not root.is_dir():
        raise UsageError(f"root filesystem {root} is not a folder")
    text = data(kind)
    target = root / integration.path
    if kind == "busybox":
        return _install_inittab(target, text.strip())
    written = _write(target, text, integration.mode, force=force)
    if kind == "sysvinit":
        for level in SYSV_RUNLEVELS:
            written += _link(root / f"etc/rc{level}.d/S90{SERVICE}", f"../init.d/{SERVICE}",
                             force=force)
    elif kind == "openrc":
        written += _link(root / "etc/runlevels/default" / SERVICE, f"/etc/init.d/{SERVICE}",
                         force=force)
    elif kind == "runit":
        where = next((d for d in RUNIT_SERVICE_DIRS if _exists(root, d)), RUNIT_SERVICE_DIRS[1])
        resolved = _resolve(root, where) or PurePosixPath(where)
        written += _link(root / resolved / SERVICE, f"/etc/sv/{SERVICE}", force=force)
    elif kind == "systemd":
        written += _link(root / "etc/systemd/system/multi-user.target.wants"
                         / f"{SERVICE}.service", f"../{SERVICE}.service", force=force)
    return written


def remove(kind: str, root: Path) -> list[Path]:
    """Take the `kind` integration out of the root filesystem at `root`: the files and links
    `install` makes, where they are still what it made (anything else is left alone), or
    the inittab line; the paths removed."""
    integration = _get(kind)
    target = root / integration.path
    if kind == "busybox":
        return _remove_inittab_line(target, data(kind).strip())
    links = []
    if kind == "sysvinit":
        links = [(root / f"etc/rc{level}.d/S90{SERVICE}", f"../init.d/{SERVICE}")
                 for level in SYSV_RUNLEVELS]
    elif kind == "openrc":
        links = [(root / "etc/runlevels/default" / SERVICE, f"/etc/init.d/{SERVICE}")]
    elif kind == "runit":
        links = [(root / (_resolve(root, d) or PurePosixPath(d)) / SERVICE, f"/etc/sv/{SERVICE}")
                 for d in RUNIT_SERVICE_DIRS if _exists(root, d)]
    elif kind == "systemd":
        links = [(root / "etc/systemd/system/multi-user.target.wants" / f"{SERVICE}.service",
                  f"../{SERVICE}.service")]
    removed = []
    for path, link in links:
        if path.is_symlink() and os.readlink(path) == link:
            path.unlink()
            removed.append(path)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if target.is_file() and not target.is_symlink() and target.read_text() == data(kind):
            target.unlink()
            removed.append(target)
            if kind == "runit":
                target.parent.rmdir()
    return removed


def _remove_inittab_line(path: Path, line: str) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    kept = [entry for entry in lines if entry.strip() != line]
    if kept == lines:
        return []
    atomic_write(path, ("\n".join(kept) + "\n").encode(), mode=path.stat().st_mode & 0o7777)
    return [path]


def _write(path: Path, text: str, mode: int, *, force: bool) -> list[Path]:
    if path.is_symlink() or path.exists():
        try:
            same = path.is_file() and not path.is_symlink() and path.read_text() == text
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            if path.stat().st_mode & 0o7777 == mode:
                return []
            path.chmod(mode)
            return [path]
        if not force:
            raise PolicyRefusal(f"{path} exists and differs from the abupgrade integration",
                                hint="move it away, or pass --force to replace it")
        if path.is_dir() and not path.is_symlink():
            raise PolicyRefusal(f"{path} is a folder; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode(), mode=mode)
    return [path]


def _link(path: Path, target: str, *, force: bool) -> list[Path]:
    """`path` made a symlink to `target`: [path], or [] when it is one already."""
    if path.is_symlink() and os.readlink(path) == target:
        return []
    if path.is_symlink() or path.exists():
        if not force:
            raise PolicyRefusal(f"{path} exists and is not the abupgrade integration's link",
                                hint="move it away, or pass --force to replace it")
        if path.is_dir() and not path.is_symlink():
            raise PolicyRefusal(f"{path} is a folder; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.abupgrade-tmp")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, path)
    return [path]


def _install_inittab(path: Path, line: str) -> list[Path]:
    """Add the hook line after the last ::sysinit: line (those mount the filesystems)."""
    if path.is_symlink():
        raise PolicyRefusal(f"{path} is a symlink; edit the file it points to")
    try:
        current = path.read_text()
    except FileNotFoundError:
        current = BUSYBOX_DEFAULT_INITTAB
    lines = current.splitlines()
    if line in (entry.strip() for entry in lines):
        return []
    sysinit = [i for i, entry in enumerate(lines) if _action(entry) == "sysinit"]
    at = sysinit[-1] + 1 if sysinit else 0
    lines.insert(at, line)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, ("\n".join(lines) + "\n").encode(), mode=mode)
    return [path]


def _action(entry: str) -> str | None:
    """The action of an inittab line (`id:runlevels:action:process`), None for comments."""
    text = entry.strip()
    if not text or text.startswith("#"):
        return None
    fields = text.split(":", 3)
    return fields[2] if len(fields) == 4 else None
