"""The one door to subprocesses: argv lists, a timeout, errors that show what ran."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from abupgrade.errors import CommandFailed, OperationalError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0


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
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
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


def require_tool(name: str, *, package: str) -> str:
    """The full path of a tool, or an error naming the package to install."""
    found = shutil.which(name)
    if found is None:
        raise OperationalError(f"{name} is not installed", hint=f"apt-get install {package}")
    return found
