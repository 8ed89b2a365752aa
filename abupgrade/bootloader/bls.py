"""What systemd-boot (v252, Debian bookworm's `systemd-boot-efi`) boots, from the files it reads.

A model of the loader's choice, written from its source (src/boot/efi/boot.c,
src/fundamental/string-util-fundamental.c) and checked against the real loader under OVMF.
The backend uses it to report what the next boot does; the power-cut sweep uses it to
decide what the loader would boot from the bytes of a FAT image. Pure: no I/O.

Boot Loader Specification type 1 entries are the `*.conf` files of `\\loader\\entries`
(names starting with `auto-` or `.` are skipped). An entry counts only if it has a
`linux` (or `efi`) line and that file exists; a missing initrd is found only when the
entry is started, and then the loader stops in its menu (no timeout after a failed start).

Boot counting lives in the file name: `NAME+LEFT[-DONE].conf`, the last `+` of the name,
digits, optionally `-` and digits, then exactly `.conf` (any case). Before it starts an
entry, the loader renames it `NAME+(LEFT-1)-(DONE+1).conf` (never below 0); an entry with
LEFT 0 keeps being usable but sorts after every other one. A rename onto an existing name
fails and the loader boots the entry anyway, uncounted.

Order (`config_entry_compare`, a stable insertion sort over the folder's order):
1. entries with no tries left last;
2. entries with a `sort-key` before those without; among them by sort-key (byte order),
   then machine-id, then `version` *descending* (newest first, `strverscmp_improved`);
3. then by file name (the id, lower-cased) descending, same comparison;
4. with the same id (two folders), more tries left first, then fewer tries done.
The loader then boots: the entry the EFI variable LoaderEntryOneShot names (deleted once
read), else the first entry matching LoaderEntryDefault (a glob), else the first matching
loader.conf `default`, else the first entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cmp_to_key
from typing import Any

ENTRIES_DIR = "loader/entries"
LOADER_CONF_PATH = "loader/loader.conf"
SUFFIX = ".conf"


# ---------------------------------------------------------------- systemd's comparisons


def _cmp(a: Any, b: Any) -> int:
    return int((a > b) - (a < b))


def _valid(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "~-^.")


def strverscmp_improved(a: str | None, b: str | None) -> int:
    """systemd's version comparison: -1, 0 or 1 as `a` is older, the same or newer than `b`.

    Numeric and alphabetic segments; `~` marks the oldest (pre-releases), then `-`, `^`,
    `.`; characters other than ASCII letters, digits and `~-^.` only separate segments.
    """
    x, y = a or "", b or ""
    i = j = 0
    while True:
        while i < len(x) and not _valid(x[i]):
            i += 1
        while j < len(y) and not _valid(y[j]):
            j += 1
        r, i, j = _marks(x, i, y, j, "~")
        if r:
            return r
        if i >= len(x) or j >= len(y):  # the longer is newer (after the `~` check)
            return _cmp(x[i:i + 1], y[j:j + 1])
        r, i, j = _marks(x, i, y, j, "-^.")
        if r:
            return r
        ca, cb = x[i:i + 1], y[j:j + 1]  # "" at the end
        if _isdigit(ca) or _isdigit(cb):
            ea, eb = _span(x, i, _isdigit), _span(y, j, _isdigit)
            r = _cmp(ea != i, eb != j)  # a number is newer than no number
            if r:
                return r
            na, nb = x[i:ea].lstrip("0"), y[j:eb].lstrip("0")
            r = _cmp(len(na), len(nb)) or _cmp(na, nb)
        else:
            ea, eb = _span(x, i, _isalpha), _span(y, j, _isalpha)
            n = min(ea - i, eb - j)
            # strncmp over the shorter length: a NUL or the next character ends it
            r = _cmp(x[i:i + n], y[j:j + n]) or _cmp(ea - i, eb - j)
        if r:
            return r
        i, j = ea, eb


def _marks(x: str, i: int, y: str, j: int, marks: str) -> tuple[int, int, int]:
    """Each of `marks` in turn, once: where one string has it and the other does not, the
    one without is newer (r); where both have it, both move past it."""
    for mark in marks:
        ca, cb = x[i:i + 1], y[j:j + 1]
        if ca == mark or cb == mark:
            r = _cmp(ca != mark, cb != mark)
            if r:
                return r, i, j
            i, j = i + 1, j + 1
    return 0, i, j


def _isdigit(c: str) -> bool:
    return c != "" and c in "0123456789"


def _isalpha(c: str) -> bool:
    return c != "" and c.isascii() and c.isalpha()


def _span(s: str, start: int, pred: Callable[[str], bool]) -> int:
    end = start
    while end < len(s) and pred(s[end]):
        end += 1
    return end


def efi_fnmatch(pattern: str, name: str) -> bool:
    """The loader's glob, as `efi_fnmatch`: `*`, `?`, `\\` escapes and `[...]` sets with
    ranges (`]` first is a member; no negation)."""
    return _match(pattern, 0, name, 0)


def _match(p: str, pi: int, h: str, hi: int) -> bool:
    while pi < len(p):
        c = p[pi]
        if c == "*":
            while pi < len(p) and p[pi] == "*":
                pi += 1
            return any(_match(p, pi, h, k) for k in range(hi, len(h) + 1))
        if hi >= len(h):
            return False
        if c == "\\":
            pi += 1
            if pi >= len(p) or p[pi] != h[hi]:
                return False
        elif c == "[":
            end = _set_end(p, pi, h[hi])
            if end is None:
                return False
            pi = end
        elif c != "?" and c != h[hi]:
            return False
        pi, hi = pi + 1, hi + 1
    return hi == len(h)


def _set_end(p: str, pi: int, char: str) -> int | None:
    """For the set opening at `p[pi]`: the index of its `]` when `char` is a member, else
    None (also for an unterminated set)."""
    first, can_range, match = True, True, False
    while True:
        pi += 1
        if pi >= len(p):
            return None
        c = p[pi]
        if c == "\\":
            pi += 1
            if pi >= len(p):
                return None
            match = match or p[pi] == char
            can_range = True
        elif c == "]" and not first:
            return pi if match else None
        elif c == "-" and can_range and not first and p[pi + 1:pi + 2] != "]":
            low = p[pi - 1]
            pi += 1
            if p[pi:pi + 1] == "\\":
                pi += 1
            if pi >= len(p):
                return None
            match = match or low <= char <= p[pi]
            can_range = False
        else:
            match = match or c == char
            can_range = True
        first = False


# ---------------------------------------------------------------- entries


@dataclass(frozen=True)
class Counter:
    """The boot counter of a file name `PREFIX+LEFT[-DONE].conf`."""

    prefix: str  # everything before the last "+"
    left: int
    done: int

    def name(self) -> str:
        return f"{self.prefix}+{self.left}-{self.done}{SUFFIX}"

    def bumped(self) -> Counter:
        """What the loader renames the entry to before it boots it."""
        return replace(self, left=max(self.left - 1, 0), done=self.done + 1)


_INT_MAX = 2**31 - 1


def parse_counter(name: str) -> Counter | None:
    """The counter in a file name, None when it has none (or not one the loader reads)."""
    plus = name.rfind("+")
    if plus < 0:
        return None
    m = re.match(r"(\d+)(?:-(\d+))?", name[plus + 1:])
    if m is None or name[plus + 1 + m.end():].lower() != SUFFIX:
        return None
    left, done = int(m[1]), int(m[2] or 0)
    if left > _INT_MAX or done > _INT_MAX:
        return None
    return Counter(name[:plus], left, done)


@dataclass(frozen=True)
class Entry:
    """A type 1 entry as the loader reads it."""

    name: str  # the file name in loader/entries
    title: str | None = None
    sort_key: str | None = None
    version: str | None = None
    machine_id: str | None = None
    linux: str | None = None  # the `linux` or `efi` path, "/"-separated, no leading "/"
    initrds: tuple[str, ...] = ()
    options: str | None = None
    counter: Counter | None = None

    @property
    def id(self) -> str:
        return self.name.lower()

    @property
    def tries_left(self) -> int:
        """-1 when the entry does not count boots."""
        return self.counter.left if self.counter else -1

    @property
    def tries_done(self) -> int:
        return self.counter.done if self.counter else -1

    @classmethod
    def parse(cls, name: str, content: bytes) -> Entry | None:
        """The entry as `config_entry_add_type1` reads it; None when the loader drops it
        (no `linux`/`efi` line, or another architecture)."""
        fields: dict[str, str | None] = {}
        initrds: list[str] = []
        options: list[str] = []
        linux: str | None = None
        for key, value in _key_values(content):
            if key in ("title", "sort-key", "version", "machine-id"):
                fields[key] = value
            elif key in ("linux", "efi"):
                linux = _path(value)
            elif key == "architecture":
                if value.lower() != "x64":
                    return None
            elif key == "initrd":
                initrds.append(_path(value))
            elif key == "options":
                options.append(value)
        if linux is None:
            return None
        return cls(name=name, title=fields.get("title"), sort_key=fields.get("sort-key"),
                   version=fields.get("version"), machine_id=fields.get("machine-id"),
                   linux=linux, initrds=tuple(initrds),
                   options=" ".join(options) if options else None, counter=parse_counter(name))

    def with_name(self, name: str) -> Entry:
        return replace(self, name=name, counter=parse_counter(name))


def _key_values(content: bytes) -> Iterable[tuple[str, str]]:
    """`line_get_key_value`: lines split at CR/LF, blanks and `#` lines skipped, key and
    value split at the first run of spaces or tabs, one pair of quotes removed."""
    text = content.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    for raw in re.split(r"[\r\n]", text):
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([^ \t]+)[ \t]+(.*)", line)
        if m is None:
            continue
        key, value = m[1], m[2]
        if value.startswith('"') and line.endswith('"'):
            value = value[1:-1]
        yield key, value


def _path(value: str) -> str:
    return "/".join(p for p in value.replace("\\", "/").split("/") if p)


@dataclass(frozen=True)
class LoaderConf:
    default: str | None = None  # a glob over entry ids
    timeout: int | None = None

    @classmethod
    def parse(cls, content: bytes | None) -> LoaderConf:
        default: str | None = None
        timeout: int | None = None
        for key, value in _key_values(content or b""):
            if key == "default" and not (value.startswith("@") and value.lower() != "@saved"):
                default = value
            elif key == "timeout" and value.isdigit():
                timeout = int(value)
        return cls(default=default, timeout=timeout)


@dataclass(frozen=True)
class EfiVars:
    """The loader's EFI variables that change its choice (None: not set)."""

    entry_default: str | None = None  # LoaderEntryDefault
    entry_oneshot: str | None = None  # LoaderEntryOneShot


# ---------------------------------------------------------------- the choice


def compare(a: Entry, b: Entry) -> int:
    """`config_entry_compare`: < 0 when `a` sorts before `b`."""
    r = _cmp(a.tries_left == 0, b.tries_left == 0)
    if r:
        return r
    r = _cmp(a.sort_key is None, b.sort_key is None)
    if r:
        return r
    if a.sort_key is not None and b.sort_key is not None:
        r = (_cmp(a.sort_key, b.sort_key)
             or _cmp(a.machine_id or "", b.machine_id or "")
             or -strverscmp_improved(a.version, b.version))
        if r:
            return r
    r = -strverscmp_improved(a.id, b.id)
    if r:
        return r
    if a.tries_left < 0 or b.tries_left < 0:
        return 0
    return -_cmp(a.tries_left, b.tries_left) or _cmp(a.tries_done, b.tries_done)


def sort_entries(entries: Sequence[Entry]) -> list[Entry]:
    """The loader's order (its insertion sort is stable; `sorted` is too)."""
    return sorted(entries, key=cmp_to_key(compare))


def choose(entries: Sequence[Entry], conf: LoaderConf = LoaderConf(),
           efivars: EfiVars = EfiVars()) -> Entry | None:
    """The entry the loader starts with no key pressed; None when there is none (it then
    shows its menu and waits)."""
    ordered = sort_entries(entries)
    for pattern in (efivars.entry_oneshot, efivars.entry_default, conf.default):
        if pattern is None or pattern.lower() == "@saved":
            continue
        for entry in ordered:
            if efi_fnmatch(pattern.lower(), entry.id):
                return entry
    return ordered[0] if ordered else None


def load_entries(files: Mapping[str, bytes], exists: Callable[[str], bool]) -> list[Entry]:
    """The entries the loader keeps from `files` (name -> content of loader/entries), in
    no particular order: `*.conf`, not `auto-*` or dot names, with a `linux`/`efi` line
    naming a file that `exists` (a path from the filesystem's root)."""
    found = []
    for name, content in files.items():
        if (not name.lower().endswith(SUFFIX) or name.startswith(".")
                or name.startswith("auto-")):
            continue
        entry = Entry.parse(name, content)
        if entry is not None and entry.linux is not None and exists(entry.linux):
            found.append(entry)
    return found
