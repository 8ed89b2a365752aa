"""Small value types shared by every layer."""

from __future__ import annotations

import enum


class Slot(enum.StrEnum):
    A = "A"
    B = "B"

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A

    @classmethod
    def parse(cls, text: str) -> Slot:
        from abupgrade.errors import UsageError

        try:
            return cls(text.strip().upper())
        except ValueError:
            raise UsageError(f"unknown slot {text!r}", hint="slots are A and B") from None


class SlotState(enum.StrEnum):
    GOOD = "good"
    BAD = "bad"
    TRIAL = "trial"
    EMPTY = "empty"
