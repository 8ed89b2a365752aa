"""Power cuts at every write of apply, commit, rollback, mark-bad and the boot hook, both
bootloaders (see fixtures/powercut.py for the storage model and what it leaves out).

The machine is plain files (fixtures/filemachine.py): the storage of a machine in a folder,
and abupgrade's own operations run on it with only the slot devices swapped for files.

After each cut the machine is powered on from the boot filesystem as the bootloader reads it
(the storage model's view without journal replay): GRUB is GRUB itself, grub-emu running the
rendered grub.cfg on an image of that boot filesystem (fixtures/grubemu.py; each run's choice
and saved block also checked against the model of grub.cfg in fixtures/grub_model.py, both
blocks listed by the real `grub-editenv`), syslinux the model in fixtures/syslinux_model.py;
the slot it
boots must hold one image completely (rootfs, and the kernel and initrd the bootloader loaded,
of the same version), never a half-written one. Then the boot hook runs on that slot (Linux's
view, the journal replayed), state.json and every history line must parse, and a new apply
must succeed and boot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from abupgrade import fsutil, ops
from abupgrade.bootloader import BootloaderKind, base
from abupgrade.errors import AbupgradeError, HealthFailed
from abupgrade.model import Slot
from abupgrade.state import Store
from abupgrade.system import Options
from fixtures.filemachine import (
    STATE,
    Bench,
    GrubCache,
    Image,
    make_image,
    slots_on_loop_devices,
)
from fixtures.grubemu import EmuUnavailable, GrubEmu
from fixtures.images import KeyPair, keypair
from fixtures.powercut import (
    Recorder,
    Tree,
    Zero,
    cut_points,
    read_tree,
    tree_digest,
    write_tree,
)
from fixtures.reliability import record
from fixtures.tiers import guest_skips, needs


def state_parses(root: Path, *, torn_tail: bool) -> None:
    """state.json loads; every history line parses, but for a last line a cut tore (no
    newline yet) where `torn_tail` allows it: the next append drops that one."""
    store = Store(root / STATE)
    store.load()
    store.history()
    lines = store.history_path.read_bytes().split(b"\n")
    if lines[-1] != b"":
        assert torn_tail, "a history line without its newline after an append"
    for line in lines[:-1]:
        event = json.loads(line)
        assert {"time", "event", "slot", "version", "detail"} <= set(event)


# ---------------------------------------------------------------- the sweep


@dataclass
class Outcome:
    cuts: int = 0  # (cut point, crash state) pairs tried
    states: int = 0  # distinct on-disk states among them
    boot_views: int = 0  # states where the bootloader's view of the boot fs is not Linux's
    bricks: list[str] = field(default_factory=list)  # booted nothing or a half-written slot
    failures: list[str] = field(default_factory=list)  # hook/state/next apply went wrong


def after_cut(bench: Bench, disk: Path, out: Outcome, where: str, boot: Tree | None) -> None:
    slot, loaded, why = bench.power_on(disk, editenv=bench.kind is BootloaderKind.GRUB,
                                       boot=boot)
    if slot is None or bench.complete(disk, slot, loaded) is None:
        out.bricks.append(f"{where}: boots {slot} which holds no complete image ({why})")
        return
    try:
        bench.hook(disk, slot)
        state_parses(disk, torn_tail=True)
        slot, loaded, why = bench.power_on(disk)
        assert slot is not None and bench.complete(disk, slot, loaded), f"after the hook: {why}"
        bench.hook(disk, slot)
        bench.apply(disk, slot, "9.0")
        new, loaded, why = bench.power_on(disk)
        assert new == slot.other and bench.complete(disk, new, loaded) == "9.0", why
        result = bench.hook(disk, new)
        assert result.outcome == "committed", result
        state_parses(disk, torn_tail=False)
    except (AbupgradeError, AssertionError, ValueError, KeyError) as exc:
        out.failures.append(f"{where}: {type(exc).__name__}: {exc}")


def sweep(bench: Bench, name: str, prepare: Callable[[Path], Slot],
          operation: Callable[[Path, Slot], object], *, figures: bool = True,
          until_brick: bool = False, on_devices: bool = False) -> Outcome:
    """Record `operation` on the machine `prepare` leaves, then cut before every log entry
    (`until_brick`: stop at the first brick, for the sweeps that must find one; `on_devices`:
    the operation writes the slots through loop devices of the slot files)."""
    root = bench.work / "run"
    booted = prepare(root)
    with contextlib.ExitStack() as stack:
        devices = stack.enter_context(slots_on_loop_devices(bench, root)) if on_devices else {}
        recorder = Recorder(root, devices)
        with recorder.active():
            operation(root, booted)
    recorder.verify()
    bench.zeroed = sum(isinstance(op, Zero) for op in recorder.log)
    out = Outcome()
    seen: set[str] = set()
    disk = bench.work / "cut"
    emu_runs = len(bench.grub_runs)
    for n, cut in cut_points(recorder.start, recorder.root, recorder.log,
                             boot_fs=recorder.root / "boot"):
        out.cuts += 1
        digest = tree_digest(cut.tree) + (tree_digest(cut.boot) if cut.boot else "")
        if digest in seen:
            continue
        seen.add(digest)
        out.states += 1
        if cut.boot is not None:
            out.boot_views += 1
        bench.template(disk)
        write_tree(disk, cut.tree)
        op = recorder.log[n] if n < len(recorder.log) else "the end"
        after_cut(bench, disk, out, f"{name} cut before #{n} ({str(op)[:80]}), {cut.what}",
                  cut.boot)
        if until_brick and out.bricks:
            break
    emu_runs = len(bench.grub_runs) - emu_runs
    if figures:
        record("powercut", f"{bench.kind}/{name}", tried=out.cuts, states=out.states,
               log=len(recorder.log), bricks=len(out.bricks), failures=len(out.failures),
               boot_views=out.boot_views, grub_emu=emu_runs)
    print(f"\n{bench.kind} {name}: {len(recorder.log)} writes/syncs logged, {out.cuts} cuts, "
          f"{out.states} distinct states ({out.boot_views} where the bootloader reads other "
          f"files than Linux), {emu_runs} grub-emu runs, {len(out.bricks)} bricks, "
          f"{len(out.failures)} failures")
    return out


# ---------------------------------------------------------------- scenarios


def _boot_until(bench: Bench, root: Path, slot: Slot) -> Slot:
    for _ in range(12):
        booted, _loaded, why = bench.power_on(root)
        if booted == slot:
            return slot
    raise AssertionError(f"never booted {slot}: {why}")


def _applied(bench: Bench, root: Path) -> Slot:
    bench.init(root)
    bench.apply(root, Slot.A, "2.0")
    return Slot.A


def _on_trial(bench: Bench, root: Path) -> Slot:
    _applied(bench, root)
    return _boot_until(bench, root, Slot.B)


def _committed_b(bench: Bench, root: Path) -> Slot:
    _on_trial(bench, root)
    bench.hook(root, Slot.B)
    return Slot.B


def _fell_back(bench: Bench, root: Path) -> Slot:
    """The trial booted (all its tries) but never reached the hook: back on A."""
    _applied(bench, root)
    return _boot_until(bench, root, Slot.A)


def _initialised(bench: Bench, root: Path) -> Slot:
    bench.init(root)
    return Slot.A


def _hook_failing(bench: Bench, root: Path, booted: Slot) -> None:
    with pytest.raises(HealthFailed):
        bench.hook(root, booted, bench.failing)


def _mark_bad(bench: Bench, root: Path, booted: Slot) -> None:
    with bench.machine(root, booted):
        ops.mark_bad(Options(), Slot.B)


def _rollback(bench: Bench, root: Path, booted: Slot) -> None:
    with bench.machine(root, booted):
        ops.rollback(Options(), reboot=False)


SCENARIOS: dict[str, tuple[Callable[[Bench, Path], Slot], Callable[[Bench, Path, Slot], object]]] = {
    "apply": (_initialised, lambda b, r, s: b.apply(r, s, "2.0")),
    "commit": (_on_trial, lambda b, r, s: b.hook(r, s)),
    "hook-rollback": (_on_trial, _hook_failing),
    "hook-fallback": (_fell_back, lambda b, r, s: b.hook(r, s)),
    "rollback": (_committed_b, _rollback),
    "mark-bad": (_applied, _mark_bad),
    "apply-over": (_committed_b, lambda b, r, s: b.apply(r, s, "3.0")),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """On tmpfs when there is one: tens of thousands of fsyncs then cost nothing."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(subprocess.check_output(["mktemp", "-d", "-p", str(shm), "abupgrade-cut.XXXX"],
                                            text=True).strip())
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("powercut")


@pytest.fixture(scope="module")
def images(work: Path) -> tuple[KeyPair, dict[str, Image]]:
    key = keypair(work / "signer")
    base = work / "images"
    base.mkdir()
    return key, {v: make_image(base, key, v) for v in ("1.0", "2.0", "3.0", "9.0")}


@pytest.fixture(scope="module")
def grub(work: Path) -> GrubCache:
    if shutil.which("grub-editenv") is None:
        pytest.skip("grub-editenv is missing (apt-get install grub2-common)")
    try:
        return GrubCache(GrubEmu(work))
    except EmuUnavailable as exc:
        pytest.skip(str(exc))


def bench_for(kind: BootloaderKind, folder: Path, images: tuple[KeyPair, dict[str, Image]],
              request: pytest.FixtureRequest) -> Bench:
    key, made = images
    folder.mkdir()
    if kind is not BootloaderKind.GRUB:
        return Bench(kind, folder, key, made)
    cache: GrubCache = request.getfixturevalue("grub")
    return Bench(kind, folder, key, made, cache.emu, grub_runs=cache.runs)


# GRUB's sweeps need grub-editenv and grub-emu: the tier that fails where a tool is missing.
# systemd-boot keeps its state in file names on FAT, which this ext4 model does not cover:
# tests/test_sdboot_powercut.py cuts every write of its operations on real FAT32 images.
KINDS = [pytest.param(BootloaderKind.GRUB, marks=pytest.mark.loop, id="grub"),
         pytest.param(BootloaderKind.SYSLINUX, id="syslinux"),
         pytest.param(BootloaderKind.UBOOT, id="uboot")]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("kind", KINDS)
def test_power_cut_at_every_write(kind: BootloaderKind, scenario: str, work: Path,
                                  images: tuple[KeyPair, dict[str, Image]],
                                  request: pytest.FixtureRequest) -> None:
    bench = bench_for(kind, work / f"{kind}-{scenario}", images, request)
    prepare, operation = SCENARIOS[scenario]
    out = sweep(bench, scenario, lambda r: prepare(bench, r),
                lambda r, s: operation(bench, r, s))
    assert out.cuts > 0
    assert not out.bricks, f"{len(out.bricks)} bricks, first: " + "\n".join(out.bricks[:5])
    assert not out.failures, (f"{len(out.failures)} failures, first: "
                              + "\n".join(out.failures[:5]))


def test_recorder_sees_every_kind_of_write(work: Path) -> None:
    """The recorder's own check: a change it missed makes verify() fail."""
    root = work / "recorder"
    root.mkdir()
    (root / "f").write_bytes(b"old")
    recorder = Recorder(root)
    with recorder.active():
        fd = os.open(root / "f", os.O_WRONLY)
        os.pwrite(fd, b"new", 0)
        os.fsync(fd)
        os.close(fd)
    recorder.verify()
    kinds = {type(op).__name__ for op in recorder.log}
    assert kinds == {"Write", "Fsync"}
    # a write behind the recorder's back is caught
    with recorder.active():
        pass
    (root / "f").write_bytes(b"sneaky")
    with pytest.raises(AssertionError, match="missed"):
        recorder.verify()


def test_cut_before_fsync_loses_the_write(work: Path) -> None:
    """The model itself: an un-synced write may vanish, a synced one never does."""
    root = work / "model"
    root.mkdir()
    (root / "f").write_bytes(b"aaaa")
    recorder = Recorder(root)
    with recorder.active():
        fd = os.open(root / "f", os.O_WRONLY)
        os.pwrite(fd, b"bbbb", 0)
        os.fsync(fd)
        os.pwrite(fd, b"cccc", 0)
        os.close(fd)
    states = {(n, cut.what): cut.tree["f"] for n, cut in
              cut_points(recorder.start, recorder.root, recorder.log)}
    assert states[(1, "all pending lost")] == b"aaaa"
    assert states[(2, "all pending lost")] == b"bbbb"
    assert states[(3, "all pending lost")] == b"bbbb"
    assert states[(3, "all pending kept")] == b"cccc"
    assert states[(3, "last write torn at byte 2")] == b"ccbb"
    assert hashlib.sha256(read_tree(root)["f"]).digest()  # the real file is readable


@pytest.mark.loop
@pytest.mark.parametrize("kind", [BootloaderKind.GRUB, BootloaderKind.SYSLINUX], ids=str)
def test_power_cut_at_every_write_of_an_apply_to_real_devices(
        kind: BootloaderKind, work: Path, images: tuple[KeyPair, dict[str, Image]],
        request: pytest.FixtureRequest) -> None:
    """The writer's block-device path swept: the slots are loop devices while `apply` runs
    (O_EXCL, O_DIRECT for aligned blocks, BLKZEROOUT for the zero run), every write, fsync
    and zeroing of the device logged against its file, then cut like any other."""
    needs(root=True, loop=True, tools=("losetup",))
    bench = bench_for(kind, work / f"{kind}-apply-devices", images, request)
    out = sweep(bench, "apply-to-loop-devices", lambda r: _initialised(bench, r),
                lambda r, s: bench.apply(r, s, "2.0"), on_devices=True)
    assert bench.zeroed, "the writer did not zero the device with BLKZEROOUT"
    assert not out.bricks, f"{len(out.bricks)} bricks, first: " + "\n".join(out.bricks[:5])
    assert not out.failures, (f"{len(out.failures)} failures, first: "
                              + "\n".join(out.failures[:5]))


@pytest.mark.loop
def test_sweep_finds_a_slot_written_without_fsync(
        work: Path, images: tuple[KeyPair, dict[str, Image]],
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The sweep can fail: with the writer's fsync gone, a cut after the trial is armed
    leaves an armed slot whose bytes never reached the disk, and the sweep says so."""
    bench = bench_for(BootloaderKind.GRUB, work / "no-fsync", images, request)
    monkeypatch.setattr("abupgrade.writer._sync", lambda out: out.flush())
    out = sweep(bench, "apply-without-fsync", lambda r: _initialised(bench, r),
                lambda r, s: bench.apply(r, s, "2.0"), figures=False, until_brick=True)
    assert out.bricks, "a slot written without fsync went unnoticed"


@pytest.mark.loop
def test_sweep_finds_boot_files_the_bootloader_cannot_see(
        work: Path, images: tuple[KeyPair, dict[str, Image]],
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Defect 1 as the sweep sees it: boot files replaced without the journal checkpoint (as
    before it existed) are not there for GRUB after a cut, which then boots slot A's new
    rootfs with its old kernel."""
    bench = bench_for(BootloaderKind.GRUB, work / "no-checkpoint", images, request)
    # where the backends write and drop boot files (Bootloader.boot_file_writer and
    # drop_boot_files): the same calls with the checkpoint left out
    monkeypatch.setattr(base, "atomic_writer", lambda path, mode=0o644, *, boot=False:
                        fsutil.atomic_writer(path, mode))
    monkeypatch.setattr(base, "remove", lambda path, *, boot=False: fsutil.remove(path))
    out = sweep(bench, "apply-over-without-checkpoint", lambda r: _committed_b(bench, r),
                lambda r, s: bench.apply(r, s, "3.0"), figures=False, until_brick=True)
    assert any("holds no complete image" in b for b in out.bricks), out.bricks[:3]


# ---------------------------------------------------------------- one real cut, in QEMU

REAL_CUT_BOOT = 240  # seconds one boot of the Python guest may take under TCG (apply included)

APPLY_NEXT = """#!/bin/sh
# after the boot hook: apply /data/next.tar if the host left one there
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ -f /data/next.tar ]; then
  echo "{marker} applying"
  abupgrade apply /data/next.tar </dev/null >/dev/console 2>&1
  echo "{marker} applied rc=$?"
fi
"""


def guest_that_applies(work: Path, key: KeyPair, wheel: Path, boot: Any) -> Path:
    """Version 1.0 of the Python guest, which also runs `abupgrade apply /data/next.tar`."""
    from fixtures import pyguest
    from fixtures.guest import MARKER, make_ext4_image
    from fixtures.images import signed_image

    tree = pyguest.guest_tree(work / "v1.tree", version="1.0", wheel=wheel)
    script = tree / pyguest.GUEST_DIR / "apply-next"
    script.write_text(APPLY_NEXT.format(marker=MARKER))
    script.chmod(0o755)
    inittab = tree / "etc/inittab"
    report = f"::wait:/{pyguest.GUEST_DIR}/report"
    text = inittab.read_text()
    assert report in text, text
    inittab.write_text(text.replace(report, f"::wait:/{pyguest.GUEST_DIR}/apply-next\n{report}"))
    ext4 = make_ext4_image(work / "v1.ext4", tree, pyguest.IMAGE_SIZE, "rootfs")
    shutil.rmtree(tree)
    return signed_image(work / "v1.tar", ext4, key, version="1.0", compatible="test-box",
                        kernel=boot.kernel, initrd=boot.initrd, compression="zstd")


def _qemu_pid(log: Path) -> int | None:
    """The QEMU this test started, found by its own serial log path."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f"file:{log}".encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                return int(proc.name)
    return None


@pytest.mark.boot
@pytest.mark.loop
def test_qemu_killed_in_the_middle_of_an_apply_in_the_guest(tmp_path: Path) -> None:
    """A real cut: the guest runs `abupgrade apply`; QEMU is killed once slot B's first bytes
    have changed on the disk image; the next boot is on slot A (1.0), healthy, and the host
    can apply again."""
    import signal
    import threading
    import time

    from abupgrade.disk import open_disk
    from abupgrade.partitions import read_table
    from fixtures import pyguest
    from fixtures.guest import QEMU, qemu_boot
    from fixtures.machine import run_cli

    needs(loop=True, tools=(QEMU, "debootstrap", "grub-mkimage"))
    with guest_skips():
        key = keypair(tmp_path / "keys")
        boot = pyguest.boot_files(tmp_path / "boot-files")
        wheel = pyguest.build_wheel(tmp_path / "wheel")
        v1 = guest_that_applies(tmp_path, key, wheel, boot)
        v2 = pyguest.signed_guest_image(tmp_path / "v2.tar", key, version="2.0", wheel=wheel,
                                        boot=boot)

    disk = tmp_path / "disk.img"
    made = run_cli("disk", "init", str(disk), "--bootloader", "grub", "--size", "1G",
                   "--slot-size", pyguest.SLOT_SIZE, "--image", str(v1),
                   "--pubkey", str(key.public))
    assert made.returncode == 0, made.stderr
    with open_disk(disk) as session:
        shutil.copyfile(v2, session.config.state_dir.parent / "next.tar")
    table = read_table(disk)
    assert table is not None
    slot_b = sorted(table.partitions, key=lambda p: p.number)[-2]  # ..., a, b, data
    with open(disk, "rb") as f:
        f.seek(slot_b.start)
        b_before = f.read(1 << 20)

    log = tmp_path / "cut.log"
    result: list[str] = []
    qemu = threading.Thread(target=lambda: result.append(
        qemu_boot(disk, log, timeout=2 * REAL_CUT_BOOT, no_reboot=True)))
    qemu.start()
    killed_after = None
    started = time.monotonic()
    try:
        while qemu.is_alive() and time.monotonic() - started < 2 * REAL_CUT_BOOT:
            with open(disk, "rb") as f:
                f.seek(slot_b.start)
                if f.read(1 << 20) != b_before:  # the writer has begun on slot B
                    time.sleep(2)
                    pid = _qemu_pid(log)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed_after = time.monotonic() - started
                    break
            time.sleep(0.5)
    finally:
        qemu.join(timeout=2 * REAL_CUT_BOOT + 30)
    text = log.read_text(errors="replace") if log.exists() else ""
    tail = "\n".join(text.splitlines()[-30:])
    assert killed_after is not None, f"slot B was never written; serial log tail:\n{tail}"
    assert "applied rc=" not in text, f"the apply finished before the cut:\n{tail}"

    status = json.loads(run_cli("--disk", str(disk), "status", "--json").stdout)
    assert status["next_boot"] == "A" and status["trial"] is None, status
    assert status["slots"]["B"]["state"] != "good", status
    with open_disk(disk) as session:
        (session.config.state_dir.parent / "next.tar").unlink()

    text = qemu_boot(disk, tmp_path / "after.log", timeout=REAL_CUT_BOOT, no_reboot=True)
    boots = pyguest.reports(text)
    tail = "\n".join(text.splitlines()[-30:])
    assert [(b.slot, b.version) for b in boots] == [("A", "1.0")], tail
    assert boots[0].status is not None and boots[0].status["booted"] == "A", tail
    again = run_cli("--disk", str(disk), "apply", str(v2))
    assert again.returncode == 0, again.stderr
    record("qemu", "grub", tried=1, bricks=0)
    print(f"\nQEMU killed {killed_after:.0f} s into the boot, mid-apply; the next boot ran "
          "slot A (1.0) and a new apply succeeded")
