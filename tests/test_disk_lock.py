"""One abupgrade per `--disk` target: the target itself is locked before anything attaches
it, and a disk with a partition mounted anywhere - through another loop device of the same
image file too - or held by a QEMU is refused (exit 4): one ext4 mounted twice is a
corruption, and so is a disk written under a running virtual machine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abupgrade import disk
from abupgrade.partitions import read_table
from fixtures.guest import QEMU
from fixtures.tiers import any_bootloader, needs

pytestmark = pytest.mark.loop


def attached_loops(image: Path) -> list[str]:
    real = str(image.resolve())
    return [b.parent.parent.name for b in Path("/sys/block").glob("loop*/loop/backing_file")
            if b.read_text().strip() == real]


@any_bootloader
def test_a_second_apply_on_a_disk_image_in_use_is_refused(
        ab_disk: Path, make_image: Callable[..., Path]) -> None:
    """The first run reads its image from stdin and is held there, the disk attached, while
    the second starts: refused, exit 4, one line on stderr; then the first applies, and the
    history has one trial armed."""
    image = make_image("2.0")
    first = subprocess.Popen([sys.executable, "-m", "abupgrade", "--disk", str(ab_disk),
                              "apply", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert first.stdin is not None and first.stderr is not None
    try:
        deadline = time.monotonic() + 120
        while not attached_loops(ab_disk):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first apply never attached the disk"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "abupgrade", "--disk", str(ab_disk),
                                 "apply", str(image)], capture_output=True, text=True,
                                timeout=600)
        first.stdin.write(image.read_bytes())
        first.stdin.close()
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 4, second.stderr
    assert "another abupgrade is working on" in second.stderr, second.stderr
    assert second.stderr.count("\n") == 1, second.stderr
    events = json.loads(subprocess.run(
        [sys.executable, "-m", "abupgrade", "--disk", str(ab_disk), "history", "--json"],
        capture_output=True, text=True, check=True).stdout)
    assert [e["event"] for e in events].count("trial-armed") == 1, events


@pytest.fixture
def mounted_elsewhere(ab_disk: Path) -> Iterator[str]:
    """The disk's data partition mounted through a loop device of its own, at its offset."""
    needs(loop=True)
    table = read_table(ab_disk)
    assert table is not None
    data = sorted(table.partitions, key=lambda p: p.number)[-1]
    loop = subprocess.run(["losetup", "-f", "--show", "-o", str(data.start), "--sizelimit",
                           str(data.size), str(ab_disk)], capture_output=True, text=True,
                          check=True).stdout.strip()
    point = ab_disk.parent / "elsewhere"
    point.mkdir()
    try:
        subprocess.run(["mount", loop, str(point)], check=True)
        try:
            yield loop
        finally:
            subprocess.run(["umount", str(point)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


@any_bootloader
def test_a_disk_mounted_through_another_loop_device_is_refused(
        ab_disk: Path, mounted_elsewhere: str, make_image: Callable[..., Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "abupgrade", "--disk", str(ab_disk), "apply",
                           str(make_image("2.0"))], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4, proc.stderr
    assert f"{mounted_elsewhere} is mounted on" in proc.stderr, proc.stderr


def qemu_holds(image: Path) -> bool:
    """Whether an OFD lock (QEMU's kind) is on `image`, as /proc/locks lists them."""
    st = image.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return any("OFDLCK" in line and inode in line
               for line in Path("/proc/locks").read_text().splitlines())


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def paused_qemu(image: Path, *options: str) -> subprocess.Popen[str]:
    """A QEMU with `image` as its disk, paused before the first instruction (-S): it opens
    and locks the image as a running virtual machine does, and never boots."""
    return subprocess.Popen([QEMU, "-S", "-display", "none", "-nodefaults", "-drive",
                             f"file={image},format=raw,if=virtio" + "".join(options)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@any_bootloader
@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "read-only"])
def test_a_disk_image_a_qemu_has_open_is_refused(ab_disk: Path, readonly: bool,
                                                 make_image: Callable[..., Path]) -> None:
    """QEMU locks its images with OFD byte-range locks, which flock does not see: a QEMU
    that has the disk open - for writing, or read-only (it then keeps others from writing) -
    makes `apply` refuse, exit 4, one line naming QEMU; the image is not touched."""
    needs(tools=[QEMU])
    image = make_image("2.0")
    before = sha256(ab_disk)
    qemu = paused_qemu(ab_disk, ",readonly=on" if readonly else "")
    try:
        deadline = time.monotonic() + 60
        while not qemu_holds(ab_disk):
            assert qemu.poll() is None, qemu.communicate()[1]
            assert time.monotonic() < deadline, "QEMU never locked the disk image"
            time.sleep(0.05)
        proc = subprocess.run([sys.executable, "-m", "abupgrade", "--disk", str(ab_disk),
                               "apply", str(image)], capture_output=True, text=True,
                              timeout=600)
    finally:
        qemu.kill()
        qemu.communicate()
    assert proc.returncode == 4, proc.stderr
    name = Path(QEMU).name[:15]  # the kernel keeps 15 characters of a command name
    assert f"{name} (pid {qemu.pid}) holds QEMU's image lock" in proc.stderr, proc.stderr
    assert ("keeps others from writing it" if readonly else "writes it") in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert sha256(ab_disk) == before


def test_a_qemu_started_on_a_disk_abupgrade_holds_refuses_it(tmp_path: Path) -> None:
    """abupgrade holds QEMU's image lock itself while it works on a disk: a virtual machine
    started meanwhile does not get the disk (QEMU's own error)."""
    needs(tools=[QEMU])
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with disk.locked(image):
        qemu = paused_qemu(image)
        try:
            _, err = qemu.communicate(timeout=60)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.communicate()
    assert qemu.returncode != 0, "QEMU opened a disk abupgrade holds"
    assert 'Failed to get "write" lock' in err, err
