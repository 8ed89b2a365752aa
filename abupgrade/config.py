"""The TOML configuration, parsed once into frozen dataclasses."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from abupgrade.errors import UsageError
from abupgrade.model import BootloaderKind, Slot

DEFAULT_PATH = Path("/etc/abupgrade/system.toml")
# Where `disk init` puts the configuration, relative to the boot partition's root.
ON_DISK_PATH = Path("abupgrade/system.toml")


@dataclass(frozen=True)
class GrubConfig:
    env: Path = Path("/boot/grub/grubenv")
    tries: int = 3


@dataclass(frozen=True)
class SyslinuxConfig:
    dir: Path = Path("/boot/extlinux")


@dataclass(frozen=True)
class HealthConfig:
    dir: Path = Path("/etc/abupgrade/health.d")
    timeout: float = 60.0
    # The whole boot hook must finish within this many seconds, or the machine reboots.
    deadline: float = 600.0
    watchdog: Path = Path("/dev/watchdog")


@dataclass(frozen=True)
class SystemConfig:
    """What abupgrade reads from the running system; configurable for tests and offline use."""

    cmdline: Path = Path("/proc/cmdline")
    mountinfo: Path = Path("/proc/self/mountinfo")
    boot_id: Path = Path("/proc/sys/kernel/random/boot_id")
    reboot: tuple[str, ...] = ("reboot",)


@dataclass(frozen=True)
class RegistryConfig:
    """How `oci://` references reach their registry."""

    # host[:port] that may be reached over plain HTTP (loopback always may)
    insecure: tuple[str, ...] = ()
    # CA certificate(s), PEM, trusted for registries besides the system's
    ca_file: Path | None = None
    # docker-style config.json with an "auths" table; credentials never go on the command line
    auth_file: Path | None = None


@dataclass(frozen=True)
class Config:
    compatible: str
    bootloader: BootloaderKind
    slots: Mapping[Slot, str]
    keyring: Path = Path("/etc/abupgrade/keys")
    state_dir: Path = Path("/var/lib/abupgrade")
    grub: GrubConfig = field(default_factory=GrubConfig)
    syslinux: SyslinuxConfig = field(default_factory=SyslinuxConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    # Mount point -> device spec of the partitions abupgrade needs besides the slots
    # (boot and data). A running system has them mounted; `--disk` mounts them itself.
    mounts: Mapping[Path, str] = field(default_factory=dict)
    hooks_dir: Path | None = None
    source: Path | None = None
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def rebased(self, mounted: Mapping[Path, Path]) -> Config:
        """The same configuration with paths under a mount point moved to where it is mounted."""

        def move(path: Path) -> Path:
            best: Path | None = None
            for point in mounted:
                if path == point or point in path.parents:
                    if best is None or len(point.parts) > len(best.parts):
                        best = point
            if best is None:
                return path
            return mounted[best] / path.relative_to(best)

        return replace(
            self,
            keyring=move(self.keyring),
            state_dir=move(self.state_dir),
            grub=replace(self.grub, env=move(self.grub.env)),
            syslinux=replace(self.syslinux, dir=move(self.syslinux.dir)),
            health=replace(self.health, dir=move(self.health.dir)),
            hooks_dir=move(self.hooks_dir) if self.hooks_dir else None,
        )


def config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get("ABUPGRADE_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"no configuration at {path}",
            hint="pass --config FILE, set ABUPGRADE_CONFIG, or use --disk on a disk made by `disk init`",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read configuration {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"configuration {path} is not valid TOML: {exc}") from None
    return parse(raw, source=path)


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise UsageError(f"configuration: [{name}] must be a table")
    return value


def _get(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None:
        raise UsageError(f"configuration: {where}{key} is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UsageError(f"configuration: {where}{key} must be a {kind.__name__}")
    return value


_KNOWN = {
    "": {"compatible", "bootloader", "keyring", "state_dir", "slots", "grub", "syslinux",
         "health", "system", "mounts", "hooks_dir", "registry"},
    "grub": {"env", "tries"},
    "syslinux": {"dir"},
    "health": {"dir", "timeout", "deadline", "watchdog"},
    "system": {"cmdline", "mountinfo", "boot_id", "reboot"},
    "registry": {"insecure", "ca_file", "auth_file"},
}


def parse(raw: Mapping[str, Any], *, source: Path | None = None) -> Config:
    for section, known in _KNOWN.items():
        table: Mapping[str, Any] = raw if not section else _section(raw, section)
        unknown = sorted(set(table) - known)
        if unknown:
            where = f"[{section}] " if section else ""
            raise UsageError(f"configuration: unknown key {where}{unknown[0]!r}",
                             hint=f"known keys: {', '.join(sorted(known))}")

    kind_text = _get(raw, "bootloader", str, "")
    try:
        kind = BootloaderKind(kind_text)
    except ValueError:
        raise UsageError(f"configuration: bootloader {kind_text!r} is not supported",
                         hint="use \"grub\" or \"syslinux\"") from None

    slots_raw = _section(raw, "slots")
    slots: dict[Slot, str] = {}
    for slot in Slot:
        slot_table = slots_raw.get(slot.value)
        if not isinstance(slot_table, Mapping):
            raise UsageError(f"configuration: [slots.{slot}] is required")
        slots[slot] = _get(slot_table, "device", str, f"[slots.{slot}] ")
    extra = sorted(set(slots_raw) - {s.value for s in Slot})
    if extra:
        raise UsageError(f"configuration: unknown slot {extra[0]!r}", hint="slots are A and B")

    grub_raw = _section(raw, "grub")
    tries = _get(grub_raw, "tries", int, "[grub] ", 3)
    if not 1 <= tries <= 9:
        raise UsageError("configuration: [grub] tries must be between 1 and 9")
    health_raw = _section(raw, "health")
    system_raw = _section(raw, "system")
    reboot = system_raw.get("reboot", ["reboot"])
    if isinstance(reboot, str):
        reboot = [reboot]
    if not isinstance(reboot, list) or not reboot or not all(isinstance(a, str) for a in reboot):
        raise UsageError("configuration: [system] reboot must be a command as a list of strings")
    mounts_raw = _section(raw, "mounts")
    mounts = {Path(_absolute(point, "[mounts]")): _get(mounts_raw, point, str, "[mounts] ")
              for point in mounts_raw}

    def path(table: Mapping[str, Any], key: str, where: str, default: Path) -> Path:
        return Path(_absolute(_get(table, key, str, where, str(default)), where + key))

    timeout = _get(health_raw, "timeout", float, "[health] ", 60.0)
    deadline = _get(health_raw, "deadline", float, "[health] ", 600.0)
    if timeout <= 0 or deadline <= 0:
        raise UsageError("configuration: [health] timeout and deadline must be positive")
    hooks = raw.get("hooks_dir")
    return Config(
        compatible=_get(raw, "compatible", str, ""),
        bootloader=kind,
        slots=slots,
        keyring=path(raw, "keyring", "", Config.keyring),
        state_dir=path(raw, "state_dir", "", Config.state_dir),
        grub=GrubConfig(env=path(grub_raw, "env", "[grub] ", GrubConfig.env), tries=tries),
        syslinux=SyslinuxConfig(dir=path(_section(raw, "syslinux"), "dir", "[syslinux] ",
                                         SyslinuxConfig.dir)),
        health=HealthConfig(
            dir=path(health_raw, "dir", "[health] ", HealthConfig.dir),
            timeout=timeout,
            deadline=deadline,
            watchdog=path(health_raw, "watchdog", "[health] ", HealthConfig.watchdog),
        ),
        system=SystemConfig(
            cmdline=path(system_raw, "cmdline", "[system] ", SystemConfig.cmdline),
            mountinfo=path(system_raw, "mountinfo", "[system] ", SystemConfig.mountinfo),
            boot_id=path(system_raw, "boot_id", "[system] ", SystemConfig.boot_id),
            reboot=tuple(reboot),
        ),
        mounts=mounts,
        hooks_dir=Path(_absolute(hooks, "hooks_dir")) if isinstance(hooks, str) else None,
        source=source,
        registry=_registry(_section(raw, "registry")),
    )


def _registry(table: Mapping[str, Any]) -> RegistryConfig:
    insecure = table.get("insecure", [])
    if not isinstance(insecure, list) or not all(isinstance(h, str) and h for h in insecure):
        raise UsageError('configuration: [registry] insecure must be a list of "host[:port]" strings')
    files = {key: Path(_absolute(_get(table, key, str, "[registry] "), f"[registry] {key}"))
             for key in ("ca_file", "auth_file") if key in table}
    return RegistryConfig(insecure=tuple(insecure), **files)


def _absolute(text: str, where: str) -> str:
    if not text.startswith("/"):
        raise UsageError(f"configuration: {where} must be an absolute path, not {text!r}")
    return text


def render(config: Config) -> str:
    """TOML text for a configuration (used by `disk init`)."""
    lines = [
        f'compatible = "{config.compatible}"',
        f'bootloader = "{config.bootloader}"',
        f'keyring = "{config.keyring}"',
        f'state_dir = "{config.state_dir}"',
    ]
    if config.hooks_dir:
        lines.append(f'hooks_dir = "{config.hooks_dir}"')
    for slot, device in config.slots.items():
        lines += ["", f"[slots.{slot}]", f'device = "{device}"']
    lines += ["", "[mounts]"] + [f'"{point}" = "{dev}"' for point, dev in config.mounts.items()]
    lines += ["", "[grub]", f'env = "{config.grub.env}"', f"tries = {config.grub.tries}"]
    lines += ["", "[syslinux]", f'dir = "{config.syslinux.dir}"']
    lines += ["", "[health]", f'dir = "{config.health.dir}"', f"timeout = {config.health.timeout:g}",
              f"deadline = {config.health.deadline:g}"]
    reboot = ", ".join(f'"{arg}"' for arg in config.system.reboot)
    lines += ["", "[system]", f"reboot = [{reboot}]"]
    for key in ("cmdline", "mountinfo", "boot_id"):
        value = getattr(config.system, key)
        if value != getattr(SystemConfig, key):
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"
