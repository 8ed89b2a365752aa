"""Notification hooks: executables in `<hooks_dir>/<event>.d/`, run after a state change.

A hook tells the outside world (a fleet manager, a log shipper) what happened; it can never
change what happened. Each runs in its own process group with a timeout, like a health check,
and whatever goes wrong comes back as a line for the caller to record, never as an exception.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from abupgrade import run, trust
from abupgrade.errors import OperationalError

TIMEOUT = 30.0  # seconds per hook

_EVENT_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


def run_hooks(directory: Path | None, event: str, env: Mapping[str, str], *,
              timeout: float = TIMEOUT) -> list[str]:
    """Run `<directory>/<event>.d/*` in name order with `env` plus ABUPGRADE_EVENT; the problems.

    No directory, no folder for the event, or no executables in it: nothing to do. A hook that
    fails, cannot start or overruns `timeout` gives one line in the result; the others still run.
    """
    if directory is None:
        return []
    if not _EVENT_RE.fullmatch(event):
        return [f"not running hooks for {event!r}: not an event name"]
    problems: list[str] = []
    hook_env = {**os.environ, **env, "ABUPGRADE_EVENT": event}
    for path, refusal in trust.executables(directory / f"{event}.d", f"{event} hook"):
        what = f"{event} hook {path.name}"
        if refusal is not None:  # anyone could have put it there: never run as root
            problems.append(f"{what} not run: {refusal.line()}")
            continue
        try:
            done = run.supervise([path], timeout=timeout, env=hook_env)
        except OperationalError as exc:
            problems.append(f"{what} failed: {exc.message}")
            continue
        if done.returncode is None:
            problems.append(f"{what} timed out after {timeout:g} s")
        elif not done.ok:
            said = [line.strip() for line in done.output.decode(errors="replace").splitlines()
                    if line.strip()]
            problems.append(f"{what} failed (exit status {done.returncode})"
                            + (f": {said[-1]}" if said else ""))
    return problems
