"""Faults on loop disks, both bootloaders: two applies at once, a full state folder, a read-only
boot partition, tools missing from PATH, a slot device that fails in the middle of a write,
and a boot hook that finds its state file corrupt. Each ends in one clear line on stderr,
loses nothing that was recorded, and leaves a machine that boots a good slot."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest

from abupgrade import mounts, slots
from abupgrade.bootloader.grub import GrubConfig
from abupgrade.bootloader.syslinux import SyslinuxConfig
from abupgrade.bootloader.systemd_boot import SystemdBootConfig
from abupgrade.bootloader.uboot import UBoot, UBootConfig
from abupgrade.fat import Fat, open_fat
from abupgrade.model import Slot
from abupgrade.system import bootloader_of
from fixtures.images import KeyPair, rootfs_image, signed_image
from fixtures.machine import Machine, running_machine
from fixtures.reliability import record
from fixtures.tiers import any_bootloader

pytestmark = pytest.mark.loop


@pytest.fixture
def machine(ab_disk: Path, tmp_path: Path) -> Iterator[Machine]:
    with running_machine(ab_disk, tmp_path / "machine", booted=Slot.A, health_timeout=5,
                         deadline=60) as m:
        yield m


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def boot_files(m: Machine) -> dict[str, str]:
    """Every file the bootloader reads its state or kernels from."""
    if isinstance(m.config.settings, SystemdBootConfig):  # every file on the ESP
        with open_fat(slots.resolve(m.config.settings.esp)) as fat:
            return {str(path): hashlib.sha256(fat.read(path)).hexdigest()
                    for path in fat_files(fat)}
    if m.config.bootloader == "grub":
        env = m.config.section(GrubConfig).env
        paths = [env, env.with_name(env.name + ".1"), *(env.parent / "slots").rglob("*")]
    elif m.config.bootloader == "uboot":
        settings = m.config.section(UBootConfig)
        paths = list((settings.dir / "slots").rglob("*"))
        copies = {line: hashlib.sha256(data).hexdigest() for line, data in zip(
            settings.env, UBoot(settings).environment().read_raw(), strict=True)}
        return copies | {str(p): digest(p) for p in sorted(paths) if p.is_file()}
    else:
        d = m.config.section(SyslinuxConfig).dir
        paths = [d / "extlinux.conf", d / "ldlinux.sys", *(d / "slots").rglob("*")]
    return {str(p): digest(p) for p in sorted(paths) if p.is_file()}


def fat_files(fat: Fat, folder: PurePosixPath | None = None) -> list[PurePosixPath]:
    found = []
    for entry in fat.list(folder or ""):
        if entry.name in (".", ".."):
            continue
        path = folder / entry.name if folder else PurePosixPath(entry.name)
        found += fat_files(fat, path) if entry.is_dir else [path]
    return found


def slot_digest(m: Machine, slot: Slot, length: int = 8 << 20) -> str:
    with open(m.device(slot), "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def status(m: Machine) -> dict[str, object]:
    proc = m.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def events(m: Machine) -> list[dict[str, object]]:
    proc = m.cli("history", "--json")
    assert proc.returncode == 0, proc.stderr
    data: list[dict[str, object]] = json.loads(proc.stdout)
    return data


def boots_a_good_slot(m: Machine) -> None:
    st = status(m)
    nxt = str(st["next_boot"])
    slots = st["slots"]
    assert isinstance(slots, dict)
    assert slots[nxt]["state"] == "good" and slots[nxt]["version"], st


def one_line(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@contextlib.contextmanager
def unchanged(m: Machine) -> Iterator[None]:
    """The failure inside must change neither the bootloader, nor slot B, nor lose history."""
    before_boot, before_b, before_events = boot_files(m), slot_digest(m, Slot.B), events(m)
    yield
    assert boot_files(m) == before_boot, "the bootloader's files changed"
    assert slot_digest(m, Slot.B) == before_b, "slot B was written"
    after = events(m)
    assert after[:len(before_events)] == before_events, "history lost events"
    boots_a_good_slot(m)


def case(fn: Callable[..., None]) -> Callable[..., None]:
    """Count the fault cases tried and failed for the reliability table."""
    def wrapper(*args: object, **kwargs: object) -> None:
        name = fn.__name__.removeprefix("test_")
        try:
            fn(*args, **kwargs)
        except pytest.skip.Exception:
            raise
        except BaseException:
            record("faults", name, tried=1, failed=1)
            raise
        record("faults", name, tried=1, failed=0)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


# ---------------------------------------------------------------- two applies at once


@any_bootloader
@case
def test_second_apply_refused_at_once_while_one_writes(
        machine: Machine, make_image: Callable[..., Path]) -> None:
    image = make_image("2.0", size=32 << 20).read_bytes()
    installs = [e["event"] for e in events(machine)].count("installed")
    first = subprocess.Popen([sys.executable, "-m", "abupgrade", "--config",
                              str(machine.config_path), "apply", "-"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    assert first.stdin is not None and first.stderr is not None
    first.stdin.write(image[: len(image) // 2])  # it holds the lock and waits for the rest
    first.stdin.flush()
    lock = machine.config.state_dir / "lock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not lock.read_text().strip().startswith(str(first.pid)):
        time.sleep(0.1)
    started = time.monotonic()
    second = machine.cli("apply", str(make_image("2.0", size=32 << 20)))
    waited = time.monotonic() - started
    first.stdin.write(image[len(image) // 2:])
    first.stdin.close()
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    one_line(second, 4, "lock", str(first.pid))
    assert waited < 5, f"the second apply took {waited:.1f} s to refuse"
    st = status(machine)
    assert st["trial"] == "B"
    assert [e["event"] for e in events(machine)].count("installed") == installs + 1


# ---------------------------------------------------------------- storage that refuses


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "64k") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(folder: Path) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xff" * 4096)
    finally:
        os.close(fd)


@any_bootloader
@case
def test_full_state_folder(machine: Machine, make_image: Callable[..., Path],
                           tmp_path: Path) -> None:
    """state_dir on a full filesystem: apply fails before it writes the slot."""
    with tiny_tmpfs(tmp_path / "full") as full:
        for item in machine.config.state_dir.iterdir():
            shutil.copy2(item, full / item.name)
        text = machine.config_path.read_text().replace(
            f'state_dir = "{machine.config.state_dir}"', f'state_dir = "{full}"')
        assert str(full) in text
        machine.config_path.write_text(text)
        fill(full)
        history = (full / "history.jsonl").read_bytes()
        with unchanged(machine):
            proc = machine.cli("apply", str(make_image("2.0")))
            one_line(proc, 1, "No space left")
        assert (full / "history.jsonl").read_bytes() == history
        json.loads((full / "state.json").read_text())
        (full / "filler").unlink()
        proc = machine.cli("apply", str(make_image("2.0")))
        assert proc.returncode == 0, proc.stderr


@contextlib.contextmanager
def read_only_boot(machine: Machine) -> Iterator[None]:
    """The filesystem the bootloader's state lives on, read-only for the block: the mounted
    boot partition remounted, or the ESP's device set read-only (systemd-boot; this kernel
    has no vfat, so the ESP is not mounted)."""
    settings = machine.config.settings
    if isinstance(settings, SystemdBootConfig):
        device = str(slots.resolve(settings.esp))
        undo = ["blockdev", "--setrw", device]
        subprocess.run(["blockdev", "--setro", device], check=True)
    else:
        held = mounts.holding(bootloader_of(machine.config).boot_file_path(Slot.A, "kernel"))
        assert held is not None, settings
        boot = held.point
        undo = ["mount", "-o", "remount,rw", str(boot)]
        subprocess.run(["mount", "-o", "remount,ro", str(boot)], check=True)
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


@case
def test_read_only_boot_partition(machine: Machine, make_image: Callable[..., Path]) -> None:
    with read_only_boot(machine), unchanged(machine):
        proc = machine.cli("apply", str(make_image("2.0")))
        one_line(proc, 2, "writable")
    proc = machine.cli("apply", str(make_image("2.0")))
    assert proc.returncode == 0, proc.stderr


def path_without(tmp_path: Path, *tools: str) -> str:
    """A PATH with every tool of the system's but `tools`."""
    shadow = tmp_path / "path"
    shadow.mkdir()
    for folder in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            link = shadow / name
            if name not in tools and not link.exists():
                link.symlink_to(os.path.join(folder, name))
    return str(shadow)


@case
def test_missing_bootloader_tools(machine: Machine, make_image: Callable[..., Path],
                                  tmp_path: Path) -> None:
    """apply and the hook need neither grub-editenv, extlinux, mkimage nor mkfs.fat (the
    state is written natively); disk init needs its bootloader's tools and says which
    package is missing."""
    tools = ("grub-editenv", "grub-mkimage", "extlinux", "mkimage", "mkfs.fat")
    env = dict(os.environ, PATH=path_without(tmp_path, *tools))
    cmd = [sys.executable, "-m", "abupgrade", "--config", str(machine.config_path)]
    proc = subprocess.run([*cmd, "apply", str(make_image("2.0"))], env=env,
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    machine.boot(Slot.B)
    proc = subprocess.run([*cmd, "boot-hook", "--no-reboot"], env=env, capture_output=True,
                          text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert status(machine)["next_boot"] == "B"
    kind = machine.config.bootloader
    target = tmp_path / "new.img"
    proc = subprocess.run([sys.executable, "-m", "abupgrade", "disk", "init", str(target),
                           "--bootloader", str(kind), "--size", "768M", "--slot-size", "64M",
                           "--compatible", "test-box"], env=env, capture_output=True,
                          text=True, check=False, timeout=300)
    one_line(proc, 1, "not installed", "apt-get install")
    leftovers = subprocess.run(["losetup", "-j", str(target)], capture_output=True, text=True,
                               check=False).stdout
    assert not leftovers.strip(), f"disk init left loop devices: {leftovers}"


# ---------------------------------------------------------------- a slot that fails mid-write


@contextlib.contextmanager
def failing_device(tmp_path: Path, size: int, room: str) -> Iterator[Path]:
    """A loop device of `size` bytes whose backing file lives on a tmpfs with only `room`:
    writes past that fail with EIO, as a dying or pulled disk's do. (This kernel has no
    device-mapper, so no dm error target.)"""
    with tiny_tmpfs(tmp_path / "backing", room) as where:
        backing = where / "slot.img"
        backing.touch()
        os.truncate(backing, size)
        loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                              text=True, check=True).stdout.strip()
        try:
            yield Path(loop)
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)


@any_bootloader
@case
def test_slot_device_fails_mid_write(machine: Machine, signer: KeyPair,
                                     tmp_path: Path) -> None:
    real_b = machine.device(Slot.B)
    size = int(subprocess.run(["blockdev", "--getsize64", str(real_b)], capture_output=True,
                              text=True, check=True).stdout)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(12 << 20))  # incompressible: no zero skipping
    rootfs = rootfs_image(tmp_path / "rootfs.ext4", tag="2.0", size=24 << 20, root_dir=tree)
    boot_file = tmp_path / "boot-file"
    boot_file.write_bytes(b"kernel or initrd\n" * 100)
    image = signed_image(tmp_path / "big.tar", rootfs, signer, version="2.0",
                         kernel=boot_file, initrd=boot_file)
    with failing_device(tmp_path, size, "4m") as bad:
        machine.config_path.write_text(
            machine.config_path.read_text().replace(f'"{real_b}"', f'"{bad}"'))
        machine.config = dataclasses.replace(
            machine.config, slots={Slot.A: machine.config.slots[Slot.A], Slot.B: str(bad)})
        before_boot, before_events = boot_files(machine), events(machine)
        proc = machine.cli("apply", str(image))
        one_line(proc, 1)
        assert "Input/output error" in proc.stderr or "No space" in proc.stderr \
            or "read-back" in proc.stderr, proc.stderr
        assert events(machine)[:len(before_events)] == before_events
        assert events(machine)[-1]["event"] == "install-failed", proc.stderr
        st = status(machine)
        slots = st["slots"]
        assert st["next_boot"] == "A" and st["trial"] is None, st
        assert isinstance(slots, dict) and slots["B"]["state"] != "good"
        assert boot_files(machine) == before_boot
        boots_a_good_slot(machine)
        # the storage comes back: the next apply works
        machine.config_path.write_text(
            machine.config_path.read_text().replace(f'"{bad}"', f'"{real_b}"'))
    proc = machine.cli("apply", str(image))
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- a corrupt state file


@any_bootloader
@pytest.mark.parametrize("during", ["committed boot", "trial boot"])
@case
def test_hook_with_corrupt_state_file(machine: Machine, make_image: Callable[..., Path],
                                      during: str) -> None:
    if during == "trial boot":
        proc = machine.cli("apply", str(make_image("2.0")))
        assert proc.returncode == 0, proc.stderr
        machine.boot(Slot.B)
    history = events(machine)
    state = machine.config.state_dir / "state.json"
    state.write_bytes(b'{"format": 1, "slots": {"A": {"sta')  # torn by hand
    broken = status_or_error(machine)
    assert broken.returncode == 1 and "corrupt" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
    proc = machine.cli("boot-hook", "--no-reboot", "--json")
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)["outcome"]
    assert outcome == ("committed" if during == "trial boot" else "committed-boot")
    after = events(machine)
    assert after[:len(history)] == history
    assert "repaired" in [e["event"] for e in after[len(history):]]
    kept = list(machine.config.state_dir.glob("state.json.corrupt-*"))
    assert kept and kept[0].read_bytes().startswith(b'{"format": 1')
    boots_a_good_slot(machine)
    proc = machine.cli("apply", str(make_image("3.0")))
    assert proc.returncode == 0, proc.stderr


def status_or_error(m: Machine) -> subprocess.CompletedProcess[str]:
    return m.cli("status", "--json")
