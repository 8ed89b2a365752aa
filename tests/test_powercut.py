"""Power cuts at every write of apply, commit, rollback, mark-bad and the boot hook, both
bootloaders (see fixtures/powercut.py for the storage model and what it leaves out).

The machine is plain files: `boot/` (GRUB's two env blocks, or extlinux.conf and a stand-in
ldlinux.sys whose last 1024 bytes are the ADV), `data/abupgrade` (state_dir) and the slots
`slots/A.img`, `slots/B.img`. `slots.resolve` accepts only block devices, so the test hands
abupgrade's own operations (ops.apply, ops.boot_hook, ...) a System whose slot devices are
those files - the one layer swapped out; everything from there down (ImageReader, SlotWriter,
the backends, the state store, the hook) is the code that runs on a machine.

After each cut the machine is powered on: GRUB is the model of grub.cfg in test_grub_model
(both blocks also listed by the real `grub-editenv`), syslinux the model in
test_syslinux_model; the slot it boots must hold one image completely (rootfs, kernel and
initrd of the same version), never a half-written one. Then the boot hook runs on that slot,
state.json and every history line must parse, and a new apply must succeed and boot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from abupgrade import ops
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.adv import Adv
from abupgrade.bootloader.grub import GrubConfig, block_paths, create_blocks
from abupgrade.bootloader.syslinux import SyslinuxConfig, fresh_config
from abupgrade.bootloader.uboot import EnvState, UBootConfig, updated
from abupgrade.bootloader.ubootenv import format_copy
from abupgrade.config import Config, HealthConfig, SystemConfig
from abupgrade.errors import AbupgradeError, HealthFailed
from abupgrade.image import build
from abupgrade.model import Slot
from abupgrade.progress import NullProgress
from abupgrade.results import HookResult
from abupgrade.state import Store
from abupgrade.system import Options, System, bootloader_of
from fixtures.grub_model import ModelGrub, grub_iterate
from fixtures.images import KeyPair, keypair
from fixtures.powercut import Recorder, cut_points, read_tree, tree_digest, write_tree
from fixtures.reliability import record
from fixtures.syslinux_model import Disk, model_boot
from fixtures.tiers import guest_skips, needs
from fixtures.uboot_model import power_on as uboot_power_on

SLOT_SIZE = 256 << 10
COMPATIBLE = "pc-box"
GRUB_ENV = "boot/grub/grubenv"
EXTLINUX = "boot/extlinux"
UBOOT_ENV = "boot/uboot.env"  # both copies of the U-Boot environment, UBOOT_SIZE each
UBOOT_SIZE = 0x4000
STATE = "data/abupgrade"


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class Image:
    version: str
    tar: Path
    rootfs: bytes
    kernel: bytes
    initrd: bytes


def make_image(base: Path, key: KeyPair, version: str) -> Image:
    # random bytes with a zero run: the writer skips and punches holes there
    rootfs = os.urandom(64 << 10) + bytes(48 << 10) + os.urandom(40 << 10)
    files = {}
    for name, data in (("rootfs", rootfs), ("kernel", os.urandom(6000)),
                       ("initrd", os.urandom(3000))):
        files[name] = base / f"{version}.{name}"
        files[name].write_bytes(data)
    tar = base / f"{version}.tar"
    build.build(files["rootfs"], version, COMPATIBLE, [key.private], tar,
                kernel=files["kernel"], initrd=files["initrd"])
    return Image(version, tar, rootfs, files["kernel"].read_bytes(), files["initrd"].read_bytes())


# ---------------------------------------------------------------- the machine as files


class FileSystem(System):
    def is_in_use(self, device: Path) -> bool:
        return False  # plain files stand for the slots: nothing mounts them


@dataclass
class Bench:
    kind: BootloaderKind
    work: Path
    key: KeyPair
    images: dict[str, Image]
    keyring: Path = field(init=False)

    def __post_init__(self) -> None:
        self.keyring = self.work / "keys"
        self.keyring.mkdir(exist_ok=True)
        shutil.copy(self.key.public, self.keyring / "signer.pub")
        self.host = self.work / "host"  # cmdline, mountinfo, boot id: outside the disk
        self.host.mkdir(exist_ok=True)
        (self.host / "mountinfo").write_text("22 1 0:0 / / rw,relatime - ext4 /dev/root rw\n")
        self.no_checks = self.work / "no-checks"
        self.no_checks.mkdir(exist_ok=True)
        self.failing = self.work / "failing-checks"
        (self.failing / "required.d").mkdir(parents=True, exist_ok=True)
        check = self.failing / "required.d" / "10-fail"
        check.write_text("#!/bin/sh\necho 'app: port 443 closed' >&2\nexit 1\n")
        check.chmod(0o755)

    # -- layout

    def template(self, root: Path) -> None:
        if root.exists():
            shutil.rmtree(root)
        for slot in Slot:
            (self.boot_dir(root) / "slots" / slot.value).mkdir(parents=True)
        (root / STATE).mkdir(parents=True)
        (root / "slots").mkdir()
        for slot in Slot:
            (root / "slots" / f"{slot.value}.img").write_bytes(bytes(SLOT_SIZE))
        if self.kind is BootloaderKind.GRUB:
            create_blocks(root / GRUB_ENV)
        elif self.kind is BootloaderKind.UBOOT:
            fresh = updated({}, EnvState(default=Slot.A, good=frozenset({Slot.A})))
            (root / UBOOT_ENV).write_bytes(b"".join(format_copy(fresh, UBOOT_SIZE, flags)
                                                    for flags in (1, 2)))
        else:
            (root / EXTLINUX / "ldlinux.sys").write_bytes(b"\x90" * 4096 + Adv().encode_pair())
            roots = {s: f"/dev/vda{n}" for s, n in ((Slot.A, 2), (Slot.B, 3))}
            (root / EXTLINUX / "extlinux.conf").write_text(fresh_config(roots, "console=ttyS0"))

    def boot_dir(self, root: Path) -> Path:
        return {BootloaderKind.GRUB: (root / GRUB_ENV).parent, BootloaderKind.SYSLINUX:
                root / EXTLINUX, BootloaderKind.UBOOT: root / "boot"}[self.kind]

    def config(self, root: Path, checks: Path) -> Config:
        return Config(
            compatible=COMPATIBLE, bootloader=self.kind,
            slots={s: f"/dev/plain-file-{s.value}" for s in Slot},
            keyring=self.keyring, state_dir=root / STATE,
            bootloaders={BootloaderKind.GRUB: GrubConfig(env=root / GRUB_ENV, tries=3),
                         BootloaderKind.SYSLINUX: SyslinuxConfig(dir=root / EXTLINUX),
                         BootloaderKind.UBOOT: UBootConfig(
                             env=tuple(f"{root / UBOOT_ENV} {off:#x} {UBOOT_SIZE:#x}"
                                       for off in (0, UBOOT_SIZE)),
                             dir=root / "boot", tries=3)},
            health=HealthConfig(dir=checks, timeout=10, deadline=120,
                                watchdog=self.work / "no-watchdog"),
            system=SystemConfig(cmdline=self.host / "cmdline", mountinfo=self.host / "mountinfo",
                                boot_id=self.host / "boot_id", reboot=("true",)),
        )

    @contextlib.contextmanager
    def machine(self, root: Path, booted: Slot | None, checks: Path | None = None
                ) -> Iterator[System]:
        """ops.* see this machine, booted from `booted` (None: serviced offline)."""
        cfg = self.config(root, checks or self.no_checks)
        devices = {s: root / "slots" / f"{s.value}.img" for s in Slot}

        def open_files(options: Options, *, readonly: bool = False, mount: bool = False) -> Any:
            return contextlib.nullcontext(FileSystem(cfg, booted, booted is None, bootloader_of(cfg),
                                                     Store(cfg.state_dir), dict(devices)))

        (self.host / "boot_id").write_text(f"{uuid.uuid4()}\n")
        # ops looks open_system up at each call: the one layer this test swaps
        saved = ops.__dict__["open_system"]
        setattr(ops, "open_system", open_files)  # noqa: B010
        try:
            yield open_files(Options()).enter_result
        finally:
            setattr(ops, "open_system", saved)  # noqa: B010

    # -- operations

    def init(self, root: Path) -> None:
        """What `disk init --image` does: 1.0 into slot A, committed."""
        self.template(root)
        with self.machine(root, None) as system:
            ops._install(system, system.store.load(), str(self.images["1.0"].tar), Slot.A,
                         progress=NullProgress(), dry_run=False, allow_downgrade=True,
                         committed=None)
            ops._commit(system, Slot.A, "first image")

    def apply(self, root: Path, booted: Slot, version: str) -> None:
        with self.machine(root, booted):
            ops.apply(Options(), str(self.images[version].tar), allow_downgrade=False,
                      dry_run=False, reboot=False, progress=NullProgress())

    def hook(self, root: Path, booted: Slot, checks: Path | None = None) -> HookResult:
        with self.machine(root, booted, checks):
            return ops.boot_hook(Options(), reboot=False)

    # -- power on

    def power_on(self, root: Path, *, editenv: bool = False) -> tuple[Slot | None, str]:
        """What the bootloader boots now (its own writes included), and why not if nothing."""
        if self.kind is BootloaderKind.GRUB:
            paths = block_paths(root / GRUB_ENV)
            if editenv:
                for path in paths:
                    agree_with_grub_editenv(path)
            decision = ModelGrub(paths).boot()
            slot: Slot | None = decision.boot
            if slot is not None and not self.loads(root, slot):
                slot = decision.fallback
            return slot, f"GRUB chose {decision}"
        if self.kind is BootloaderKind.UBOOT:
            chosen = uboot_power_on(root / UBOOT_ENV, UBOOT_SIZE, lambda s: self.loads(root, s))
            return chosen.boot, f"boot.scr chose {chosen}"
        loader = root / EXTLINUX / "ldlinux.sys"
        raw = loader.read_bytes()
        disk = Disk((root / EXTLINUX / "extlinux.conf").read_text(), raw[-1024:],
                    frozenset(s for s in Slot if self.loads(root, s)))
        booted = model_boot(disk)
        loader.write_bytes(raw[:-1024] + booted.disk.pair)
        return booted.slot, f"syslinux booted {booted}"

    def loads(self, root: Path, slot: Slot) -> bool:
        """The bootloader finds the slot's kernel and initrd (their contents are checked
        by `complete`)."""
        return all((self.boot_dir(root) / "slots" / slot.value / f).is_file()
                   for f in ("vmlinuz", "initrd.img"))

    def complete(self, root: Path, slot: Slot) -> str | None:
        """The version `slot` holds completely (rootfs, kernel, initrd), or None."""
        data = (root / "slots" / f"{slot.value}.img").read_bytes()
        files = self.boot_dir(root) / "slots" / slot.value
        for image in self.images.values():
            if (data[:len(image.rootfs)] == image.rootfs
                    and (files / "vmlinuz").read_bytes() == image.kernel
                    and (files / "initrd.img").read_bytes() == image.initrd):
                return image.version
        return None


def agree_with_grub_editenv(path: Path) -> None:
    """The real grub-editenv reads the block as the model does (or refuses it likewise)."""
    data = path.read_bytes()
    proc = subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True,
                          check=False, timeout=30)
    if not data.startswith(b"# GRUB Environment Block\n"):
        assert proc.returncode != 0, f"grub-editenv read a block without signature: {path}"
        return
    assert proc.returncode == 0, proc.stderr
    listed = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert listed == dict(grub_iterate(data)), (listed, data[:200])


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
    bricks: list[str] = field(default_factory=list)  # booted nothing or a half-written slot
    failures: list[str] = field(default_factory=list)  # hook/state/next apply went wrong


def after_cut(bench: Bench, disk: Path, out: Outcome, where: str) -> None:
    slot, why = bench.power_on(disk, editenv=bench.kind is BootloaderKind.GRUB)
    if slot is None or bench.complete(disk, slot) is None:
        out.bricks.append(f"{where}: boots {slot} which holds no complete image ({why})")
        return
    try:
        bench.hook(disk, slot)
        state_parses(disk, torn_tail=True)
        slot, why = bench.power_on(disk)
        assert slot is not None and bench.complete(disk, slot), f"after the hook: {why}"
        bench.hook(disk, slot)
        bench.apply(disk, slot, "9.0")
        new, why = bench.power_on(disk)
        assert new == slot.other and bench.complete(disk, new) == "9.0", why
        result = bench.hook(disk, new)
        assert result.outcome == "committed", result
        state_parses(disk, torn_tail=False)
    except (AbupgradeError, AssertionError, ValueError, KeyError) as exc:
        out.failures.append(f"{where}: {type(exc).__name__}: {exc}")


def sweep(bench: Bench, name: str, prepare: Callable[[Path], Slot],
          operation: Callable[[Path, Slot], object], *, figures: bool = True) -> Outcome:
    """Record `operation` on the machine `prepare` leaves, then cut before every log entry."""
    root = bench.work / "run"
    booted = prepare(root)
    recorder = Recorder(root)
    with recorder.active():
        operation(root, booted)
    recorder.verify()
    out = Outcome()
    seen: set[str] = set()
    disk = bench.work / "cut"
    for n, what, tree in cut_points(recorder.start, recorder.root, recorder.log):
        out.cuts += 1
        digest = tree_digest(tree)
        if digest in seen:
            continue
        seen.add(digest)
        out.states += 1
        bench.template(disk)
        write_tree(disk, tree)
        op = recorder.log[n] if n < len(recorder.log) else "the end"
        after_cut(bench, disk, out, f"{name} cut before #{n} ({str(op)[:80]}), {what}")
    if figures:
        record("powercut", f"{bench.kind}/{name}", tried=out.cuts, states=out.states,
               log=len(recorder.log), bricks=len(out.bricks), failures=len(out.failures))
    print(f"\n{bench.kind} {name}: {len(recorder.log)} writes/syncs logged, {out.cuts} cuts, "
          f"{out.states} distinct states, {len(out.bricks)} bricks, {len(out.failures)} failures")
    return out


# ---------------------------------------------------------------- scenarios


def _boot_until(bench: Bench, root: Path, slot: Slot) -> Slot:
    for _ in range(12):
        booted, why = bench.power_on(root)
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
    return key, {v: make_image(base, key, v) for v in ("1.0", "2.0", "9.0")}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("kind", list(BootloaderKind), ids=str)
def test_power_cut_at_every_write(kind: BootloaderKind, scenario: str, work: Path,
                                  images: tuple[KeyPair, dict[str, Image]]) -> None:
    if kind is BootloaderKind.GRUB:
        needs(tools=("grub-editenv",))
    key, made = images
    bench_dir = work / f"{kind}-{scenario}"
    bench_dir.mkdir()
    bench = Bench(kind, bench_dir, key, made)
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
    states = {(n, what): tree["f"] for n, what, tree in
              cut_points(recorder.start, recorder.root, recorder.log)}
    assert states[(1, "all pending lost")] == b"aaaa"
    assert states[(2, "all pending lost")] == b"bbbb"
    assert states[(3, "all pending lost")] == b"bbbb"
    assert states[(3, "all pending kept")] == b"cccc"
    assert states[(3, "last write torn at byte 2")] == b"ccbb"
    assert hashlib.sha256(read_tree(root)["f"]).digest()  # the real file is readable


def test_sweep_finds_a_slot_written_without_fsync(
        work: Path, images: tuple[KeyPair, dict[str, Image]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep can fail: with the writer's fsync gone, a cut after the trial is armed
    leaves an armed slot whose bytes never reached the disk, and the sweep says so."""
    key, made = images
    bench_dir = work / "no-fsync"
    bench_dir.mkdir()
    bench = Bench(BootloaderKind.GRUB, bench_dir, key, made)
    monkeypatch.setattr("abupgrade.writer._sync", lambda out: out.flush())
    out = sweep(bench, "apply-without-fsync", lambda r: _initialised(bench, r),
                lambda r, s: bench.apply(r, s, "2.0"), figures=False)
    assert out.bricks, "a slot written without fsync went unnoticed"


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
