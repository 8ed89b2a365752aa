"""TOML tables as frozen dataclasses: each field is a key, its annotation says what it holds.

A section of the configuration (`[health]`, `[grub]`, ...) is a frozen dataclass that derives
from `Table`. Its fields may be `str`, `str | None`, `int`, `float`, `bool`, `Path` (absolute),
`Path | None` or `tuple[str, ...]` (a TOML list of strings), each with a default. `Table` reads
a section (refusing unknown keys and wrong types with one-line exit-2 errors), renders it back
as TOML and moves its paths under mount points. Range checks go in `check`.

Field metadata may say how to word a type error (`what`: "a command as a list of strings")
and whether a bare string stands for a one-element list (`single`); for `--disk`, that a
string is a device spec to resolve on that disk (`device`) and that a field describes the
running machine and means nothing there (`host`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from abupgrade.errors import UsageError


def error(where: str, what: str) -> UsageError:
    """A configuration error; `where` is the section prefix ("[grub] ", "" at the top)."""
    return UsageError(f"configuration: {where}{what}")


def section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The table `[name]` of `raw` (empty when absent)."""
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise error("", f"[{name}] must be a table")
    return value


def refuse_unknown(table: Mapping[str, Any], known: set[str], where: str, *,
                   what: str = "key") -> None:
    """Refuse a key of `table` that is not `known`, naming the known ones."""
    unknown = sorted(set(table) - known)
    if unknown:
        raise UsageError(f"configuration: unknown {what} {where}{unknown[0]!r}",
                         hint=f"known {what}s: {', '.join(sorted(known))}")


def value(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    """`table[key]` as `kind` (an int is a float too; a bool is only a bool); `default` when
    absent, and when that is None too the key is required."""
    found = table.get(key, default)
    if found is None:
        raise error(where, f"{key} is required")
    if kind is float and isinstance(found, int) and not isinstance(found, bool):
        found = float(found)
    if not isinstance(found, kind) or isinstance(found, bool) and kind is not bool:
        raise error(where, f"{key} must be {KINDS.get(kind, kind.__name__)}, not {shown(found)}")
    return found


def shown(item: object) -> str:
    """A value as the TOML file spells it, for messages."""
    try:
        return toml_value(item)
    except TypeError:
        return "a table" if isinstance(item, Mapping) else repr(item)


# How a type error names what a key must hold.
KINDS: dict[type, str] = {str: "a string", int: "a whole number", float: "a number",
                          bool: "true or false"}


def absolute(text: str, where: str) -> Path:
    if not text.startswith("/"):
        raise error("", f"{where} must be an absolute path, not {text!r}")
    return Path(text)


def toml_value(item: object) -> str:
    """`item` as a TOML value: strings (and paths) quoted and escaped, lists of them."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        return repr(item)
    if isinstance(item, str | Path):
        # JSON's string escapes are TOML's, but for DEL, which TOML wants escaped too.
        return json.dumps(str(item), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(item, tuple | list):
        return "[" + ", ".join(toml_value(i) for i in item) + "]"
    raise TypeError(f"no TOML form for {item!r}")


class Table:
    """Mixin for frozen dataclasses read from one TOML table (see the module docstring)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def from_toml(cls, table: Mapping[str, Any], where: str) -> Self:
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        refuse_unknown(table, {f.name for f in fields}, where)
        values = {f.name: _read(table, f, hints[f.name], where) for f in fields if f.name in table}
        made = cls(**values)
        made.check(where)
        return made

    def check(self, where: str) -> None:
        """Refuse values of the right type that cannot work (override for ranges)."""

    def invalid(self, key: str, where: str) -> UsageError:
        """The error for a key of this table whose value is wrong."""
        field = self.__dataclass_fields__[key]
        return error(where, f"{key} must be {field.metadata.get('what', 'valid')}")

    def to_toml(self) -> Iterator[tuple[str, object]]:
        """(key, value) of every field that is set, in field order."""
        for field in dataclasses.fields(self):
            item = getattr(self, field.name)
            if item is not None:
                yield field.name, item

    def rebased(self, move: Callable[[Path], Path]) -> Self:
        """The same table with `move` applied to every path."""
        changes = {f.name: move(getattr(self, f.name))
                   for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), Path)}
        return dataclasses.replace(self, **changes)

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        """The same table for a disk serviced from outside (`--disk`): the device specs it
        holds resolved by `resolve` (on that disk) and the fields of the running machine
        cleared - by field metadata `device` and `host` (a table with device specs inside
        other values overrides this); a table without either returns itself."""
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("device"):
                changes[f.name] = resolve(getattr(self, f.name))
            elif f.metadata.get("host"):
                changes[f.name] = None
        return dataclasses.replace(self, **changes) if changes else self


def _read(table: Mapping[str, Any], field: dataclasses.Field[Any], hint: Any, where: str) -> Any:
    key, found = field.name, table[field.name]
    if hint in (Path, Path | None):
        return absolute(value(table, key, str, where), where + key)
    if hint == str | None:
        return value(table, key, str, where)
    if typing.get_origin(hint) is tuple:
        if isinstance(found, str) and field.metadata.get("single"):
            found = [found]
        if not isinstance(found, list) or not all(isinstance(i, str) for i in found):
            what = field.metadata.get("what", "a list of strings")
            raise error(where, f"{key} must be {what}")
        return tuple(found)
    return value(table, key, hint, where)
