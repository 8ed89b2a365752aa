"""apply on real loop devices, both bootloaders: the bytes land, status tells the truth, every
refusal refuses, nothing is written by a rejected image, and a killed apply never boots."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from abupgrade.disk import attached, boot_partition, mounted
from abupgrade.model import Slot
from abupgrade.partitions import EFI_SYSTEM, read_table
from abupgrade.state import Store
from fixtures.images import keypair
from fixtures.machine import run_cli, running_machine, status_json
from fixtures.sdboot import read_image

pytestmark = pytest.mark.loop

SLOT_PART = {"A": -3, "B": -2}  # GPT: ... rootfs_a, rootfs_b, data; MBR: boot, a, b, data


def slot_bytes(disk: Path, slot: str, length: int) -> bytes:
    table = read_table(disk)
    assert table is not None
    part = sorted(table.partitions, key=lambda p: p.number)[SLOT_PART[slot]]
    with open(disk, "rb") as f:
        f.seek(part.start)
        return f.read(length)


def payload_of(image: Path) -> bytes:
    """The rootfs payload bytes of an uncompressed test image, found by its sha256."""
    from abupgrade.image.reader import inspect

    with open(image, "rb") as f:
        info = inspect(f, None)
    slot = info.manifest.slot
    data = image.read_bytes()
    rootfs = image.with_name(image.name.removesuffix(".tar") + ".ext4").read_bytes()
    assert hashlib.sha256(rootfs).hexdigest() == slot.sha256 and len(data) > slot.size
    return rootfs


def boot_state(disk: Path) -> dict[str, str]:
    """sha256 of every file on the boot filesystem, of the disk before its first partition
    (U-Boot's environment is there; a boot filesystem starting at 1 MiB is not: mounting it
    writes its superblock) and of every file on the ESP (read with mtools) if there is one:
    the bootloader's whole state."""
    table = read_table(disk)
    assert table is not None
    head = min(p.start for p in table.partitions)
    with open(disk, "rb") as f:
        out = {"<before the partitions>": hashlib.sha256(f.read(head)).hexdigest()}
    with attached(disk) as d, tempfile.TemporaryDirectory() as scratch:
        boot_nr = boot_partition(table, disk)
        with mounted(d.partitions[boot_nr], readonly=True) as root:
            for path in sorted(root.rglob("*")):
                if path.is_file() and "lost+found" not in path.parts:
                    out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        for part in table.partitions:
            if part.type == EFI_SYSTEM:
                files, _ = read_image(d.partitions[part.number], Path(scratch))
                out |= {f"ESP/{name}": hashlib.sha256(data).hexdigest()
                        for name, data in files.items()}
    return out


def test_apply_through_disk_writes_the_slot_and_arms_a_trial(
        ab_disk: Path, make_image: Callable[..., Path]) -> None:
    image = make_image("2.0")
    proc = run_cli("--disk", str(ab_disk), "apply", str(image), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["slot"] == "B" and result["version"] == "2.0"
    rootfs = payload_of(image)
    assert slot_bytes(ab_disk, "B", len(rootfs)) == rootfs
    status = status_json("--disk", str(ab_disk))
    assert status["booted"] is None
    assert status["next_boot"] == "B" and status["trial"] == "B"
    slots = status["slots"]
    assert isinstance(slots, dict)
    assert slots["A"]["state"] == "good" and slots["A"]["version"] == "1.0"
    assert slots["B"]["state"] == "trial" and slots["B"]["version"] == "2.0"
    history = json.loads(run_cli("--disk", str(ab_disk), "history", "--json").stdout)
    assert [e["event"] for e in history][-2:] == ["installed", "trial-armed"]
    assert os.popen("losetup -l -n -O BACK-FILE").read().count(str(ab_disk)) == 0


def test_apply_on_a_running_machine_finds_slots_by_their_names(
        ab_disk: Path, make_image: Callable[..., Path], tmp_path: Path) -> None:
    image = make_image("2.0", compression="zstd")
    with running_machine(ab_disk, tmp_path / "m", booted=Slot.A) as machine:
        proc = machine.cli("apply", str(image))
        assert proc.returncode == 0, proc.stderr
        status = json.loads(machine.cli("status", "--json").stdout)
        assert status["booted"] == "A" and status["trial"] == "B"
    rootfs = image.with_name(image.name.removesuffix(".tar") + ".ext4").read_bytes()
    assert slot_bytes(ab_disk, "B", len(rootfs)) == rootfs


def test_apply_from_stdin(ab_disk: Path, make_image: Callable[..., Path]) -> None:
    proc = run_cli("--disk", str(ab_disk), "apply", "-", stdin=make_image("2.0").read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert status_json("--disk", str(ab_disk))["trial"] == "B"


def test_dry_run_writes_nothing(ab_disk: Path, make_image: Callable[..., Path]) -> None:
    before_slot = slot_bytes(ab_disk, "B", 1 << 20)
    before_boot = boot_state(ab_disk)
    proc = run_cli("--disk", str(ab_disk), "apply", "--dry-run", str(make_image("2.0")))
    assert proc.returncode == 0, proc.stderr
    assert "nothing was written" in proc.stdout
    assert slot_bytes(ab_disk, "B", 1 << 20) == before_slot
    assert boot_state(ab_disk) == before_boot


def _refused(disk: Path, *args: str) -> subprocess.CompletedProcess[str]:
    before_slot = hashlib.sha256(slot_bytes(disk, "B", 64 << 20)).hexdigest()
    before_boot = boot_state(disk)
    proc = run_cli("--disk", str(disk), "apply", *args)
    assert hashlib.sha256(slot_bytes(disk, "B", 64 << 20)).hexdigest() == before_slot
    assert boot_state(disk) == before_boot, "a refused apply changed the bootloader state"
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc


def test_refusals_leave_slot_and_bootloader_untouched(
        ab_disk: Path, make_image: Callable[..., Path], tmp_path: Path) -> None:
    proc = _refused(ab_disk, str(make_image("2.0", compatible="other-box")))
    assert proc.returncode == 4 and "other-box" in proc.stderr
    proc = _refused(ab_disk, str(make_image("0.9")))
    assert proc.returncode == 4 and "older" in proc.stderr
    proc = _refused(ab_disk, str(make_image("2.0", size=80 << 20)))
    assert proc.returncode == 4 and "larger than slot" in proc.stderr
    stranger = keypair(tmp_path / "stranger")
    proc = _refused(ab_disk, str(make_image("2.0", key=stranger)))
    assert proc.returncode == 3 and "trusted" in proc.stderr

    tampered = tmp_path / "tampered.tar"
    data = bytearray(make_image("2.0").read_bytes())
    with tarfile.open(make_image("2.0")) as archive:
        at = archive.getmember("rootfs").offset_data
    data[at + 1100] ^= 0x01  # one bit of the rootfs' superblock: a byte the update needs
    tampered.write_bytes(data)
    before_boot = boot_state(ab_disk)
    proc = run_cli("--disk", str(ab_disk), "apply", str(tampered))
    assert proc.returncode == 3 and "does not match its blake3" in proc.stderr, proc.stderr
    # the hash mismatch shows only at the end of the payload: the slot was written, but the
    # bootloader was never pointed at it and still boots A
    after = status_json("--disk", str(ab_disk))
    assert after["next_boot"] == "A" and after["trial"] is None
    assert after["slots"]["B"]["state"] in ("empty", "bad")  # type: ignore[index]
    assert before_boot.keys() == boot_state(ab_disk).keys()

    # a downgrade goes through when asked for
    proc = run_cli("--disk", str(ab_disk), "apply", "--allow-downgrade", str(make_image("0.9")))
    assert proc.returncode == 0, proc.stderr


def test_pending_trial_and_lock_refuse(ab_disk: Path, make_image: Callable[..., Path],
                                       tmp_path: Path) -> None:
    with running_machine(ab_disk, tmp_path / "m", booted=Slot.A) as machine:
        assert machine.cli("apply", str(make_image("2.0"))).returncode == 0
        proc = machine.cli("apply", str(make_image("3.0")))
        assert proc.returncode == 4 and "trial" in proc.stderr
        assert machine.cli("mark-bad", "B").returncode == 0  # cancels the trial
        with Store(machine.config.state_dir).lock():
            started = time.monotonic()
            proc = machine.cli("apply", str(make_image("3.0")))
            assert proc.returncode == 4 and "lock" in proc.stderr
            assert time.monotonic() - started < 10
        assert machine.cli("apply", str(make_image("3.0"))).returncode == 0


def test_refuses_a_mounted_target(ab_disk: Path, make_image: Callable[..., Path],
                                  tmp_path: Path) -> None:
    with running_machine(ab_disk, tmp_path / "m", booted=Slot.A) as machine:
        target = machine.device(Slot.B)
        rdev = target.stat().st_rdev
        with open(machine.config.system.mountinfo, "a") as f:
            f.write(f"30 22 {os.major(rdev)}:{os.minor(rdev)} / /mnt rw - ext4 {target} rw\n")
        proc = machine.cli("apply", str(make_image("2.0")))
        assert proc.returncode == 4 and "mounted" in proc.stderr


@pytest.fixture
def big_image(make_image: Callable[..., Path]) -> Path:
    return make_image("5.0", size=48 << 20)


def _feed_then(disk: Path, image: Path, fraction: float, sig: int) -> subprocess.Popen[bytes]:
    """Start `apply -`, feed it `fraction` of the image, let it drain, then send `sig`."""
    proc = subprocess.Popen([sys.executable, "-m", "abupgrade", "--disk", str(disk), "apply", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    data = image.read_bytes()
    proc.stdin.write(data[: int(len(data) * fraction)])
    proc.stdin.flush()
    time.sleep(1.5)
    proc.send_signal(sig)
    proc.stdin.close()
    proc.wait(timeout=60)
    return proc


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.7, 0.99])
def test_killed_apply_never_boots_the_half_written_slot(
        ab_disk: Path, big_image: Path, fraction: float) -> None:
    proc = _feed_then(ab_disk, big_image, fraction, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    status = status_json("--disk", str(ab_disk))
    assert status["next_boot"] == "A" and status["trial"] is None
    assert status["slots"]["B"]["state"] != "good"  # type: ignore[index]
    _leftover_loops_detached(ab_disk)
    again = run_cli("--disk", str(ab_disk), "apply", str(big_image))
    assert again.returncode == 0, again.stderr
    assert status_json("--disk", str(ab_disk))["trial"] == "B"


def _leftover_loops_detached(disk: Path) -> None:
    """SIGKILL skips our cleanup; detach what the killed run left attached to this file."""
    for line in os.popen("losetup -l -n -O NAME,BACK-FILE").read().splitlines():
        name, _, back = line.partition(" ")
        if back.strip() == str(disk):
            subprocess.run(["sh", "-c", f"umount {name}p* 2>/dev/null; partx -d {name}; "
                                        f"losetup -d {name}"], check=False)


def test_sigterm_stops_cleanly_and_the_next_apply_works(ab_disk: Path, big_image: Path) -> None:
    proc = _feed_then(ab_disk, big_image, 0.5, signal.SIGTERM)
    assert proc.returncode == 1
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert "SIGTERM" in err and len(err.strip().splitlines()) == 1, err
    history = json.loads(run_cli("--disk", str(ab_disk), "history", "--json").stdout)
    assert history[-1]["event"] == "interrupted" and history[-1]["slot"] == "B"
    status = status_json("--disk", str(ab_disk))
    assert status["next_boot"] == "A" and status["trial"] is None
    assert os.popen("losetup -l -n -O BACK-FILE").read().count(str(ab_disk)) == 0
    again = run_cli("--disk", str(ab_disk), "apply", str(big_image))
    assert again.returncode == 0, again.stderr


def test_rollback_and_mark_commands(ab_disk: Path, make_image: Callable[..., Path],
                                    tmp_path: Path) -> None:
    with running_machine(ab_disk, tmp_path / "m", booted=Slot.A) as machine:
        assert machine.cli("rollback").returncode == 4  # B holds nothing good yet
        assert machine.cli("apply", str(make_image("2.0"))).returncode == 0
        machine.boot(Slot.B)
        proc = machine.cli("mark-good")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(machine.cli("status", "--json").stdout)
        assert status["next_boot"] == "B" and status["slots"]["B"]["state"] == "good"
        proc = machine.cli("rollback")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(machine.cli("status", "--json").stdout)
        assert status["next_boot"] == "A" and status["slots"]["B"]["state"] == "good"
        machine.boot(Slot.A)
        proc = machine.cli("mark-bad", "A")  # allowed: B is good and takes over
        assert proc.returncode == 0, proc.stderr
        status = json.loads(machine.cli("status", "--json").stdout)
        assert status["next_boot"] == "B" and status["slots"]["A"]["state"] == "bad"
        assert machine.cli("mark-bad", "B").returncode == 4  # the last good slot stays
        events = [e["event"] for e in json.loads(machine.cli("history", "--json").stdout)]
        assert events[-3:] == ["committed", "manual-rollback", "marked-bad"]

