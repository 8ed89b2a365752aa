"""Benchmark: a v1 -> v2 update over the network, abupgrade's delta against a full apply,
casync and zchunk, and the physical floor.

The releases are bench/releases.py's: a Debian rootfs (v1) and the same after a security
update (v2), `rebuilt` by mkfs or updated `in-place`. Every tool updates the same loop
partition - slot B of a disk made by `abupgrade disk init --image v1` (slot A active, v1) -
which holds v1 too (`--target v1`, a machine whose other slot has the previous release) or
nothing (`--target empty`). Measured per tool:

- downloaded: every byte the server sent, counted by a TCP proxy in front of it (headers
  included; each tool's server-side index and chunks too);
- written: sectors the kernel wrote to slot B (/sys/block/.../stat), in bytes;
- seconds: wall time of the client's whole job (for zchunk: making the seed's header, the
  download, unzck and the copy to the slot);
- the slot's sha256 after the run must be v2's.

Tools: `abupgrade delta` (oci://, a local docker-registry), `abupgrade full` (the same image
streamed whole), `casync extract --seed=SLOT_A` (store over HTTP; casync also seeds from
what the output already holds), `zckdl -s SEED.zck` (SEED.zck made from slot A on the
client, the way SWUpdate's delta handler does). Floors: bytes of v2 in neither slot, zstd -19
(and -3); blocks of v2 that differ from slot B's.

    python bench/bench_delta.py [--scenario rebuilt,in-place] [--target v1,empty]
                                [--skip casync,zchunk,full] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from releases import releases  # noqa: E402

from abupgrade import oci  # noqa: E402
from abupgrade.delta.blocks import BlockCache  # noqa: E402
from abupgrade.delta.image import IndexedImage  # noqa: E402
from abupgrade.delta.index import BLOCK  # noqa: E402
from abupgrade.delta.install import Delta, SlotSource  # noqa: E402
from abupgrade.delta.remote import OciRanges  # noqa: E402
from abupgrade.image.keys import Keyring  # noqa: E402
from abupgrade.model import Slot  # noqa: E402
from fixtures.files import serve  # noqa: E402
from fixtures.images import keypair, signed_image  # noqa: E402
from fixtures.machine import running_machine  # noqa: E402
from fixtures.registry import CuttingProxy, registry  # noqa: E402

MiB = 1 << 20
COMPATIBLE = "bench-box"


@dataclass
class Result:
    downloaded: int
    written: int
    seconds: float
    requests: int = 0


@dataclass(frozen=True)
class Floor:
    missing_blocks: int  # blocks of v2 in neither slot
    zstd19: int
    zstd3: int
    changed_blocks: int  # blocks of v2 that differ from slot B's


def digest_blocks(path: Path, size: int) -> list[bytes]:
    with path.open("rb") as f:
        data = f.read(size)
    view = memoryview(data)
    return [hashlib.sha256(view[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK)]


def floor(v1: Path, v2: Path, target: Path, size: int) -> Floor:
    h1, h2, ht = digest_blocks(v1, size), digest_blocks(v2, size), digest_blocks(target, size)
    zero = hashlib.sha256(bytes(BLOCK)).digest()
    local = set(h1) | set(ht)
    missing = [i for i, h in enumerate(h2) if h != zero and h not in local]
    with v2.open("rb") as f:
        data = b"".join(_pread(f, i * BLOCK) for i in missing)
    return Floor(len(missing), len(zstandard.ZstdCompressor(level=19).compress(data)),
                 len(zstandard.ZstdCompressor(level=3).compress(data)),
                 sum(1 for i in range(len(h2)) if h2[i] != ht[i]))


def _pread(f: object, offset: int) -> bytes:
    assert hasattr(f, "seek") and hasattr(f, "read")
    f.seek(offset)
    data: bytes = f.read(BLOCK)
    return data


def sectors_written(device: Path) -> int:
    """Bytes the kernel wrote to a block device (a loop partition too) since it appeared."""
    name = device.resolve().name
    stat = Path(f"/sys/class/block/{name}/stat").read_text().split()
    return int(stat[6]) * 512


def sha256_of(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        left = size
        while left and (data := f.read(min(left, 4 * MiB))):
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def run(argv: list[str], *, cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout)[-1500:]}")


def measure(device: Path, proxy: CuttingProxy, job: Callable[[], int]) -> Result:
    """Run `job` (which returns its request count) and count what it cost."""
    os.sync()
    before, got = sectors_written(device), proxy.downloaded
    started = time.monotonic()
    requests = job()
    seconds = time.monotonic() - started
    os.sync()
    return Result(proxy.downloaded - got, sectors_written(device) - before, round(seconds, 2),
                  requests)


# ------------------------------------------------------------------ the tools


def abupgrade_delta(reference: str, keyring: Keyring, state: Path, active: SlotSource,
                    target: SlotSource, gap: int | None = None) -> int:
    """The delta path in this process: plan, assemble, write what differs, read back.
    (Until apply drives it, this bench writes the pieces itself, comparing before writing.)"""
    ranges = OciRanges(reference)
    if gap is not None:
        ranges.gap = gap
    image = IndexedImage(ranges, keyring)
    delta = Delta(image, BlockCache(state / "blocks"), target=target, active=active)
    plan = delta.plan()
    fd = os.open(target.device, os.O_RDWR | os.O_CLOEXEC)
    try:
        at = 0
        for piece in delta.pieces(plan):
            data = piece.data
            if not piece.in_place:
                for block in range(0, len(data), BLOCK):
                    new = data[block:block + BLOCK]
                    if os.pread(fd, len(new), at + block) != new:
                        os.pwrite(fd, new, at + block)
            at += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    delta.done()
    return ranges.requests


@contextlib.contextmanager
def slot_b_as(device: Path, content: Path | None, size: int) -> Iterator[None]:
    """Put v1 (or zeros) into slot B before a run."""
    if content is None:
        run(["blkdiscard", "-z", "-l", str(size), str(device)])
    else:
        run(["dd", f"if={content}", f"of={device}", "bs=4M", "conv=fsync", "status=none"])
    yield


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenario", default="rebuilt,in-place")
    parser.add_argument("--target", default="v1,empty")
    parser.add_argument("--skip", default="", help="comma list of: full, casync, zchunk")
    parser.add_argument("--workdir", type=Path, help="keeps built images between runs")
    parser.add_argument("--gaps", default="", help="also run the delta merging ranges this "
                        "close (comma list of bytes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    gaps = [int(g) for g in filter(None, args.gaps.split(","))]
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root for loop devices")
    skip = set(filter(None, args.skip.split(",")))
    for tool in ["docker-registry", "blkdiscard"] + [t for t, k in
                                                   (("casync", "casync"), ("zck", "zchunk"),
                                                    ("zckdl", "zchunk"), ("unzck", "zchunk"))
                                                   if k not in skip]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (ABUPGRADE_BENCH=1 scripts/setup)")
    report: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="abupgrade-bench-delta-")))
        work.mkdir(parents=True, exist_ok=True)
        for scenario in filter(None, args.scenario.split(",")):
            for target in filter(None, args.target.split(",")):
                name = f"{scenario}/{target}"
                report[name] = figures = bench(work, scenario, target, skip, gaps)
                if not args.json:
                    print_table(name, figures)  # as soon as they are known
    if args.json:
        print(json.dumps(report, indent=2))


def print_table(name: str, figures: dict[str, object]) -> None:
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    fl = figures["floor"]
    assert isinstance(fl, dict)
    print(f"\n{name}: v2 blocks in neither slot {fl['missing_blocks'] * BLOCK / MiB:.1f} MiB "
          f"(zstd -19 {fl['zstd19'] / MiB:.2f} MiB, -3 {fl['zstd3'] / MiB:.2f} MiB); "
          f"blocks of v2 that differ from slot B: {fl['changed_blocks'] * BLOCK / MiB:.1f} MiB")
    print(f"{'tool':18} {'downloaded MiB':>15} {'x floor-19':>10} {'written MiB':>12} "
          f"{'x changed':>9} {'seconds':>8} {'requests':>9}")
    changed = max(1, int(str(fl["changed_blocks"])) * BLOCK)
    for tool, value in figures["tools"].items():  # type: ignore[attr-defined]
        r = Result(**value)
        print(f"{tool:18} {r.downloaded / MiB:15.2f} {r.downloaded / int(str(fl['zstd19'])):10.2f} "
              f"{r.written / MiB:12.1f} {r.written / changed:9.2f} {r.seconds:8.2f} "
              f"{r.requests or '':>9}", flush=True)


def bench(work: Path, scenario: str, target_kind: str, skip: set[str],
          gaps: list[int]) -> dict[str, object]:
    made = releases()
    v1, v2 = made.v1, {"rebuilt": made.rebuilt, "in-place": made.in_place}[scenario]
    size = v1.stat().st_size
    signer = keypair(work / "keys")
    v1_tar, v2_tar = work / "v1.tar", work / f"v2-{scenario}.tar"
    for tar, img, version in ((v1_tar, v1, "1.0"), (v2_tar, v2, "2.0")):
        if not tar.exists():
            signed_image(tar, img, signer, version=version, compatible=COMPATIBLE,
                         compression="zstd")
    v2_sha = sha256_of(v2, size)
    tools: dict[str, Result] = {}
    with contextlib.ExitStack() as stack:
        reg = stack.enter_context(registry(work / f"registry-{scenario}-{target_kind}"))
        reference = f"oci://{reg.host}/bench/os:2.0"
        oci.push(v2_tar, reference)
        port = int(reg.host.rsplit(":", 1)[1])
        proxy = stack.enter_context(CuttingProxy(port, after=0, cuts=0))
        via_proxy = f"oci://{proxy.host}/bench/os:2.0"
        disk = work / "disk.img"
        run([sys.executable, "-m", "abupgrade", "disk", "init", str(disk), "--bootloader", "grub",
             "--size", str(2 * size + 512 * MiB), "--slot-size", str(size), "--image", str(v1_tar),
             "--pubkey", str(signer.public), "--force"])
        machine = stack.enter_context(running_machine(disk, work / "machine", booted=Slot.A))
        dev_a, dev_b = machine.device(Slot.A), machine.device(Slot.B)
        keyring = Keyring.from_files([signer.public])
        v1_sha = sha256_of(v1, size)
        content = v1 if target_kind == "v1" else None
        with slot_b_as(dev_b, content, size):
            fl = floor(v1, v2, dev_b, size)

        def check(tool: str) -> None:
            if sha256_of(dev_b, size) != v2_sha:
                raise SystemExit(f"{tool} left slot B different from v2")

        state = work / f"state-{scenario}-{target_kind}"
        shutil.rmtree(state, ignore_errors=True)
        with slot_b_as(dev_b, content, size):
            target = SlotSource(dev_b, v1_sha if content else None)
            tools["abupgrade delta"] = measure(dev_b, proxy, lambda: abupgrade_delta(
                via_proxy, keyring, state, SlotSource(dev_a, v1_sha), target))
        check("abupgrade delta")
        with slot_b_as(dev_b, content, size):
            target = SlotSource(dev_b, v1_sha if content else None)
            tools["abupgrade delta (cached)"] = measure(dev_b, proxy, lambda: abupgrade_delta(
                via_proxy, keyring, state, SlotSource(dev_a, v1_sha), target))
        check("abupgrade delta (cached)")
        for gap in gaps:
            with slot_b_as(dev_b, content, size):
                target = SlotSource(dev_b, v1_sha if content else None)
                tools[f"abupgrade gap={gap}"] = measure(
                    dev_b, proxy, functools.partial(abupgrade_delta, via_proxy, keyring, state,
                                                    SlotSource(dev_a, v1_sha), target, gap))
        if "full" not in skip:
            with slot_b_as(dev_b, content, size):
                def full() -> int:
                    proc = machine.cli("--quiet", "apply", via_proxy)
                    if proc.returncode != 0:
                        raise SystemExit(f"abupgrade apply failed: {proc.stderr}")
                    machine.cli("--quiet", "mark-bad", "B")
                    return 0
                tools["abupgrade full"] = measure(dev_b, proxy, full)
            check("abupgrade full")
        files = work / f"served-{scenario}"
        if "casync" not in skip:
            if not (files / "v2.caibx").exists():
                files.mkdir(exist_ok=True)
                run(["casync", "make", f"--store={files / 'store'}", str(files / "v2.caibx"), str(v2)])
            with serve(files) as server, CuttingProxy(server.port, after=0, cuts=0) as fproxy, \
                    slot_b_as(dev_b, content, size):
                url = f"http://{fproxy.host}"
                tools["casync"] = measure(dev_b, fproxy, lambda: _casync(url, dev_a, dev_b, server))
            check("casync")
        if "zchunk" not in skip:
            if not (files / "v2.zck").exists():
                files.mkdir(exist_ok=True)
                run(["zck", "-o", str(files / "v2.zck"), str(v2)])
            with serve(files) as server, CuttingProxy(server.port, after=0, cuts=0) as fproxy, \
                    slot_b_as(dev_b, content, size):
                url = f"http://{fproxy.host}/v2.zck"
                tools["zchunk"] = measure(dev_b, fproxy, lambda: _zchunk(url, dev_a, dev_b, work,
                                                                        server))
            check("zchunk")
    return {"floor": asdict(fl), "tools": {name: asdict(r) for name, r in tools.items()},
            "image_bytes": v2_tar.stat().st_size}


def _casync(url: str, dev_a: Path, dev_b: Path, server: object) -> int:
    before = getattr(server, "requests", 0)
    run(["casync", "extract", f"--store={url}/store", f"--seed={dev_a}", f"{url}/v2.caibx",
         str(dev_b)])
    return int(getattr(server, "requests", 0)) - int(before)


def _zchunk(url: str, dev_a: Path, dev_b: Path, work: Path, server: object) -> int:
    before = getattr(server, "requests", 0)
    scratch = work / "zchunk"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    run(["zck", "-o", str(scratch / "seed.zck"), str(dev_a)])
    run(["zckdl", "-q", "-s", str(scratch / "seed.zck"), url], cwd=scratch)
    unzck = subprocess.Popen(["unzck", "-c", str(scratch / "v2.zck")], stdout=subprocess.PIPE)
    dd = subprocess.run(["dd", f"of={dev_b}", "bs=4M", "iflag=fullblock", "conv=fsync",
                         "status=none"], stdin=unzck.stdout, check=False)
    if unzck.wait() != 0 or dd.returncode != 0:
        raise SystemExit("unzck | dd failed")
    shutil.rmtree(scratch)
    return int(getattr(server, "requests", 0)) - int(before)


if __name__ == "__main__":
    main()
