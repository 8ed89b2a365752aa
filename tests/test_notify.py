"""Notification hooks run in order with the event's environment, and never fail the caller."""

from __future__ import annotations

import time
from pathlib import Path

from abupgrade.notify import run_hooks


def hook(directory: Path, event: str, name: str, body: str, *, executable: bool = True) -> Path:
    path = directory / f"{event}.d" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def test_hooks_run_in_order_with_the_environment(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook(tmp_path, "committed", "20-second", f'echo "second $ABUPGRADE_EVENT $VERSION" >> {log}')
    hook(tmp_path, "committed", "10-first", f'echo "first $ABUPGRADE_SLOT" >> {log}')
    hook(tmp_path, "committed", "30-not-executable", f"echo never >> {log}", executable=False)
    hook(tmp_path, "rolled-back", "10-other-event", f"echo never >> {log}")
    problems = run_hooks(tmp_path, "committed", {"ABUPGRADE_SLOT": "B", "VERSION": "2.0"})
    assert problems == []
    assert log.read_text() == "first B\nsecond committed 2.0\n"


def test_failures_and_timeouts_are_reported_not_raised(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook(tmp_path, "fallback", "10-fails", "echo 'fleet manager unreachable' >&2; exit 3")
    hook(tmp_path, "fallback", "20-hangs", "sleep 30")
    hook(tmp_path, "fallback", "30-still-runs", f"echo ran >> {log}")
    started = time.monotonic()
    # 3 s: time enough for a loaded machine to start the hooks that end on their own
    problems = run_hooks(tmp_path, "fallback", {}, timeout=3)
    assert time.monotonic() - started < 20
    assert len(problems) == 2
    assert problems[0] == "fallback hook 10-fails failed (exit status 3): fleet manager unreachable"
    assert problems[1] == "fallback hook 20-hangs timed out after 3 s"
    assert log.read_text() == "ran\n"


def test_nothing_to_run(tmp_path: Path) -> None:
    assert run_hooks(None, "committed", {}) == []
    assert run_hooks(tmp_path / "missing", "committed", {}) == []
    assert run_hooks(tmp_path, "../etc", {}) != []  # not an event name: reported, nothing run
