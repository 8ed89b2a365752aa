"""Benchmark: `abupgrade apply` against `dd bs=4M conv=fsync`, `bmaptool copy` and `rauc install`.

Every tool writes the same ext4 image (default 1 GiB, about 60% full of random data) into the
same loop partition: slot B of a disk made by `abupgrade disk init`, attached and mounted as
if the machine were running from slot A. abupgrade runs as the real command (a fresh process,
the machine's configuration, signature and hash checks, the slot read back from the device,
the trial armed), once with an uncompressed and once with a zstd image. RAUC installs a plain
bundle through its own service on a private D-Bus bus, with a noop bootloader and slot A
given as booted. Runs alternate between the tools, several rounds; reported are each run, the
median wall time, the ratio to dd, and the peak resident memory (for RAUC its service's).

Two regimes, each with its own disk: "io", the loop device backed by a file on disk (the
writes go through the disk's page cache and are flushed to it), and "cpu", backed by a file
on tmpfs (no disk at all: the tools' own work is all there is). Before them, what every
command pays before its first byte: interpreter start, imports, and `--disk` attaching and
mounting a disk.

Figures on a loop device are largely page-cache figures: compare the ratios of one run, not
absolute times across runs. Needs root, loop devices, mkfs.ext4, bmaptool, rauc, dbus-daemon,
openssl and GNU time (`ABUPGRADE_BENCH=1 scripts/setup` installs them).

    python bench/bench_apply.py [--size-mib 1024] [--fill 0.6] [--rounds 5] [--json]
                                [--regime io,cpu] [--skip rauc,bmaptool,zstd] [--hogs N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abupgrade.disk import mkfs_ext4  # noqa: E402
from abupgrade.model import Slot  # noqa: E402
from fixtures.images import keypair, signed_image  # noqa: E402
from fixtures.machine import running_machine  # noqa: E402

MiB = 1024 * 1024
COMPATIBLE = "bench-box"
APPLY = "abupgrade apply"
APPLY_ZSTD = "abupgrade apply (zstd)"
DD = "dd bs=4M conv=fsync"
BMAPTOOL = "bmaptool copy"
RAUC = "rauc install"
TOOLS = {"rauc": RAUC, "bmaptool": BMAPTOOL, "zstd": APPLY_ZSTD}

DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""


def build_rootfs(work: Path, size: int, fill: float) -> Path:
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
    image = work / "rootfs.ext4"
    mkfs_ext4(image, "bench", root_dir=tree, size=size)
    shutil.rmtree(tree)
    return image


def sha256_of(path: Path, limit: int) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(4 * MiB))
    with path.open("rb", buffering=0) as f:
        left = limit
        while left and (n := f.readinto(buffer[: min(left, len(buffer))])):
            digest.update(buffer[:n])
            left -= n
    return digest.hexdigest()


def abupgrade_cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "abupgrade", "--config", str(config), *args]


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # user + system
    peak_rss_kib: int


def timed(argv: list[str], work: Path, env: dict[str, str] | None = None) -> Run:
    """Wall seconds, CPU seconds and peak RSS of one command, measured by GNU time."""
    report = work / "time"
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", str(report), *argv],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          check=False)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')}")
    user, system, rss = report.read_text().split()[-3:]
    return Run(seconds, float(user) + float(system), int(rss))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ RAUC


def rauc_bundle(work: Path, rootfs: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and a plain bundle of `rootfs`; (bundle, cert)."""
    cert, key = work / "rauc-cert.pem", work / "rauc-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/O=abupgrade bench/CN=bench", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    content = work / "rauc-content"
    content.mkdir()
    os.link(rootfs, content / "rootfs.ext4")
    (content / "manifest.raucm").write_text(
        f"[update]\ncompatible={COMPATIBLE}\nversion=2.0\n\n[bundle]\nformat=plain\n\n"
        "[image.rootfs]\nfilename=rootfs.ext4\n")
    bundle = work / "bench.raucb"
    subprocess.run(["rauc", "bundle", "--cert", str(cert), "--key", str(key), str(content),
                    str(bundle)], check=True, capture_output=True)
    shutil.rmtree(content)
    return bundle, cert


@contextlib.contextmanager
def rauc_service(work: Path, cert: Path, slot_a: Path, slot_b: Path
                 ) -> Iterator[tuple[dict[str, str], int]]:
    """dbus-daemon on a private socket and `rauc service` on it; (client env, service pid)."""
    socket = work / "bus.socket"
    bus_config = work / "bus.conf"
    bus_config.write_text(DBUS_CONFIG.format(socket=socket))
    conf = work / "rauc-system.conf"
    (work / "rauc-mnt").mkdir()
    conf.write_text(
        f"[system]\ncompatible={COMPATIBLE}\nbootloader=noop\n"
        f"statusfile={work / 'rauc-status'}\nmountprefix={work / 'rauc-mnt'}\n\n"
        f"[keyring]\npath={cert}\n\n"
        f"[slot.rootfs.0]\ndevice={slot_a}\ntype=ext4\nbootname=A\n\n"
        f"[slot.rootfs.1]\ndevice={slot_b}\ntype=ext4\nbootname=B\n")
    address = f"unix:path={socket}"
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, DBUS_SESSION_BUS_ADDRESS=address)
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={bus_config}", "--nofork",
                            "--nopidfile"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    service: subprocess.Popen[bytes] | None = None
    log = work / "rauc-service.log"
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if time.monotonic() > deadline or bus.poll() is not None:
                raise SystemExit("dbus-daemon did not start")
            time.sleep(0.05)
        # RAUC 1.8 looks up the backing file of every mounted loop device and fails on the
        # partitions of one (the machine's boot and data mounts): it runs in a mount namespace
        # of its own without them.
        service = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                    sys.executable, str(Path(__file__).resolve()),
                                    "--exec-rauc-service", str(conf)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        has_owner = ["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                     "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                     "string:de.pengutronix.rauc"]
        while b"true" not in subprocess.run(has_owner, env=env, capture_output=True,
                                            check=False).stdout:
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit("rauc service did not come up on the private bus: "
                                 + log.read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        yield env, service.pid
    finally:
        for proc in (service, bus):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def exec_rauc_service(conf: str) -> None:
    """In a fresh mount namespace: unmount loop partitions, then become `rauc service`."""
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        fields = line.split()
        source = fields[fields.index("-") + 2]
        if source.startswith("/dev/loop") and "p" in source.removeprefix("/dev/loop"):
            subprocess.run(["umount", "-l", fields[4]], check=True)
    os.execvp("rauc", ["rauc", "service", f"--conf={conf}", "--override-boot-slot=A"])


# ------------------------------------------------------------------ the run

REGIMES = {"io": Path("/var/tmp"), "cpu": Path("/dev/shm")}


@dataclass(frozen=True)
class Figures:
    median_s: float
    runs_s: list[float]
    ratio_to_dd: float
    cpu_s: float  # median user + system seconds
    peak_rss_mib: float


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--fill", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--regime", default="io,cpu",
                        help="comma list of: io (loop device on a disk file), cpu (on tmpfs)")
    parser.add_argument("--skip", default="", help="comma list of: rauc, bmaptool, zstd")
    parser.add_argument("--hogs", type=int, default=0, metavar="N",
                        help="N busy processes beside the tools: a machine under load (its load "
                             "average rises by about N)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--exec-rauc-service", metavar="CONF", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exec_rauc_service:
        exec_rauc_service(args.exec_rauc_service)
    skip = {TOOLS[s] for s in filter(None, args.skip.split(","))}
    regimes = [r for r in args.regime.split(",") if r]
    if not set(regimes) <= set(REGIMES):
        raise SystemExit(f"--regime takes a comma list of {', '.join(REGIMES)}")
    needed = ["dd", "mkfs.ext4", "losetup", "partx", "sfdisk", "/usr/bin/time"]
    needed += [] if BMAPTOOL in skip else ["bmaptool"]
    needed += [] if RAUC in skip else ["rauc", "dbus-daemon", "dbus-send", "openssl",
                                       "mksquashfs", "unshare"]
    for tool in needed:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (ABUPGRADE_BENCH=1 scripts/setup)")
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root for loop devices")
    size = args.size_mib * MiB
    load_start = os.getloadavg()
    if not args.json:
        print(f"{args.size_mib} MiB ext4, {args.fill:.0%} full, {args.rounds} rounds, load "
              f"average at the start {load_start[0]:.2f} {load_start[1]:.2f}"
              + (f", {args.hogs} busy processes beside" if args.hogs else ""), flush=True)
    report: dict[str, dict[str, Figures]] = {}
    with busy(args.hogs):
        with tempfile.TemporaryDirectory(prefix="abupgrade-bench-") as tmp:
            startup = startup_costs(Path(tmp), args.rounds)
        if not args.json:
            print_startup(startup)
        for regime in regimes:
            with tempfile.TemporaryDirectory(prefix="abupgrade-bench-",
                                             dir=REGIMES[regime]) as tmp:
                report[regime] = run(Path(tmp), size, args.fill, args.rounds, skip)
            if not args.json:
                print_regime(regime, report[regime])
        load_end = os.getloadavg()
    if args.json:
        print(json.dumps({"size_mib": args.size_mib, "fill": args.fill, "rounds": args.rounds,
                          "hogs": args.hogs,
                          "loadavg_start": [round(x, 2) for x in load_start],
                          "loadavg_end": [round(x, 2) for x in load_end],
                          "startup_s": startup,
                          "regimes": {regime: {name: asdict(f) for name, f in figures.items()}
                                      for regime, figures in report.items()}}, indent=2))
        return
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f}")


@contextlib.contextmanager
def busy(count: int) -> Iterator[None]:
    """`count` processes that keep a core busy each, for as long as the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def print_startup(startup: dict[str, list[float]]) -> None:
    print("before the first byte (median s, each run):")
    for name, runs in startup.items():
        print(f"  {name:34} {statistics.median(runs):6.3f}  "
              + " ".join(f"{x:.3f}" for x in runs))


def print_regime(regime: str, report: dict[str, Figures]) -> None:
    where = {"io": "loop device on a disk file", "cpu": "loop device on tmpfs"}[regime]
    print(f"regime {regime} ({where}), load average now {os.getloadavg()[0]:.2f}")
    print(f"  {'tool':24} {'median s':>9} {'vs dd':>6} {'CPU s':>6} {'peak RSS MiB':>13}  runs s")
    for name, f in report.items():
        runs = " ".join(f"{x:.2f}" for x in f.runs_s)
        print(f"  {name:24} {f.median_s:9.2f} {f.ratio_to_dd:6.2f} {f.cpu_s:6.2f} "
              f"{f.peak_rss_mib:13.1f}  {runs}")


def startup_costs(work: Path, rounds: int) -> dict[str, list[float]]:
    """Wall seconds of what a command pays before its first byte: interpreter start, the
    imports of the command line, and `--disk` attaching and mounting a small disk."""
    disk = work / "small.img"
    signer = keypair(work / "keys")
    subprocess.run([sys.executable, "-m", "abupgrade", "disk", "init", str(disk),
                    "--bootloader", "grub", "--size", str(600 * MiB), "--slot-size",
                    str(64 * MiB), "--compatible", COMPATIBLE, "--pubkey", str(signer.public)],
                   check=True, stdout=subprocess.DEVNULL)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import abupgrade.cli'": [sys.executable, "-c", "import abupgrade.cli"],
        "abupgrade --help": [sys.executable, "-m", "abupgrade", "--help"],
        "abupgrade --disk DISK status": [sys.executable, "-m", "abupgrade", "--disk", str(disk),
                                         "status"],
    }
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, argv in commands.items():
            start = time.monotonic()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            runs[name].append(round(time.monotonic() - start, 3))
    return runs


def run(work: Path, size: int, fill: float, rounds: int, skip: set[str]) -> dict[str, Figures]:
    rootfs = build_rootfs(work, size, fill)
    sha = sha256_of(rootfs, size)
    signer = keypair(work / "keys")
    # Without a chunk index: what is measured is the full write of every byte, as dd does (an
    # indexed image would take the delta path and skip what slot B already holds from the
    # previous round; bench_delta.py measures that path).
    images = {APPLY: signed_image(work / "plain.tar", rootfs, signer, version="2.0",
                                  compatible=COMPATIBLE, compression="none", index=False)}
    if APPLY_ZSTD not in skip:
        images[APPLY_ZSTD] = signed_image(work / "zstd.tar", rootfs, signer, version="2.0",
                                          compatible=COMPATIBLE, compression="zstd",
                                          index=False)
    bmap = work / "rootfs.bmap"
    if BMAPTOOL not in skip:
        subprocess.run(["bmaptool", "-q", "create", "-o", str(bmap), str(rootfs)], check=True)
    if RAUC not in skip:
        bundle, cert = rauc_bundle(work, rootfs)
    disk = work / "disk.img"
    subprocess.run([sys.executable, "-m", "abupgrade", "disk", "init", str(disk),
                    "--bootloader", "grub", "--size", f"{2 * size + 512 * MiB}",
                    "--slot-size", str(size), "--compatible", COMPATIBLE,
                    "--pubkey", str(signer.public)], check=True, stdout=subprocess.DEVNULL)
    with contextlib.ExitStack() as stack:
        machine = stack.enter_context(running_machine(disk, work / "machine", booted=Slot.A))
        dev = machine.device(Slot.B)
        tools: dict[str, list[str]] = {
            name: abupgrade_cli(machine.config_path, "--quiet", "apply", str(image))
            for name, image in images.items()}
        tools[DD] = ["dd", f"if={rootfs}", f"of={dev}", "bs=4M", "conv=fsync", "status=none"]
        if BMAPTOOL not in skip:
            tools[BMAPTOOL] = ["bmaptool", "-q", "copy", "--bmap", str(bmap), str(rootfs),
                               str(dev)]
        rauc_env: dict[str, str] | None = None
        rauc_pid = 0
        if RAUC not in skip:
            rauc_env, rauc_pid = stack.enter_context(
                rauc_service(work, cert, machine.device(Slot.A), dev))
            tools[RAUC] = ["rauc", "install", str(bundle)]
        names = list(tools)
        runs: dict[str, list[Run]] = {n: [] for n in names}
        for rnd in range(rounds):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                subprocess.run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=8",
                                "status=none", "conv=fsync"], check=True)  # dirty the start
                if name == RAUC:
                    service_cpu = cpu_seconds(rauc_pid)
                try:
                    result = timed(tools[name], work, rauc_env if name == RAUC else None)
                except SystemExit as exc:
                    log = work / "rauc-service.log"
                    if name == RAUC and log.exists():
                        lines = log.read_text(errors="replace").splitlines()[-20:]
                        raise SystemExit("\n".join([str(exc), *lines])) from None
                    raise
                if name == RAUC:  # the service does the work
                    result.cpu_seconds += cpu_seconds(rauc_pid) - service_cpu
                    result.peak_rss_kib = vm_hwm_kib(rauc_pid)
                if name in images:  # end the armed trial so that the next apply may run
                    subprocess.run(abupgrade_cli(machine.config_path, "--quiet", "mark-bad",
                                                 "B"), check=True)
                runs[name].append(result)
                # bmaptool leaves unmapped blocks as they were: only the others must match
                if rnd == 0 and name != BMAPTOOL and sha256_of(dev, size) != sha:
                    raise SystemExit(f"{name} wrote wrong bytes")
    base = statistics.median(r.seconds for r in runs[DD])
    figures = {}
    for name, rs in runs.items():
        median = statistics.median(r.seconds for r in rs)
        figures[name] = Figures(round(median, 3), [round(r.seconds, 3) for r in rs],
                                round(median / base, 2),
                                round(statistics.median(r.cpu_seconds for r in rs), 2),
                                round(max(r.peak_rss_kib for r in rs) / 1024, 1))
    return figures

if __name__ == "__main__":
    main()
