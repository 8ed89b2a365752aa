"""When does a bootloader see a file replaced on a loop-mounted boot filesystem?

GRUB and syslinux read ext2/3/4 without replaying its journal: a rename that sits in the
journal is not there for them. For each way of making a change durable this makes a boot
filesystem the way `disk init` does (ext4, 4 KiB blocks; or without a journal), mounts it on a
loop device, replaces `extlinux.conf` (temp file, write, fsync, rename, fsync the folder),
runs the option's extra step, and then reads the file every `--poll` seconds from the image
file with `debugfs`, which replays no journal - as the bootloader would after a power cut at
that moment. Printed per option: the cost of the step and how long until the new file was
there for the reader (or that it never was within `--wait` seconds).

    .venv/bin/python bench/bench_bootfs.py [--wait 40] [--poll 0.5] [--json]

Needs root (loop devices, mounts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abupgrade import fsutil  # noqa: E402

OLD = b"DEFAULT a\n# old\n"
NEW = b"DEFAULT b\n# new\n"


@contextlib.contextmanager
def boot_fs(work: Path, features: list[str]) -> Iterator[tuple[Path, Path]]:
    image = work / "boot.img"
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", *features, str(image), "64M"],
                   check=True, capture_output=True)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    point = Path(tempfile.mkdtemp(dir=work))
    try:
        subprocess.run(["mount", device, str(point)], check=True)
        try:
            (point / "extlinux.conf").write_bytes(OLD)
            subprocess.run(["sync"], check=True)
            subprocess.run(["umount", str(point)], check=True)  # the old file at home
            subprocess.run(["mount", device, str(point)], check=True)
            yield image, point
        finally:
            subprocess.run(["umount", str(point)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        point.rmdir()


def seen_by_bootloader(image: Path) -> bytes:
    proc = subprocess.run(["debugfs", "-R", "cat /extlinux.conf", str(image)],
                          capture_output=True, check=False)
    return proc.stdout


def replace_file(point: Path) -> None:
    with fsutil.atomic_writer(point / "extlinux.conf") as out:
        out.write(NEW)


def _fd_ioctl(point: Path, request: int, arg: int = 0) -> None:
    import fcntl

    fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, arg)
    finally:
        os.close(fd)


def syncfs(point: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)


def freeze_thaw(point: Path) -> None:
    _fd_ioctl(point, fsutil.FIFREEZE)
    _fd_ioctl(point, fsutil.FITHAW)


def checkpoint(point: Path) -> None:
    fsutil.checkpoint(point)


OPTIONS: dict[str, tuple[list[str], Callable[[Path], None] | None]] = {
    "fsync file + folder (before the fix)": ([], None),
    "+ syncfs": ([], syncfs),
    "+ FIFREEZE/FITHAW": ([], freeze_thaw),
    "+ EXT4_IOC_CHECKPOINT (fsutil.checkpoint)": ([], checkpoint),
    "no journal (-O ^has_journal), fsync only": (["-O", "^has_journal"], None),
}


def measure(work: Path, features: list[str], step: Callable[[Path], None] | None,
            wait: float, poll: float) -> dict[str, float | None]:
    with boot_fs(work, features) as (image, point):
        assert seen_by_bootloader(image) == OLD, "the old file is not at home after umount"
        started = time.monotonic()
        replace_file(point)
        step_started = time.monotonic()
        if step is not None:
            step(point)
        done = time.monotonic()
        while time.monotonic() - done < wait:
            if seen_by_bootloader(image) == NEW:
                return {"write_s": step_started - started, "step_s": done - step_started,
                        "visible_after_s": time.monotonic() - done}
            time.sleep(poll)
        return {"write_s": step_started - started, "step_s": done - step_started,
                "visible_after_s": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wait", type=float, default=40.0)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-bootfs-") as tmp:
        for name, (features, step) in OPTIONS.items():
            results[name] = measure(Path(tmp), features, step, args.wait, args.poll)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'option':45} {'step':>9} {'bootloader sees the new file after'}")
    for name, r in results.items():
        seen = r["visible_after_s"]
        when = f"{seen:.1f} s" if seen is not None else f"not within {args.wait:g} s"
        print(f"{name:45} {(r['step_s'] or 0) * 1000:7.1f}ms {when}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
