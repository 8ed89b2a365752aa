"""Benchmark: `verify` of a 1 GiB uncompressed image against bare hash passes over its payload.

Makes the payload (incompressible data mixed with zeros) and a signed image (format 3: BLAKE3
and SHA-256 digests, both of which verify checks) in a work folder, then times, medians of
`--runs`: the library's verify, a hashlib sha256 read of the payload file, the same read of the
payload's bytes inside the image (same file offsets as verify reads: page-aligned and unaligned
reads can differ in kernel time), that read with BLAKE3 and SHA-256 both (what verify hashes),
and `sha256sum`. Python passes
run in a fresh child process each, which reports its peak resident memory (VmHWM). The files
are read from the page cache after the first pass, so the figures compare CPU cost, not the
disk.

    python bench/bench_verify.py [--size-mib 1024] [--runs 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def child(mode: str, path: Path, pubkey: Path | None) -> None:
    """Run one pass in this process and print {"seconds", "hwm_kib", "before_kib"} as JSON."""
    from abupgrade.image.keys import Keyring
    from abupgrade.image.reader import verify

    before = vm_hwm_kib()
    start = time.perf_counter()
    if mode == "verify":
        assert pubkey is not None
        with path.open("rb") as stream:
            verify(stream, Keyring.from_files([pubkey]))
    else:
        from abupgrade.image.manifest import blake3_hasher

        digests = [hashlib.sha256(), *([blake3_hasher()] if mode == "both-in-image" else [])]
        buffer = memoryview(bytearray(CHUNK))
        with path.open("rb") as stream:
            left = -1
            if mode != "hashlib":  # the payload's bytes where they sit in the image
                stream.seek(payload_offset(stream))
                left = payload_size(stream)
            while left and (n := stream.readinto(buffer[: left if 0 < left < CHUNK else CHUNK])):
                for digest in digests:
                    digest.update(buffer[:n])
                left -= n
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "hwm_kib": vm_hwm_kib(), "before_kib": before}))


def payload_offset(stream: BinaryIO) -> int:
    """Where the first payload's data starts: after manifest.json, manifest.sig, its header."""
    from abupgrade.image.tar import BLOCK, decode_header, padding

    offset = 0
    for _ in range(2):
        stream.seek(offset)
        header = decode_header(stream.read(BLOCK), offset)
        assert header is not None
        offset += BLOCK + header.size + padding(header.size)
    return offset + BLOCK


def payload_size(stream: BinaryIO) -> int:
    from abupgrade.image.tar import BLOCK, decode_header

    position = stream.tell()
    stream.seek(position - BLOCK)
    header = decode_header(stream.read(BLOCK), position - BLOCK)
    assert header is not None
    return header.size


def make_payload(path: Path, size: int) -> None:
    """Three MiB of random bytes, then one MiB of zeros, repeated."""
    with path.open("wb") as out:
        for index in range(size // CHUNK):
            out.write(bytes(CHUNK) if index % 4 == 3 else os.urandom(CHUNK))


def run_child(mode: str, path: Path, pubkey: Path | None) -> dict[str, float]:
    argv = [sys.executable, __file__, "--child", mode, str(path)]
    if pubkey is not None:
        argv += ["--pubkey", str(pubkey)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def run_sha256sum(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    modes = ["verify", "hashlib", "hashlib-in-image", "both-in-image"]
    parser.add_argument("--child", choices=modes, help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pubkey", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.pubkey)
        return

    from abupgrade.image import keys
    from abupgrade.image.build import build

    workdir = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.workdir))
    try:
        payload = workdir / "rootfs.img"
        image = workdir / "image.tar"
        t0 = time.perf_counter()
        make_payload(payload, args.size_mib * CHUNK)
        private, public = keys.generate(workdir / "bench")
        t1 = time.perf_counter()
        build(payload, "1.0", "bench", [private], image, compression="none", index=False)
        t2 = time.perf_counter()
        print(f"payload {args.size_mib} MiB made in {t1 - t0:.1f}s, image built in {t2 - t1:.1f}s")
        run_sha256sum(image)  # warm the page cache for both files
        run_sha256sum(payload)

        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        sha256sum_runs: list[float] = []
        for _ in range(args.runs):  # interleaved, so load from elsewhere hits all alike
            runs["verify"].append(run_child("verify", image, public))
            runs["hashlib"].append(run_child("hashlib", payload, None))
            runs["hashlib-in-image"].append(run_child("hashlib-in-image", image, None))
            runs["both-in-image"].append(run_child("both-in-image", image, None))
            sha256sum_runs.append(run_sha256sum(payload))

        times = {mode: statistics.median(r["seconds"] for r in runs[mode]) for mode in modes}
        times["sha256sum"] = statistics.median(sha256sum_runs)
        mib = args.size_mib
        print(f"medians of {args.runs} runs over {mib} MiB (page cache warm):")
        for label, seconds in times.items():
            print(f"  {label:17s} {seconds:7.3f}s  {mib / seconds:7.0f} MiB/s")
        for label in ("hashlib", "hashlib-in-image", "both-in-image", "sha256sum"):
            print(f"  verify / {label:17s} = {times['verify'] / times[label]:.3f}")
        for label in modes:
            peak = max(r["hwm_kib"] for r in runs[label]) / 1024
            base = max(r["before_kib"] for r in runs[label]) / 1024
            print(f"  peak RSS {label:17s} {peak:6.1f} MiB (after imports: {base:.1f} MiB)")
    finally:
        if args.keep:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
