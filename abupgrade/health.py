"""Health checks: executables in `required.d/` and `wanted.d/`, each in its own process group,
killed with everything it started when it overruns its timeout or leaves children behind."""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abupgrade import run, trust
from abupgrade.errors import AbupgradeError, OperationalError

OUTPUT_TAIL = 600  # characters of a check's output kept for history and reports
SUMMARY_LINES = 3  # lines of a failed check's output in the summary (the console line)


class Kind(enum.StrEnum):
    BUILTIN = "builtin"
    REQUIRED = "required"
    WANTED = "wanted"


@dataclass(frozen=True)
class Result:
    """One check: its verdict, how long it took and its output."""

    name: str
    kind: Kind
    ok: bool
    seconds: float
    output: str
    timed_out: bool = False

    @property
    def blocking(self) -> bool:
        """A failure that makes the boot unhealthy."""
        return not self.ok and self.kind is not Kind.WANTED

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else ("timeout" if self.timed_out else "fail")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": str(self.kind), "result": self.verdict,
                "seconds": round(self.seconds, 3), "output": self.output}


@dataclass(frozen=True)
class Report:
    """Every check of one run."""

    results: tuple[Result, ...]

    @property
    def healthy(self) -> bool:
        return not any(r.blocking for r in self.results)

    @property
    def first_failure(self) -> Result | None:
        return next((r for r in self.results if r.blocking), None)

    def summary(self) -> str:
        failed = self.first_failure
        passed = sum(r.ok for r in self.results)
        if failed is None:
            wanted = [r.name for r in self.results if not r.ok]
            extra = f"; wanted checks failed: {', '.join(wanted)}" if wanted else ""
            return f"healthy: {passed} of {len(self.results)} checks passed{extra}"
        why = "timed out" if failed.timed_out else "failed"
        lines = [line.strip() for line in failed.output.splitlines() if line.strip()]
        tail = " | ".join(lines[-SUMMARY_LINES:])
        return f"{failed.kind} check {failed.name} {why}" + (f": {tail}" if tail else "")

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "summary": self.summary(),
                "checks": [r.to_json() for r in self.results]}


def run_check(path: Path, *, kind: Kind, timeout: float, env: Mapping[str, str]) -> Result:
    """Run one check in a session of its own; its whole group is killed at the timeout and
    at its end."""
    try:
        done = run.supervise([path], timeout=timeout, env={**os.environ, **env},
                             tail=4 * OUTPUT_TAIL)
    except OperationalError as exc:
        return Result(path.name, kind, False, 0.0, exc.message)
    tail = done.output.decode(errors="replace")[-OUTPUT_TAIL:]
    if done.returncode is None:
        tail = (tail + f"\n(killed after {timeout:g} s)").lstrip()
    elif done.returncode != 0:
        tail = (tail + f"\n(exit status {done.returncode})").lstrip()
    return Result(path.name, kind, done.ok, done.seconds, tail, done.returncode is None)


Builtin = Callable[[], str | None]  # returns None when fine, else what is wrong


def run_all(directory: Path, *, timeout: float, env: Mapping[str, str],
            builtins: Mapping[str, Builtin]) -> Report:
    results: list[Result] = []
    for name, check in builtins.items():
        started = time.monotonic()
        try:
            problem = check()
        except (OSError, AbupgradeError) as exc:  # a check that cannot be made has failed
            problem = str(exc)
        results.append(Result(name, Kind.BUILTIN, problem is None, time.monotonic() - started,
                              problem or ""))
    for kind in (Kind.REQUIRED, Kind.WANTED):
        for path, refusal in trust.executables(directory / f"{kind}.d", f"{kind} check"):
            if refusal is not None:  # anyone could have put it there: failed, never skipped
                results.append(Result(path.name, kind, False, 0.0, refusal.line()))
            else:
                results.append(run_check(path, kind=kind, timeout=timeout, env=env))
    return Report(tuple(results))
