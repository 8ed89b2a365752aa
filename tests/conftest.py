"""Test tiers: unit (default), `loop` (root + loop devices), `boot` (QEMU).

Where the machine has what a tier needs (scripts/test sets ABUPGRADE_REQUIRE_ALL_TIERS when run
as root, and CI runs it so), a `loop` or `boot` test that skips fails instead: CI never passes
a tier silently.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (
        report.skipped
        and os.environ.get("ABUPGRADE_REQUIRE_ALL_TIERS") == "1"
        and (item.get_closest_marker("loop") or item.get_closest_marker("boot"))
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every tier must run: {reason}"
