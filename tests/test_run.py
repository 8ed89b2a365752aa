"""run.py's doors to subprocesses, and the boot hook's deadline timer that uses one."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from abupgrade import run
from abupgrade.errors import CommandFailed, OperationalError
from abupgrade.hook import Deadline
from fixtures.procs import dies_within


def test_run_shows_what_failed() -> None:
    with pytest.raises(CommandFailed, match=r"sh -c 'echo oops >&2; exit 3' exited 3: oops"):
        run.run(["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(OperationalError, match="no-such-tool is not installed"):
        run.run(["no-such-tool"])


def test_supervise_keeps_the_tail_and_the_exit_status() -> None:
    done = run.supervise(["sh", "-c", "echo out; echo err >&2; exit 4"], timeout=10)
    assert done.returncode == 4 and not done.ok
    assert done.output.split() == [b"out", b"err"]
    done = run.supervise(["sh", "-c", "head -c 10000 /dev/zero | tr '\\0' x; echo END"],
                         timeout=10, tail=8)
    assert done.ok and done.output == b"xxxxEND\n"


def test_supervise_kills_the_whole_group_at_the_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    started = time.monotonic()
    # 3 s: time enough for sh to start its child and write the pid under a loaded machine
    done = run.supervise(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=3)
    assert done.returncode is None and time.monotonic() - started < 30
    assert dies_within(int(pidfile.read_text()), b"sleep\x0060\x00")



def test_spawn_of_a_missing_program_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(OperationalError, match=f"cannot run {tmp_path}/none: No such file"):
        run.spawn([tmp_path / "none"])


def _settled_fds(pid: int, ours: str) -> list[str]:
    """The descriptors of a freshly started Python once its start-up is over (it opens its
    own module files for a moment); none of them, at any time, may be `ours`."""
    until = time.monotonic() + 10
    while True:
        fds = os.listdir(f"/proc/{pid}/fd")
        for fd in fds:
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                assert os.readlink(f"/proc/{pid}/fd/{fd}") != ours
        if sorted(fds) == ["0", "1", "2"] or time.monotonic() > until:
            return fds
        time.sleep(0.05)


def test_deadline_timer_holds_nothing_of_ours_and_fires(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)  # as a lock or an output pipe may be
    marker = tmp_path / "rebooted"
    try:
        with Deadline(30, ("touch", str(marker)), tmp_path / "no-watchdog") as deadline:
            assert deadline.timer is not None
            fds = _settled_fds(deadline.timer.pid, f"pipe:[{os.fstat(write_end).st_ino}]")
            assert sorted(fds) == ["0", "1", "2"]
        assert deadline.timer.poll() is not None and not marker.exists()
        with Deadline(0.2, ("touch", str(marker)), tmp_path / "no-watchdog"):
            for _ in range(300):
                if marker.exists():
                    break
                time.sleep(0.1)
        assert marker.exists()
    finally:
        os.close(read_end)
        os.close(write_end)
