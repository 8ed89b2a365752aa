"""The one door to subprocesses: argv lists, a timeout, errors that show what ran.

Most modules import this one, and most runs of abupgrade on a booted machine (the boot hook,
`status`) start no program at all: the subprocess machinery is imported when a program runs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from abupgrade.errors import CommandFailed, OperationalError

if TYPE_CHECKING:
    import subprocess

DEFAULT_TIMEOUT = 300.0


def _log(what: str, args: Sequence[str]) -> None:
    """Log a program about to run, for --debug (which imports and sets up logging: while
    nothing has imported it, nobody listens)."""
    logging = sys.modules.get("logging")
    if logging is not None:
        import shlex

        logging.getLogger(__name__).debug("%s: %s", what, shlex.join(args))


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (never through a shell) and capture its output as text."""
    import subprocess

    args = [str(a) for a in argv]
    _log("run", args)
    try:
        proc = subprocess.run(
            args,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError as exc:
        raise OperationalError(
            f"{args[0]} is not installed", hint=hint or f"install the package that provides {args[0]}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise CommandFailed(args, None, stderr or "", hint=hint) from exc
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, proc.stderr, hint=hint)
    return proc


def spawn(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start argv (never through a shell) and return at once. Its stdin is /dev/null and it
    inherits no descriptor but 0-2; with `new_session` it leads a session and process group
    of its own, so signals to ours do not reach it and it can be killed with all it started.
    A program that cannot start is an OperationalError ("cannot run ARGV0: why")."""
    import subprocess

    args = [str(a) for a in argv]
    _log("spawn", args)
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env=dict(env) if env is not None else None,
                                start_new_session=new_session, close_fds=True)
    except OSError as exc:
        raise OperationalError(f"cannot run {args[0]}: {exc.strerror}") from None


@dataclass(frozen=True)
class Finished:
    """How a supervised program ended."""

    returncode: int | None  # None when it was killed at its timeout
    output: bytes  # the tail of its stdout and stderr, interleaved
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def supervise(argv: Sequence[str | Path], *, timeout: float, env: Mapping[str, str] | None = None,
              tail: int = 4096) -> Finished:
    """Run argv in a session of its own with stdout and stderr to a file; kill its whole
    process group when it overruns `timeout` and when it ends (nothing it started outlives
    it). Keeps the last `tail` bytes of its output."""
    import signal
    import subprocess
    import tempfile

    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        proc = spawn(argv, env=env, stdout=output, stderr=subprocess.STDOUT, new_session=True)
        code: int | None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if code is None:
            proc.wait()
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - tail))
        return Finished(code, output.read(), time.monotonic() - started)


def require_tool(name: str, *, package: str) -> str:
    """The full path of a tool, or an error naming the package to install."""
    import shutil

    found = shutil.which(name)
    if found is None:
        raise OperationalError(f"{name} is not installed", hint=f"apt-get install {package}")
    return found
