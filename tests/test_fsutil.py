"""fsutil.atomic_writer: a file is replaced whole or not at all, its temporary file is private
and never left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from abupgrade.fsutil import atomic_write, atomic_writer


def test_replaces_whole_with_the_mode_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with atomic_writer(target, 0o640) as out:
        out.write(b"new")
        temps = [p for p in tmp_path.iterdir() if p != target]
        assert len(temps) == 1 and temps[0].name.startswith(".state.json.")
        assert stat.S_IMODE(temps[0].stat().st_mode) == 0o600  # private until it is complete
        assert target.read_text() == "old"
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as out:
        out.write(b"half")
        raise RuntimeError("power cut stand-in")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
