"""systemd-boot under OVMF in QEMU: a disk made by the real `abupgrade disk init --bootloader
systemd-boot`, updated from the host with `apply --disk`; the trials are counted by the
real systemd-boot (Debian's systemd-boot-efi), which renames the entries itself.

One disk, `[systemd-boot] tries = 2`; every boot is its own QEMU run (the guest's reboot or
the kernel's panic=5 reset ends it) so that the ESP can be read between boots. Busybox guests
where no abupgrade is needed inside (an OVMF boot costs 20-40 s under TCG):

1. `disk init --image v1` (powers off), `apply v2` (reboots, nothing commits it): B, B - the
   loader renames slot-b+2-0.conf to +1-1, +0-2 - then A with v1 as disk init left it.  3 boots
   The ESP before and after the first trial boot gives the sectors the loader's own rename
   wrote: every subset of them is decided as the loader would read it.
2. `apply v3`, whose init exits (kernel panic): B, B, then A.                            3 boots
3. `apply v4`, the Python guest: its boot hook commits B, renaming the entry through the
   guest kernel's vfat; then the firmware boots that entry again.                        2 boots
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from abupgrade.bootloader.systemd_boot import ENTRIES, Name
from abupgrade.fat import MtoolsFat
from abupgrade.partitions import read_table
from fixtures import pyguest
from fixtures.guest import (
    QEMU,
    GuestUnavailable,
    Ovmf,
    guest_lines,
    missing_tools,
    qemu_boot,
    require_root,
)
from fixtures.images import KeyPair, busybox_image, keypair
from fixtures.machine import cli_json as cli
from fixtures.pyguest import reports
from fixtures.reliability import record
from fixtures.sdboot import lookup, read_image, snapshot

pytestmark = [pytest.mark.boot, pytest.mark.loop]

COMPATIBLE = "test-box"
TRIES = 2
BUSYBOX_BOOT = 90  # seconds one OVMF boot of a busybox guest may take (about 20-40)
PYTHON_BOOT = 180  # ... of the Python guest
TOOLS = (QEMU, "debootstrap", "losetup", "partx", "sfdisk", "mkfs.ext4", "mkfs.fat", "mcopy",
         "modprobe")
REBOOTS = "#!/bin/sh\necho \"ABUPGRADE-GUEST no-hook: rebooting\"\nsync\nreboot -f\n"
SECTOR = 512


@dataclass(frozen=True)
class Images:
    key: KeyPair
    v1: Path  # busybox, powers off
    v2: Path  # busybox, reboots, never commits
    v3: Path  # busybox, init exits: kernel panic
    v4: Path  # the Python guest with the boot hook, healthy


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    try:
        require_root()
        Ovmf.find()
    except GuestUnavailable as exc:
        pytest.skip(str(exc))
    missing = missing_tools(*TOOLS)
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (run scripts/setup)")
    work = tmp_path_factory.mktemp("sdboot-images")
    try:
        key = keypair(work / "keys")
        boot = pyguest.boot_files(work / "boot-files")

        def busybox(version: str, **kw: Any) -> Path:
            return busybox_image(work, key, version=version, kernel=boot.kernel,
                                 initrd=boot.initrd, compatible=COMPATIBLE, **kw)

        return Images(key, busybox("1.0"), busybox("2.0", script=REBOOTS),
                      busybox("3.0", broken=True),
                      pyguest.signed_guest_image(work / "4.0.tar", key, version="4.0",
                                                 compatible=COMPATIBLE, boot=boot))
    except GuestUnavailable as exc:
        pytest.skip(str(exc))


@dataclass
class Boot:
    log: str
    seconds: float
    entries: list[str]  # loader/entries after the boot
    status: dict[str, Any]  # `status --disk` after the boot

    def guest(self) -> str:
        """`slot=X tag=V` of the busybox guest that came up, `broken tag=V` of one whose init
        failed, `slot=X version=V` of the Python guest; "" when none did."""
        for line in guest_lines(self.log):
            if line.startswith(("slot=", "broken")):
                return " ".join(w.rstrip(":") for w in line.split()
                                if w.split("=")[0] in ("slot", "tag", "version", "broken"))
        return ""

    def cmdline(self) -> str:
        for line in self.log.splitlines():
            if "Command line:" in line:
                return line.split("Command line:", 1)[1].strip()
        return ""


@dataclass
class Story:
    work: Path
    images: Images
    disk: Path = field(init=False)
    uefi: Ovmf = field(default_factory=Ovmf.find)
    steps: dict[int, list[Boot]] = field(default_factory=dict)
    rename: tuple[bytes, bytes] | None = None  # the ESP before and after the first trial boot

    def __post_init__(self) -> None:
        self.disk = self.work / "sdboot.img"

    def esp_extent(self) -> tuple[int, int]:
        table = read_table(self.disk)
        assert table is not None
        part = table.get(1)
        return part.start, part.size

    def esp_bytes(self) -> bytes:
        start, size = self.esp_extent()
        with open(self.disk, "rb") as f:
            f.seek(start)
            return f.read(size)

    def entries(self) -> list[str]:
        with MtoolsFat(self.disk, offset=self.esp_extent()[0]) as esp:
            return [e.name for e in esp.list(ENTRIES)]

    def boot(self, name: str, seconds: float) -> Boot:
        start = time.monotonic()
        text = qemu_boot(self.disk, self.work / f"{name}.log", timeout=seconds,
                         no_reboot=True, uefi=self.uefi)
        took = time.monotonic() - start
        return Boot(text, took, self.entries(), cli("--disk", str(self.disk), "status"))

    def step(self, number: int) -> list[Boot]:
        if number not in self.steps:
            if number > 1:
                self.step(number - 1)
            self.steps[number] = self._run(number)
        return self.steps[number]

    def _run(self, number: int) -> list[Boot]:
        disk = str(self.disk)
        if number == 1:
            cli("disk", "init", disk, "--bootloader", "systemd-boot", "--size", "1200M",
                "--slot-size", pyguest.SLOT_SIZE, "--image", str(self.images.v1),
                "--pubkey", str(self.images.key.public))
            pyguest.configure_disk(self.disk, tries=TRIES)
            status = cli("--disk", disk, "status")
            assert (status["firmware"], status["next_boot"]) == ("uefi", "A"), status
        image = {1: self.images.v2, 2: self.images.v3, 3: self.images.v4}[number]
        applied = cli("--disk", disk, "apply", str(image))
        assert (applied["slot"], applied["tries"]) == ("B", TRIES), applied
        if number == 3:
            return [self.boot("v4-trial", PYTHON_BOOT), self.boot("v4-committed", PYTHON_BOOT)]
        boots = []
        for n in range(TRIES + 1):
            before = self.esp_bytes() if (number, n) == (1, 0) else b""
            boots.append(self.boot(f"step{number}-{n}", BUSYBOX_BOOT))
            if before:
                self.rename = (before, self.esp_bytes())
        return boots


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Story:
    return Story(tmp_path_factory.mktemp("sdboot-story"), images)


def seconds(boots: list[Boot]) -> str:
    return "+".join(f"{b.seconds:.0f}" for b in boots) + " s"


def test_a_trial_nothing_commits_gets_exactly_n_boots_then_v1_boots_in_a(story: Story) -> None:
    boots = story.step(1)
    tail = "\n".join(boots[-1].log.splitlines()[-30:])
    assert [b.guest() for b in boots] == ["slot=B tag=2.0", "slot=B tag=2.0", "slot=A tag=1.0"], \
        f"{seconds(boots)}\n{tail}"
    # the loader renamed the entry before each boot, and status read the counter from it
    assert [b.entries for b in boots] == [["slot-a.conf", "slot-b+1-1.conf"],
                                         ["slot-a.conf", "slot-b+0-2.conf"],
                                         ["slot-a.conf", "slot-b+0-2.conf"]]
    assert [(b.status["trial"], b.status["trial_boots_left"], b.status["next_boot"])
            for b in boots] == [("B", 1, "B"), (None, None, "A"), (None, None, "A")]
    for boot, slot in zip(boots, "BBA", strict=True):
        words = boot.cmdline().split()
        assert f"abupgrade.slot={slot}" in words and "panic=5" in words, boot.cmdline()


def test_every_cut_of_the_loaders_own_rename_boots_a_complete_slot(story: Story) -> None:
    """The sectors the real loader changed when it counted the first trial boot, each subset
    of them written (a cut while its FAT driver flushed), read back with mtools: the next
    boot must be slot B (counted or not yet) or A, never nothing or a half entry."""
    story.step(1)
    assert story.rename is not None
    before, after = story.rename
    changed = [i for i in range(0, len(before), SECTOR)
               if before[i:i + SECTOR] != after[i:i + SECTOR]]
    assert 0 < len(changed) <= 16, f"the loader wrote sectors {[i // SECTOR for i in changed]}"
    scratch = story.work / "rename-sweep"
    scratch.mkdir(exist_ok=True)
    state = scratch / "esp.img"
    state.write_bytes(before)
    outcomes: Counter[str] = Counter()
    bad = []
    with open(state, "r+b") as f:
        for n in range(len(changed) + 1):
            for subset in itertools.combinations(changed, n):
                for i in subset:
                    f.seek(i)
                    f.write(after[i:i + SECTOR])
                f.flush()
                files, unreadable = read_image(state, scratch)
                esp = snapshot(files)
                chosen = esp.choice()
                name = Name.parse(chosen.name) if chosen else None
                if chosen is None or name is None or unreadable or not all(
                        lookup(files, p) for p in (chosen.linux or "", *chosen.initrds)):
                    bad.append(f"sectors {[i // SECTOR for i in subset]}: {sorted(files)}")
                else:  # two names of one slot: the loader boots it uncounted (see bls.py)
                    kind = "two names" if len(esp.names(name.slot)) > 1 else chosen.name
                    outcomes[f"{name.slot} via {kind}"] += 1
                for i in subset:
                    f.seek(i)
                    f.write(before[i:i + SECTOR])
    record("powercut", "systemd-boot/the loader's own rename (OVMF)",
           tried=sum(outcomes.values()) + len(bad), bricks=len(bad),
           sectors=len(changed), old_name=outcomes["B via slot-b+2-0.conf"],
           new_name=outcomes["B via slot-b+1-1.conf"], fell_back=outcomes["A via slot-a.conf"],
           two_names=outcomes["B via two names"])
    assert not bad, bad[:5]
    assert outcomes["B via slot-b+2-0.conf"] and outcomes["B via slot-b+1-1.conf"], outcomes


def test_a_panicking_trial_falls_back_after_n(story: Story) -> None:
    boots = story.step(2)
    tail = "\n".join(boots[-1].log.splitlines()[-30:])
    assert [b.guest() for b in boots] == ["broken tag=3.0", "broken tag=3.0", "slot=A tag=1.0"], \
        f"{seconds(boots)}\n{tail}"
    assert all("Kernel panic" in b.log for b in boots[:TRIES])
    assert boots[-1].entries == ["slot-a.conf", "slot-b+0-2.conf"]
    assert boots[-1].status["next_boot"] == "A"


def test_the_boot_hook_commits_a_healthy_trial(story: Story) -> None:
    trial, again = story.step(3)
    booted = reports(trial.log)
    assert [(b.slot, b.version, b.last_boot) for b in booted] == [("B", "4.0", "committed")], \
        "\n".join(trial.log.splitlines()[-40:])
    guest = booted[0].status
    assert guest is not None and guest["booted"] == "B" and guest["trial"] is None, guest
    # the loader had counted this boot, the guest's kernel renamed the entry to commit it
    assert guest["notes"] == ["systemd-boot started slot-b+2-0.conf in this boot"], guest
    assert trial.entries == ["slot-a.conf", "slot-b.conf"]
    assert trial.status["next_boot"] == "B" and trial.status["slots"]["B"]["state"] == "good"
    # and the firmware boots what Linux's vfat wrote
    assert [(b.slot, b.version, b.last_boot) for b in reports(again.log)] == \
        [("B", "4.0", "committed-boot")], \
        "\n".join(again.log.splitlines()[-40:])
    assert again.entries == ["slot-a.conf", "slot-b.conf"]
    committed = [e for e in cli("--disk", str(story.disk), "history") if e["event"] == "committed"]
    assert committed[-1]["slot"] == "B" and committed[-1]["version"] == "4.0", committed
