"""Benchmark: abupgrade's slot writer against `dd bs=4M conv=fsync` and `bmaptool copy`.

All tools write the same ext4 image (default 1 GiB, about 60% full of random data) into the
same loop partition, in alternating order, several rounds. Reported: median wall time, the
ratio to dd, and each tool's peak RSS. Figures on a loop device are page-cache figures:
compare the ratios, not the absolute times. Needs root, loop devices, mkfs.ext4, bmaptool.

    python bench/bench_apply.py [--size-mib 1024] [--fill 0.6] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abupgrade.disk import attached, mkfs_ext4  # noqa: E402
from abupgrade.partitions import LINUX_FS, PartitionSpec, TableKind, create_table  # noqa: E402
from abupgrade.writer import SlotWriter  # noqa: E402

MiB = 1024 * 1024


def build_image(work: Path, size: int, fill: float) -> Path:
    """An ext4 image of `size` bytes with `fill` of it in random files."""
    tree = work / "tree"
    tree.mkdir()
    rng = random.Random(42)
    left = int(size * fill)
    index = 0
    while left > 0:
        n = min(left, 8 * MiB)
        (tree / f"f{index:05d}.bin").write_bytes(rng.randbytes(n))
        left -= n
        index += 1
    image = work / "fs.img"
    mkfs_ext4(image, "bench", root_dir=tree, size=size)
    shutil.rmtree(tree)
    return image


def file_chunks(path: Path, size: int = MiB) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def sha256_of(path: Path, limit: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        left = limit
        while left:
            chunk = f.read(min(left, 4 * MiB))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def child_ours(image: Path, device: Path, sha256: str, verify: bool) -> None:
    size = image.stat().st_size
    with SlotWriter(device, verify=verify) as writer:
        writer.write_payload(size, sha256, file_chunks(image))


def timed(argv: list[str], work: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command.

    GNU time measures the RSS: a child forked from this (large) Python process would
    report the parent's pages it held before exec as its own peak.
    """
    report = work / "rss"
    start = time.monotonic()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *argv], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    return seconds, int(report.read_text().split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--fill", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child-ours", nargs=4, metavar=("IMAGE", "DEVICE", "SHA256", "VERIFY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ours:
        image, device, sha, verify = args.child_ours
        child_ours(Path(image), Path(device), sha, verify == "1")
        return
    for tool in ("bmaptool", "dd", "mkfs.ext4", "losetup", "partx", "sfdisk", "/usr/bin/time"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="abupgrade-bench-") as tmp:
        work = Path(tmp)
        image = build_image(work, size, args.fill)
        bmap = work / "fs.bmap"
        subprocess.run(["bmaptool", "-q", "create", "-o", str(bmap), str(image)], check=True)
        sha = sha256_of(image, size)
        disk = work / "disk.img"
        with disk.open("wb") as f:
            f.truncate(size + 4 * MiB)
        create_table(disk, TableKind.GPT, [PartitionSpec(size + MiB, LINUX_FS, "bench")])
        with attached(disk) as attached_disk:
            dev = str(attached_disk.partitions[1])
            me = [sys.executable, str(Path(__file__).resolve()), "--child-ours", str(image), dev,
                  sha]
            tools = {
                "abupgrade": me + ["1"],
                "abupgrade (no read-back)": me + ["0"],
                "dd bs=4M conv=fsync": ["dd", f"if={image}", f"of={dev}", "bs=4M", "conv=fsync",
                                        "status=none"],
                "bmaptool copy": ["bmaptool", "-q", "copy", "--bmap", str(bmap), str(image), dev],
            }
            names = list(tools)
            times: dict[str, list[float]] = {n: [] for n in names}
            rss: dict[str, int] = dict.fromkeys(names, 0)
            for rnd in range(args.rounds):
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                for name in order:
                    subprocess.run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=8",
                                    "status=none", "conv=fsync"], check=True)  # dirty the start
                    seconds, peak = timed(tools[name], work)
                    times[name].append(seconds)
                    rss[name] = max(rss[name], peak)
                    # bmaptool leaves unmapped blocks as they were: only the others must match
                    if rnd == 0 and "bmaptool" not in name and sha256_of(Path(dev), size) != sha:
                        raise SystemExit(f"{name} wrote wrong bytes")
    base = statistics.median(times["dd bs=4M conv=fsync"])
    report = {name: {"median_s": round(statistics.median(t), 3), "runs_s": [round(x, 3) for x in t],
                     "ratio_to_dd": round(statistics.median(t) / base, 2),
                     "peak_rss_mib": round(rss[name] / 1024, 1)} for name, t in times.items()}
    if args.json:
        print(json.dumps({"size_mib": args.size_mib, "fill": args.fill, "tools": report},
                         indent=2))
        return
    print(f"{args.size_mib} MiB ext4, {args.fill:.0%} full, {args.rounds} rounds")
    print(f"{'tool':28} {'median s':>9} {'vs dd':>7} {'peak RSS MiB':>13}")
    for name, r in report.items():
        print(f"{name:28} {r['median_s']:9.2f} {r['ratio_to_dd']:7.2f} {r['peak_rss_mib']:13.1f}")


if __name__ == "__main__":
    main()
