"""Benchmark: a v1 -> v2 update over the network, abupgrade's delta against a full apply,
casync and zchunk, and the physical floor.

The releases are bench/releases.py's: a Debian rootfs (v1) and the same after a security
update (v2), `rebuilt` by mkfs or updated `in-place`. Every tool updates slot B of a fresh
copy of one disk made by `abupgrade disk init --image v1` (slot A committed and running),
where slot B holds v1 too, installed by abupgrade (`--target v1`), or was never written
(`--target empty`). Measured per tool:

- downloaded: every byte the server sent, counted by a TCP proxy in front of it (headers
  included; each tool's index, chunk lists and chunks);
- written: sectors the kernel wrote to slot B (/sys/class/block/.../stat), in bytes;
- seconds: wall time of the client's whole job (for abupgrade the `apply` command: start,
  signature, policy, the slot read back, the trial armed; for zchunk: making the seed's
  header, the download, unzck and the copy to the slot);
- then the slot's sha256 must be v2's.

Tools: `abupgrade delta` (`apply oci://...` of an image with its index, slot A's block digests
cached as a first delta leaves them), `abupgrade delta, slots read` (no cache: the slots are
read first), `abupgrade full` (`apply` of the same release built `--no-index`, as before delta
updates), `casync extract --seed=SLOT_A` (store over HTTP; casync also seeds from what the
output holds), `zckdl -s SEED.zck` (SEED.zck made from slot A on the client, as SWUpdate's
delta handler does). Floors: the bytes of v2 in neither slot, zstd -19 (and -3); the blocks
of v2 that differ from slot B's.

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
from abupgrade.delta.blocks import BlockCache, read_slot  # noqa: E402
from abupgrade.delta.index import BLOCK  # noqa: E402
from abupgrade.delta.install import BLOCKS_FOLDER  # noqa: E402
from abupgrade.image import build  # noqa: E402
from abupgrade.image.manifest import FORMATS  # noqa: E402
from abupgrade.model import Slot  # noqa: E402
from abupgrade.partitions import read_table  # noqa: E402
from fixtures.files import serve  # noqa: E402
from fixtures.images import KeyPair, keypair  # noqa: E402
from fixtures.machine import Machine, running_machine  # noqa: E402
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


def digest_blocks(path: Path, size: int, offset: int = 0) -> list[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    view = memoryview(data)
    return [hashlib.sha256(view[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK)]


def floor(v1: Path, v2: Path, target: Path, offset: int, size: int) -> Floor:
    h1, h2 = digest_blocks(v1, size), digest_blocks(v2, size)
    ht = digest_blocks(target, size, offset)
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


def sha256_of(path: Path, size: int, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = size
        while left and (data := f.read(min(left, 4 * MiB))):
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def slot_b(machine: Machine) -> tuple[Path, int]:
    """Where slot B lies in the disk image file behind the loop device: what a machine
    booting that disk reads, not the partition device a tool wrote through."""
    table = read_table(machine.disk)
    assert table is not None
    return machine.disk, next(p for p in table.partitions if p.name == "rootfs_b").start


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


def apply_cli(machine: Machine, spec: str) -> dict[str, object]:
    """`abupgrade apply --json SPEC` on the machine, then the trial ended (for the next run)."""
    proc = machine.cli("apply", "--json", spec)
    if proc.returncode != 0:
        raise SystemExit(f"abupgrade apply {spec} failed: {proc.stderr}")
    result: dict[str, object] = json.loads(proc.stdout)
    machine.cli("mark-bad", "B")
    return result


def template(work: Path, v1_tar: Path, signer: KeyPair, size: int, slot_b: str) -> Path:
    """A disk made by `disk init --image v1` (A committed); slot B holds v1 too (installed by
    abupgrade, its trial ended) or nothing. Slot A's block digests are in the cache, as the
    first delta apply after installing v1 leaves them."""
    disk = work / f"template-{slot_b}.img"
    if disk.exists():
        return disk
    building = disk.with_suffix(".building")
    run([sys.executable, "-m", "abupgrade", "disk", "init", str(building), "--bootloader", "grub",
         "--size", str(2 * size + 512 * MiB), "--slot-size", str(size), "--image", str(v1_tar),
         "--pubkey", str(signer.public), "--force"])
    with running_machine(building, work / "machine", booted=Slot.A) as machine:
        if slot_b == "v1":
            apply_cli(machine, str(v1_tar))  # a delta from the local file: leaves the caches
        else:
            state = json.loads((machine.config.state_dir / "state.json").read_text())
            sha = state["slots"]["A"]["sha256"]
            BlockCache(machine.config.state_dir / BLOCKS_FOLDER).save(
                sha, read_slot(machine.device(Slot.A), size))
    building.rename(disk)
    return disk


@contextlib.contextmanager
def fresh(work: Path, disk: Path, *, cached: bool = True) -> Iterator[Machine]:
    """A copy of the template disk, running from slot A."""
    copy = work / "disk.img"
    run(["cp", "--sparse=always", str(disk), str(copy)])
    with running_machine(copy, work / "machine", booted=Slot.A) as machine:
        if not cached:
            shutil.rmtree(machine.config.state_dir / BLOCKS_FOLDER, ignore_errors=True)
        yield machine


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenario", default="rebuilt,in-place")
    parser.add_argument("--target", default="v1,empty")
    parser.add_argument("--skip", default="", help="comma list of: full, casync, zchunk")
    parser.add_argument("--workdir", type=Path, help="keeps built images between runs")
    parser.add_argument("--link-mbit", type=float, default=0,
                        help="pace each connection to this link speed (0: as fast as it goes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
                report[name] = figures = bench(work, scenario, target, skip,
                                               args.link_mbit * 1e6 / 8 or None)
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
    print(f"{'tool':28} {'downloaded MiB':>15} {'x floor-19':>10} {'written MiB':>12} "
          f"{'x changed':>9} {'seconds':>8} {'requests':>9}")
    changed = max(1, int(str(fl["changed_blocks"])) * BLOCK)
    for tool, value in figures["tools"].items():  # type: ignore[attr-defined]
        r = Result(**value)
        print(f"{tool:28} {r.downloaded / MiB:15.2f} {r.downloaded / int(str(fl['zstd19'])):10.2f} "
              f"{r.written / MiB:12.1f} {r.written / changed:9.2f} {r.seconds:8.2f} "
              f"{r.requests or '':>9}", flush=True)
    reported = figures.get("reported")
    assert isinstance(reported, dict)
    for tool, result in reported.items():
        keys = ("bytes_downloaded", "bytes_written", "bytes_reused_from_target",
                "bytes_copied_from_active")
        print(f"  {tool} says: " + ", ".join(f"{k[6:]} {result.get(k, 0) / MiB:.1f} MiB"
                                              for k in keys) + f", update {result.get('update')}")


def bench(work: Path, scenario: str, target_kind: str, skip: set[str],
          rate: float | None) -> dict[str, object]:
    made = releases()
    v1, v2 = made.v1, {"rebuilt": made.rebuilt, "in-place": made.in_place}[scenario]
    # what is kept between runs belongs to these releases, in the images' current format
    work = work / f"{made.folder.name}-format{FORMATS[-1]}"
    work.mkdir(exist_ok=True)
    size = v1.stat().st_size
    signer = keypair(work / "keys")
    v1_tar, v2_tar = work / "v1.tar", work / f"v2-{scenario}.tar"
    full_tar = work / f"v2-{scenario}-full.tar"
    for tar, img, version, index in ((v1_tar, v1, "1.0", True), (v2_tar, v2, "2.0", True),
                                     (full_tar, v2, "2.0", False)):
        if not tar.exists():
            build.build(img, version, COMPATIBLE, [signer.private], tar, compression="zstd",
                        index=index)
    v2_sha = sha256_of(v2, size)
    disk = template(work, v1_tar, signer, size, target_kind)
    tools: dict[str, Result] = {}
    reported: dict[str, dict[str, object]] = {}
    def check(tool: str, machine: Machine) -> None:
        path, offset = slot_b(machine)
        if sha256_of(path, size, offset) != v2_sha:
            raise SystemExit(f"{tool} left slot B different from v2")

    with fresh(work, disk) as machine:
        fl = floor(v1, v2, *slot_b(machine), size)
    runs = [("abupgrade delta", v2_tar, True), ("abupgrade delta, slots read", v2_tar, False)]
    if "full" not in skip:
        runs.append(("abupgrade full", full_tar, True))
    for name, tar, cached in runs:
        # a registry of its own for each run: a long-lived one looks like an orphan to others
        with registry(work / "registry") as reg, fresh(work, disk, cached=cached) as machine:
            oci.push(tar, f"oci://{reg.host}/bench/os:2.0")
            port = int(reg.host.rsplit(":", 1)[1])
            with CuttingProxy(port, after=0, cuts=0, rate=rate) as proxy:
                spec = f"oci://{proxy.host}/bench/os:2.0"
                tools[name] = measure(machine.device(Slot.B), proxy, functools.partial(
                    _abupgrade, machine, spec, reported.setdefault(name, {}), proxy))
            check(name, machine)
        shutil.rmtree(work / "registry")
    files = work / f"served-{scenario}"
    files.mkdir(exist_ok=True)
    if "casync" not in skip:
        if not (files / "v2.caibx").exists():
            run(["casync", "make", f"--store={files / 'store'}", str(files / "v2.caibx"), str(v2)])
        with fresh(work, disk) as machine, serve(files) as server, \
                CuttingProxy(server.port, after=0, cuts=0, rate=rate) as fproxy:
            url = f"http://{fproxy.host}"
            tools["casync"] = measure(machine.device(Slot.B), fproxy, functools.partial(
                _casync, url, machine.device(Slot.A), machine.device(Slot.B), fproxy))
            check("casync", machine)
    if "zchunk" not in skip:
        if not (files / "v2.zck").exists():
            run(["zck", "-o", str(files / "v2.zck"), str(v2)])
        with fresh(work, disk) as machine, serve(files) as server, \
                CuttingProxy(server.port, after=0, cuts=0, rate=rate) as fproxy:
            url = f"http://{fproxy.host}/v2.zck"
            tools["zchunk"] = measure(machine.device(Slot.B), fproxy, functools.partial(
                _zchunk, url, machine.device(Slot.A), machine.device(Slot.B), work, fproxy))
            check("zchunk", machine)
    return {"floor": asdict(fl), "tools": {name: asdict(r) for name, r in tools.items()},
            "reported": reported, "image_bytes": v2_tar.stat().st_size,
            "full_image_bytes": full_tar.stat().st_size}


def _abupgrade(machine: Machine, spec: str, report: dict[str, object],
               proxy: CuttingProxy) -> int:
    before = proxy.requests
    report.update(apply_cli(machine, spec))
    return proxy.requests - before


def _casync(url: str, dev_a: Path, dev_b: Path, proxy: CuttingProxy) -> int:
    before = proxy.requests
    run(["casync", "extract", f"--store={url}/store", f"--seed={dev_a}", f"{url}/v2.caibx",
         str(dev_b)])
    return proxy.requests - before


def _zchunk(url: str, dev_a: Path, dev_b: Path, work: Path, proxy: CuttingProxy) -> int:
    before = proxy.requests
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
    return proxy.requests - before


if __name__ == "__main__":
    main()
