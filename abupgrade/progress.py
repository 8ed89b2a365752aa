"""Progress sinks: logic reports to one of these and never imports rich."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int) -> None:
        """A new phase of `total` bytes (0 when unknown) begins."""

    def advance(self, done: int) -> None:
        """`done` more bytes of the current phase are finished."""

    def finish(self) -> None:
        """The current phase ended."""


class NullProgress:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass
