"""Benchmark: how fast abupgrade starts, against a bare interpreter start in the same run.

The boot hook runs on every boot of every machine, often on boards much slower than this one,
and scripts poll `status --json`. Each command runs `--runs` times (default 10) in a fresh
process, interleaved with `python -c pass` of the same interpreter; the table shows medians
and the ratio to the bare start, against the budget:

- `abupgrade boot-hook` on a committed boot with nothing to do (a new boot id before each
  run, so the hook does the whole comparison of bootloader and state every time): 4x;
- `abupgrade status --json`: 4x;
- `abupgrade --help`: 6x.

The machine is a disk made by `disk init --image` (slot A committed), attached and mounted as
if it ran from slot A (fixtures.machine), so the commands read a real GRUB environment, the
state folder and the configuration as on a booted system. Needs root and loop devices.
The package's bytecode is compiled first, as `pip install` does (with PYTHONDONTWRITEBYTECODE
set, every run would otherwise compile abupgrade from source).

    python bench/bench_startup.py [--runs 10] [--importtime] [--json]

`--importtime` also prints, per command, the imports that cost most (`python -X importtime`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fixtures.images import keypair, rootfs_image, signed_image  # noqa: E402
from fixtures.machine import running_machine  # noqa: E402

BUDGETS = {"boot-hook": 4.0, "status --json": 4.0, "--help": 6.0}


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    before: Callable[[], None] | None = None  # run untimed before each timed run


def abupgrade_command() -> list[str]:
    """The console script users run, next to this interpreter (else `python -m abupgrade`)."""
    script = Path(sys.executable).with_name("abupgrade")
    return [str(script)] if script.exists() else [sys.executable, "-m", "abupgrade"]


def timed(argv: Sequence[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return seconds


def measure(cases: Sequence[Case], runs: int) -> dict[str, list[float]]:
    """Every case and the bare start, interleaved, `runs` times each (one warm-up round)."""
    bare = Case("python -c pass", [sys.executable, "-c", "pass"])
    times: dict[str, list[float]] = {c.name: [] for c in (bare, *cases)}
    for round_ in range(runs + 1):
        for case in (bare, *cases):
            if case.before is not None:
                case.before()
            seconds = timed(case.argv)
            if round_ > 0:
                times[case.name].append(seconds)
    return times


def importtime(argv: Sequence[str], top: int = 12) -> list[tuple[str, int]]:
    """The `top` imports of one run with the largest cumulative time (microseconds), among
    those imported by the program itself or by its direct imports (two levels deep)."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                          check=False, text=True)
    found: list[tuple[str, int]] = []
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(parts) != 3 or "cumulative" in line:
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        if depth <= 1:
            found.append(("  " * depth + name.strip(), int(parts[1])))
    return sorted(found, key=lambda x: -x[1])[:top]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (default 10)")
    parser.add_argument("--importtime", action="store_true",
                        help="also show the costliest imports of each command")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_startup needs root (it attaches a loop disk)")

    command = abupgrade_command()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "abupgrade")],
                   check=True)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        work = Path(scratch)
        key = keypair(work / "keys")
        image = signed_image(work / "v1.tar", rootfs_image(work / "v1.ext4", tag="v1"), key,
                             version="1.0")
        disk = work / "disk.img"
        subprocess.run([*command, "disk", "init", str(disk), "--bootloader", "grub",
                        "--slot-size", "64M", "--image", str(image), "--pubkey",
                        str(key.public)], check=True, capture_output=True)
        with running_machine(disk, work / "machine") as machine:
            config = ["--config", str(machine.config_path)]

            def new_boot() -> None:
                machine.config.system.boot_id.write_text(f"{uuid.uuid4()}\n")

            cases = [
                Case("boot-hook", [*command, *config, "boot-hook"], before=new_boot),
                Case("status --json", [*command, *config, "status", "--json"]),
                Case("--help", [*command, "--help"]),
            ]
            load = os.getloadavg()[0]
            times = measure(cases, args.runs)
            new_boot()
            hook = machine.cli("--json", "boot-hook")
            outcome = json.loads(hook.stdout).get("outcome") if hook.returncode == 0 else None
            imports: dict[str, list[tuple[str, int]]] = {}
            for case in cases if args.importtime else ():
                if case.before is not None:
                    case.before()
                imports[case.name] = importtime(case.argv)

    bare = statistics.median(times["python -c pass"])
    rows: list[dict[str, object]] = []
    for name, values in times.items():
        median = statistics.median(values)
        budget = BUDGETS.get(name)
        rows.append({"command": name, "median_ms": round(median * 1000, 1),
                     "ratio": round(median / bare, 2), "budget": budget,
                     "within": None if budget is None else median / bare <= budget})
    if args.json:
        print(json.dumps({"load": load, "runs": args.runs, "rows": rows, "imports": imports},
                         indent=2))
        return 0
    print(f"startup, median of {args.runs} fresh processes each; load average {load:.1f}; "
          f"the hook's outcome: {outcome}")
    print(f"{'command':<16} {'median ms':>10} {'vs python':>10} {'budget':>8}")
    for row in rows:
        verdict = "" if row["budget"] is None else \
            f"{row['budget']:g}x " + ("ok" if row["within"] else "OVER")
        print(f"{row['command']:<16} {row['median_ms']:>10.1f} {row['ratio']:>9.2f}x "
              f"{verdict:>8}")
    for name, found in imports.items():
        print(f"\n{name}: costliest imports (cumulative ms)")
        for module, micros in found:
            print(f"  {micros / 1000:8.1f}  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
