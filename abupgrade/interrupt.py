"""SIGINT and SIGTERM become `Interrupted`, except inside a critical section (a bootloader or
state change that must finish once begun): there the signal waits for the section's end."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

from abupgrade.errors import Interrupted

_depth = 0
_pending: str | None = None


def _error(name: str) -> Interrupted:
    return Interrupted(f"stopped by {name}",
                       hint="nothing half-done was left bootable; run the command again")


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    name = signal.Signals(signum).name
    if _depth:
        _pending = name
        return
    raise _error(name)


def install() -> None:
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Finish this block even if a signal arrives; raise Interrupted after it."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            name, _pending = _pending, None
            raise _error(name)
