"""Real U-Boot (Debian's qemu_arm64 build) booting a disk made by `abupgrade disk init
--bootloader uboot --arch arm64`, updated from the host with `abupgrade --disk ... apply`:
Debian's arm64 kernel and busybox guests, and boot.scr deciding at every boot.

Boots: v1 on A; a trial that never commits gets exactly TRIES boots, then A; a panicking
trial falls back after TRIES; then, with U-Boot stopped right after its decision, the boot
hook's commit, its rollback on a failing check, mark-good and a manual rollback (the hook
and the commands run on the host as the booted machine, fixtures.machine)."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from abupgrade import config as configuration
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.uboot import UBootConfig
from abupgrade.disk import open_disk
from abupgrade.fsutil import atomic_write
from abupgrade.model import Slot
from fixtures import arm64
from fixtures.guest import GuestUnavailable, guest_lines, require_root
from fixtures.images import KeyPair, keypair
from fixtures.machine import run_cli, running_machine
from fixtures.uboot import boot, machine, script_lines

pytestmark = [pytest.mark.boot, pytest.mark.loop]

TRIES = 2
ONE_BOOT = 60  # seconds: U-Boot, the arm64 kernel and busybox under TCG take about 12


@dataclass(frozen=True)
class World:
    work: Path
    key: KeyPair
    images: dict[str, Path]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    work = tmp_path_factory.mktemp("uboot-arm64")
    try:
        require_root()
        machine("arm64")
        assets = arm64.assets()
        initrd = assets.initramfs(work / "initrd.img")
        key = keypair(work / "keys")
        variants = {"1.0": ("ok", True), "2.0": ("reboot", False), "3.0": ("panic", False),
                    "4.0": ("ok", False), "5.0": ("ok", True), "6.0": ("ok", False)}
        images = {v: assets.signed_image(work / f"{v}.tar", key, version=v, initrd=initrd,
                                         variant=variant, boot_files=files)
                  for v, (variant, files) in variants.items()}
    except GuestUnavailable as exc:
        pytest.skip(str(exc))
    return World(work, key, images)


def cli(*args: str) -> Any:
    proc = run_cli("--json", *args)
    assert proc.returncode == 0, f"abupgrade {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def set_tries(disk: Path, tries: int) -> None:
    with open_disk(disk) as session:
        path = session.boot / configuration.ON_DISK_PATH
        cfg = configuration.parse(tomllib.loads(path.read_text()))
        table = dataclasses.replace(cfg.section(UBootConfig), tries=tries)
        cfg = dataclasses.replace(cfg, bootloaders={BootloaderKind.UBOOT: table})
        atomic_write(path, configuration.render(cfg).encode())


@dataclass
class Run:
    script: list[str]
    guest: list[str]
    log: str

    def tail(self) -> str:
        return "serial log tail:\n" + "\n".join(self.log.splitlines()[-40:])


def run(disk: Path, name: str, *, stop_at: str, boots: int = 1) -> Run:
    log = disk.with_name(f"{name}.log")
    text = boot(disk, log, arch="arm64", timeout=ONE_BOOT * boots, stop_at=stop_at)
    return Run(script_lines(text), guest_lines(text), text)


def decide(disk: Path, name: str) -> list[str]:
    """U-Boot's decision for the next boot (which copy it read left out), stopped before it
    loads a kernel."""
    found = run(disk, name, stop_at=r"abupgrade-uboot: boot slot=\S+ fallback=\S+ copy=\S+")
    lines = [re.sub(r" copy=\S+$", "", line) for line in found.script]
    chosen = next(n for n, line in enumerate(lines) if line.startswith("boot slot="))
    return lines[:chosen + 1]


def test_the_whole_story_on_u_boot_arm64(world: World) -> None:
    disk = world.work / "disk.img"
    cli("disk", "init", str(disk), "--bootloader", "uboot", "--arch", "arm64",
        "--size", "800M", "--slot-size", "96M", "--image", str(world.images["1.0"]),
        "--pubkey", str(world.key.public))
    set_tries(disk, TRIES)

    # v1 on A, its kernel from the boot partition.
    first = run(disk, "v1", stop_at="ABUPGRADE-GUEST poweroff")
    assert first.script[1].startswith("boot slot=A fallback=none "), first.tail()
    assert first.guest[0] == "slot=A tag=1.0-ok root=/dev/vda3", first.tail()

    # A trial that boots fine but is never committed: exactly TRIES boots, then A.
    assert cli("--disk", str(disk), "apply", str(world.images["2.0"]))["tries"] == TRIES
    status = cli("--disk", str(disk), "status")
    assert (status["trial"], status["next_boot"]) == ("B", "B"), status
    assert status["uboot"] == {**status["uboot"], "bootcount": 0, "bootlimit": TRIES,
                               "upgrade_available": 1}, status
    trial = run(disk, "v2", stop_at=r"slot=A tag=1\.0-ok", boots=TRIES + 1)
    tries = [line for line in trial.script if line.startswith("try ")]
    assert tries == [f"try slot=B bootcount={n} bootlimit={TRIES}"
                     for n in range(1, TRIES + 1)], trial.tail()
    assert [g for g in trial.guest if g.startswith("slot=")] == \
        ["slot=B tag=2.0-reboot root=/dev/vda4"] * TRIES + \
        ["slot=A tag=1.0-ok root=/dev/vda3"], trial.tail()
    status = cli("--disk", str(disk), "status")
    assert status["next_boot"] == "A" and status["uboot"]["bootcount"] == TRIES, status

    # A panicking trial: TRIES panics, then A; the hook on A records the fallback.
    cli("--disk", str(disk), "apply", str(world.images["3.0"]))
    panic = run(disk, "v3", stop_at=r"slot=A tag=1\.0-ok", boots=TRIES + 1)
    assert panic.log.count("Kernel panic - not syncing") == TRIES, panic.tail()
    assert [g for g in panic.guest if g.startswith(("slot=", "broken"))] == \
        ["broken tag=3.0-panic: init exits, the kernel panics"] * TRIES + \
        ["slot=A tag=1.0-ok root=/dev/vda3"], panic.tail()
    with running_machine(disk, world.work / "m3", booted=Slot.A) as m:
        assert m.cli("boot-hook", "--no-reboot").returncode == 0
    fallback = [e for e in cli("--disk", str(disk), "history") if e["event"] == "fallback"]
    assert fallback and fallback[-1]["version"] == "3.0", fallback

    # The hook commits a healthy trial: U-Boot then boots B without counting.
    cli("--disk", str(disk), "apply", str(world.images["4.0"]))
    assert decide(disk, "v4-trial")[1:] == [f"try slot=B bootcount=1 bootlimit={TRIES}",
                                            "boot slot=B fallback=A"]
    with running_machine(disk, world.work / "m4", booted=Slot.B) as m:
        assert m.cli("boot-hook", "--no-reboot").returncode == 0
    assert decide(disk, "v4-committed")[1:] == ["boot slot=B fallback=A"]

    # A failing required check: the hook rolls back, U-Boot boots B again.
    cli("--disk", str(disk), "apply", str(world.images["5.0"]))
    assert decide(disk, "v5-trial")[1] == f"try slot=A bootcount=1 bootlimit={TRIES}"
    with running_machine(disk, world.work / "m5", booted=Slot.A) as m:
        m.add_check("required", "10-app", "#!/bin/sh\necho app is down\nexit 1\n")
        assert m.cli("boot-hook", "--no-reboot").returncode == 5
    assert decide(disk, "v5-rolled-back")[1:] == ["boot slot=B fallback=none"]

    # mark-good on a trial boot commits it; rollback goes back to the other slot.
    cli("--disk", str(disk), "apply", str(world.images["6.0"]))
    assert decide(disk, "v6-trial")[1].startswith("try slot=A bootcount=1")
    with running_machine(disk, world.work / "m6", booted=Slot.A) as m:
        assert m.cli("mark-good").returncode == 0
    assert decide(disk, "v6-good")[1:] == ["boot slot=A fallback=B"]
    cli("--disk", str(disk), "rollback")
    assert decide(disk, "rollback")[1:] == ["boot slot=B fallback=A"]
    events = [e["event"] for e in cli("--disk", str(disk), "history")]
    for name in ("committed", "rolled-back", "fallback", "manual-rollback"):
        assert name in events, events
