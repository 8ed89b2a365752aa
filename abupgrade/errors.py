"""One root exception; each subclass carries the exit code of the contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abupgrade.health import Report


class AbupgradeError(Exception):
    """Something the user should read: one line, plus a hint where one helps."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        """The error as `--json` prints it (docs/json.md, `Error`)."""
        return {"error": self.message, "hint": self.hint, "exit": self.exit_code}


class OperationalError(AbupgradeError):
    """I/O failed, a tool failed, a device vanished (exit 1)."""

    exit_code = 1


class UsageError(AbupgradeError):
    """Bad arguments or a configuration that cannot work (exit 2)."""

    exit_code = 2


class ImageRejected(AbupgradeError):
    """Format, signature, hash or truncation problem in an image (exit 3)."""

    exit_code = 3


class PolicyRefusal(AbupgradeError):
    """Refused on purpose: incompatible, downgrade, busy slot, pending trial, lock (exit 4)."""

    exit_code = 4


class HealthFailed(AbupgradeError):
    """Required health checks failed; the boot was or will be rolled back (exit 5)."""

    exit_code = 5

    def __init__(self, message: str, *, hint: str | None = None,
                 report: Report | None = None) -> None:
        super().__init__(message, hint=hint)
        self.report = report  # the checks, for --json

    def to_json(self) -> dict[str, Any]:
        found = super().to_json()
        if self.report is not None:
            found["health"] = self.report.to_json()
        return found


class NothingNewer(AbupgradeError):
    """`check`: the channel holds nothing newer than the committed version (exit 6)."""

    exit_code = 6


class Interrupted(OperationalError):
    """SIGINT or SIGTERM arrived; the operation stopped cleanly."""


class CommandFailed(OperationalError):
    """An external command exited non-zero or timed out."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stderr: str, *, hint: str | None = None
    ) -> None:
        import shlex

        tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:])
        what = "timed out" if returncode is None else f"exited {returncode}"
        message = f"{shlex.join(argv)} {what}" + (f": {tail}" if tail else "")
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
