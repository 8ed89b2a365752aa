"""One abupgrade per `--disk` target: the target itself is locked before anything attaches
it, and a disk with a partition mounted anywhere - through another loop device of the same
image file too - is refused (exit 4): one ext4 mounted twice is a corruption."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abupgrade.partitions import read_table
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
