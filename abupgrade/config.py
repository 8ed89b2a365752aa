"""The TOML configuration, parsed once into frozen dataclasses.

Each bootloader backend owns its `[<bootloader>]` table (its settings, see bootloader/);
the configuration holds the tables given and always the configured bootloader's.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from abupgrade import mounts, trust
from abupgrade.bootloader import BootloaderKind, backend_class
from abupgrade.bootloader.base import BOOT_POINT
from abupgrade.errors import UsageError
from abupgrade.image.manifest import is_version
from abupgrade.model import Slot
from abupgrade.mounts import MOUNTINFO
from abupgrade.schema import Table, absolute, error, refuse_unknown, section, toml_value, value

T = TypeVar("T", bound=Table)

DEFAULT_PATH = Path("/etc/abupgrade/system.toml")
# Where `disk init` and `adopt` put the configuration, relative to the boot partition's root:
# shared by both slots, so a slot whose image carries no configuration still finds it.
ON_DISK_PATH = Path("abupgrade/system.toml")
# Where the running system looks when neither --config nor $ABUPGRADE_CONFIG says.
SEARCH_PATH = (DEFAULT_PATH, BOOT_POINT / ON_DISK_PATH)


@dataclass(frozen=True)
class HealthConfig(Table):
    """[health]: the checks, their time limits and the watchdog."""

    dir: Path = Path("/etc/abupgrade/health.d")
    timeout: float = 60.0  # seconds per check
    # The whole boot hook must finish within this many seconds, or the machine reboots.
    deadline: float = 600.0
    watchdog: Path = Path("/dev/watchdog")

    def check(self, where: str) -> None:
        if self.timeout <= 0 or self.deadline <= 0:
            raise error(where, "timeout and deadline must be positive")


@dataclass(frozen=True)
class SystemConfig(Table):
    """What abupgrade reads from the running system; configurable for tests and offline use."""

    cmdline: Path = Path("/proc/cmdline")
    mountinfo: Path = MOUNTINFO
    boot_id: Path = Path("/proc/sys/kernel/random/boot_id")
    reboot: tuple[str, ...] = field(default=("reboot",), metadata={
        "what": "a command as a list of strings", "single": True})

    def check(self, where: str) -> None:
        if not self.reboot:
            raise self.invalid("reboot", where)


@dataclass(frozen=True)
class RegistryConfig(Table):
    """How `oci://` references reach their registry."""

    # host[:port] that may be reached over plain HTTP (loopback always may)
    insecure: tuple[str, ...] = field(default=(), metadata={
        "what": 'a list of "host[:port]" strings'})
    # CA certificate(s), PEM, trusted for registries besides the system's
    ca_file: Path | None = None
    # docker-style config.json with an "auths" table; credentials never go on the command line
    auth_file: Path | None = None

    def check(self, where: str) -> None:
        if not all(self.insecure):
            raise self.invalid("insecure", where)


@dataclass(frozen=True)
class SecurityConfig(Table):
    """The security floor: no image older than `min_version` is accepted, whatever the flags.
    Images raise the machine's floor above it when committed (kept in state_dir)."""

    min_version: str | None = field(default=None, metadata={"what": 'a version such as "2.0"'})

    def check(self, where: str) -> None:
        if self.min_version is not None and not is_version(self.min_version):
            raise self.invalid("min_version", where)


@dataclass(frozen=True)
class Config:
    """The whole configuration file, checked."""

    compatible: str
    bootloader: BootloaderKind
    slots: Mapping[Slot, str]
    keyring: Path = Path("/etc/abupgrade/keys")
    state_dir: Path = Path("/var/lib/abupgrade")
    # The `[<bootloader>]` tables given, each parsed by its backend; the configured
    # bootloader's is always there once parsed (see `settings`).
    bootloaders: Mapping[BootloaderKind, Table] = field(default_factory=dict)
    health: HealthConfig = field(default_factory=HealthConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    # Mount point -> device spec of the partitions abupgrade needs besides the slots
    # (boot and data). A running system has them mounted; `--disk` mounts them itself.
    mounts: Mapping[Path, str] = field(default_factory=dict)
    hooks_dir: Path | None = None
    source: Path | None = None
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    @property
    def settings(self) -> Table:
        """The configured bootloader's table (its defaults where none was given)."""
        found = self.bootloaders.get(self.bootloader)
        return found if found is not None else backend_class(self.bootloader).settings_type()

    def section(self, kind: type[T]) -> T:
        """The bootloader table of type `kind` (GrubConfig, ...); KeyError when absent."""
        for table in (self.settings, *self.bootloaders.values()):
            if isinstance(table, kind):
                return table
        raise KeyError(kind.__name__)

    def rebased(self, mounted: Mapping[Path, Path]) -> Config:
        """The same configuration with paths under a mount point moved to where it is mounted."""

        def move(path: Path) -> Path:
            return mounts.rebase(path, mounted)

        return replace(
            self,
            keyring=move(self.keyring),
            state_dir=move(self.state_dir),
            bootloaders={kind: table.rebased(move) for kind, table in self.bootloaders.items()},
            health=self.health.rebased(move),
            hooks_dir=move(self.hooks_dir) if self.hooks_dir else None,
        )


def config_path(explicit: Path | None) -> Path:
    """The configuration to read: `explicit` (--config), else $ABUPGRADE_CONFIG, else the
    first of SEARCH_PATH that exists (the first of them when none does)."""
    if explicit is not None:
        return explicit
    env = os.environ.get("ABUPGRADE_CONFIG")
    if env:
        return Path(env)
    return next((path for path in SEARCH_PATH if path.exists()), SEARCH_PATH[0])


def load(path: Path) -> Config:
    """The configuration at `path`, which must pass the strict-mode checks (it names the
    keyring, the checks and what runs as root)."""
    real = trust.check(path, "configuration", trust.Kind.FILE)
    try:
        if real is None:
            raise FileNotFoundError(path)
        raw = tomllib.loads(real.read_text())
    except FileNotFoundError:
        what = (f"no configuration: neither {' nor '.join(map(str, SEARCH_PATH))} exists"
                if path == SEARCH_PATH[0] else f"no configuration at {path}")
        raise UsageError(
            what,
            hint="pass --config FILE, set ABUPGRADE_CONFIG, bring this machine under "
                 "abupgrade with `abupgrade adopt`, or use --disk on a disk made by `disk init`",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read configuration {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"configuration {path} is not valid TOML: {exc}") from None
    return parse(raw, source=path)


_TOP = {"compatible", "bootloader", "keyring", "state_dir", "slots", "health", "system",
        "mounts", "hooks_dir", "registry", "security"}


def parse(raw: Mapping[str, Any], *, source: Path | None = None) -> Config:
    refuse_unknown(raw, _TOP | set(BootloaderKind), "")
    kind_text = value(raw, "bootloader", str, "")
    try:
        kind = BootloaderKind(kind_text)
    except ValueError:
        raise UsageError(f"configuration: bootloader {kind_text!r} is not supported",
                         hint="use " + " or ".join(f'"{k}"' for k in BootloaderKind)) from None

    slots_raw = section(raw, "slots")
    refuse_unknown(slots_raw, {s.value for s in Slot}, "[slots] ", what="slot")
    slots: dict[Slot, str] = {}
    for slot in Slot:
        slot_table = slots_raw.get(slot.value)
        if not isinstance(slot_table, Mapping):
            raise UsageError(f"configuration: [slots.{slot}] is required",
                             hint=f'[slots.{slot}] with device = "PARTLABEL=..." (or PARTUUID=, '
                                  'LABEL=, UUID=, a /dev path)')
        refuse_unknown(slot_table, {"device"}, f"[slots.{slot}] ")
        slots[slot] = value(slot_table, "device", str, f"[slots.{slot}] ")

    bootloaders = {
        each: backend_class(each).settings_type.from_toml(section(raw, each), f"[{each}] ")
        for each in BootloaderKind if each is kind or each in raw
    }
    mounts_raw = section(raw, "mounts")
    hooks = value(raw, "hooks_dir", str, "", "") or None
    return Config(
        compatible=value(raw, "compatible", str, ""),
        bootloader=kind,
        slots=slots,
        keyring=_path(raw, "keyring", Config.keyring),
        state_dir=_path(raw, "state_dir", Config.state_dir),
        bootloaders=bootloaders,
        health=HealthConfig.from_toml(section(raw, "health"), "[health] "),
        system=SystemConfig.from_toml(section(raw, "system"), "[system] "),
        mounts={absolute(point, "[mounts]"): value(mounts_raw, point, str, "[mounts] ")
                for point in mounts_raw},
        hooks_dir=absolute(hooks, "hooks_dir") if hooks else None,
        source=source,
        registry=RegistryConfig.from_toml(section(raw, "registry"), "[registry] "),
        security=SecurityConfig.from_toml(section(raw, "security"), "[security] "),
    )


def _path(raw: Mapping[str, Any], key: str, default: Path) -> Path:
    return absolute(value(raw, key, str, "", str(default)), key)


def render(config: Config) -> str:
    """TOML for a configuration: everything `parse` read, escaped (`disk init` writes it)."""
    top: list[tuple[str, object]] = [
        ("compatible", config.compatible), ("bootloader", config.bootloader),
        ("keyring", config.keyring), ("state_dir", config.state_dir)]
    if config.hooks_dir:
        top.append(("hooks_dir", config.hooks_dir))
    lines = [f"{key} = {toml_value(item)}" for key, item in top]
    for slot, device in config.slots.items():
        lines += ["", f"[slots.{slot}]", f"device = {toml_value(device)}"]
    lines += ["", "[mounts]"]
    lines += [f"{toml_value(point)} = {toml_value(dev)}" for point, dev in config.mounts.items()]
    tables: dict[str, Table] = {str(kind): table for kind, table in config.bootloaders.items()}
    tables.setdefault(str(config.bootloader), config.settings)
    tables |= {"health": config.health, "system": config.system, "registry": config.registry}
    if config.security.min_version is not None:
        tables["security"] = config.security
    for name, table in tables.items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {toml_value(item)}" for key, item in table.to_toml()]
    return "\n".join(lines) + "\n"
