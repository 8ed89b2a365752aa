"""config.py: TOML in, frozen dataclasses out; every mistake a one-line exit-2 error."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from abupgrade import config
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.grub import GrubConfig
from abupgrade.bootloader.syslinux import SyslinuxConfig
from abupgrade.errors import UsageError
from abupgrade.model import Slot

GOOD: dict[str, Any] = {
    "compatible": "acme-box",
    "bootloader": "grub",
    "slots": {"A": {"device": "PARTLABEL=rootfs_a"}, "B": {"device": "PARTLABEL=rootfs_b"}},
    "mounts": {"/boot": "PARTLABEL=boot"},
    "grub": {"tries": 5},
    "health": {"timeout": 7},
    "system": {"reboot": ["reboot", "-f"]},
}


def test_parse_defaults_and_values() -> None:
    cfg = config.parse(GOOD)
    assert cfg.bootloader is BootloaderKind.GRUB
    assert cfg.slots[Slot.B] == "PARTLABEL=rootfs_b"
    grub = cfg.section(GrubConfig)
    assert grub.tries == 5 and grub.env == Path("/boot/grub/grubenv")
    assert cfg.health.timeout == 7.0 and cfg.system.reboot == ("reboot", "-f")
    assert cfg.state_dir == Path("/var/lib/abupgrade")


def test_render_round_trips() -> None:
    cfg = config.parse(GOOD)
    assert config.parse(tomllib.loads(config.render(cfg))) == cfg


def test_render_escapes_and_keeps_every_table() -> None:
    odd = 'box "7" \\ tab\t newline\n del\x7f ünï'
    raw: dict[str, Any] = {
        **GOOD,
        "compatible": odd,
        "hooks_dir": "/etc/abupgrade/hooks",
        "mounts": {"/boot": 'LABEL=my "boot"', "/mnt/with space": "PARTUUID=x"},
        "syslinux": {"dir": "/boot/ext linux"},
        "health": {"timeout": 0.25, "deadline": 300, "watchdog": "/dev/watchdog1"},
        "system": {"reboot": ["systemctl", "reboot", "--message=\"abupgrade\""],
                   "cmdline": "/tmp/cmdline"},
        "registry": {"insecure": ["localhost:5000"], "ca_file": "/etc/ssl/registry.pem",
                     "auth_file": "/root/.docker/config.json"},
    }
    cfg = config.parse(raw)
    text = config.render(cfg)
    assert config.parse(tomllib.loads(text)) == cfg
    again = tomllib.loads(text)
    assert again["compatible"] == odd and again["health"]["watchdog"] == "/dev/watchdog1"
    assert again["registry"]["insecure"] == ["localhost:5000"]
    assert again["syslinux"] == {"dir": "/boot/ext linux"}  # a table given is kept


def test_bootloader_tables_belong_to_their_backend() -> None:
    cfg = config.parse(GOOD)
    assert list(cfg.bootloaders) == [BootloaderKind.GRUB]  # only what was given
    assert cfg.settings == GrubConfig(tries=5)
    syslinux = config.parse({**GOOD, "bootloader": "syslinux"})
    assert syslinux.settings == SyslinuxConfig() and syslinux.section(GrubConfig).tries == 5
    with pytest.raises(UsageError, match=r"unknown key \[syslinux\] 'tries'"):
        config.parse({**GOOD, "syslinux": {"tries": 3}})
    with pytest.raises(UsageError, match="unknown key 'lilo'"):
        config.parse({**GOOD, "lilo": {"env": []}})
    with pytest.raises(UsageError, match=r"^configuration: \[uboot\] env has 0 line"):
        config.parse({**GOOD, "uboot": {"env": []}})
    with pytest.raises(UsageError) as caught:
        config.parse({**GOOD, "bootloader": "lilo"})
    assert caught.value.hint == "use " + " or ".join(f'"{k}"' for k in BootloaderKind)


def test_rebased_moves_paths_under_mounts_only() -> None:
    cfg = config.parse(GOOD)
    moved = cfg.rebased({Path("/boot"): Path("/tmp/m/boot")})
    assert moved.section(GrubConfig).env == Path("/tmp/m/boot/grub/grubenv")
    assert moved.state_dir == cfg.state_dir  # not under /boot


@pytest.mark.parametrize("change, message", [
    ({"bootloader": "lilo"}, "not supported"),
    ({"compatible": 3}, "compatible must be a string, not 3"),
    ({"slots": {"A": {"device": "x"}}}, "[slots.B] is required"),
    ({"slots": {"A": {"device": "x"}, "C": {"device": "z"}}}, "unknown slot [slots] 'C'"),
    ({"slots": {"A": {"device": "x"}, "B": {"device": "y"}, "C": {"device": "z"}}}, "unknown slot"),
    ({"grub": {"tries": 0}}, "between 1 and 9"),
    ({"grub": {"tries": True}}, "[grub] tries must be a whole number, not true"),
    ({"grub": {"tries": "3"}}, '[grub] tries must be a whole number, not "3"'),
    ({"hooks_dir": 5}, "hooks_dir must be a string, not 5"),
    ({"keyring": "relative/keys"}, "absolute path"),
    ({"colour": "blue"}, "unknown key"),
    ({"health": {"timeout": -1}}, "positive"),
    ({"system": {"reboot": []}}, "reboot must be a command"),
    ({"system": {"reboot": [1]}}, "reboot must be a command"),
    ({"registry": {"insecure": [""]}}, 'insecure must be a list of "host[:port]"'),
    ({"health": {"watchdog": "dev/watchdog"}}, "[health] watchdog must be an absolute path"),
    ({"grub": {"env": 3}}, "[grub] env must be a string, not 3"),
])
def test_bad_values_are_usage_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        config.parse({**GOOD, **change})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("where", ["", "slots.A", "slots.B", "health", "system", "registry",
                                   *(str(kind) for kind in BootloaderKind)])
def test_unknown_keys_are_refused_in_every_table(where: str) -> None:
    """A misspelt key anywhere is an error that names it and the keys that table knows."""
    raw: dict[str, Any] = json.loads(json.dumps(GOOD))
    table = raw
    for part in where.split(".") if where else []:
        table = table.setdefault(part, {})
    known = set(table) | ({"device"} if where.startswith("slots.") else set())
    table["colour"] = "blue"
    with pytest.raises(UsageError) as caught:
        config.parse(raw)
    assert f"unknown key {f'[{where}] ' if where else ''}'colour'" in caught.value.message
    assert caught.value.hint is not None and caught.value.hint.startswith("known keys: ")
    named = set(caught.value.hint.removeprefix("known keys: ").split(", "))
    assert known <= named and "colour" not in named


def test_load_reports_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no configuration"):
        config.load(tmp_path / "none.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("compatible = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        config.load(broken)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ABUPGRADE_CONFIG", raising=False)
    assert config.config_path(None) == config.DEFAULT_PATH
    monkeypatch.setenv("ABUPGRADE_CONFIG", str(tmp_path / "env.toml"))
    assert config.config_path(None) == tmp_path / "env.toml"
    assert config.config_path(tmp_path / "x.toml") == tmp_path / "x.toml"
