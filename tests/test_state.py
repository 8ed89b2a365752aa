"""state.py: atomic state, a history that survives a torn last line, the lock."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from abupgrade.errors import OperationalError, PolicyRefusal
from abupgrade.model import Slot, SlotState
from abupgrade.state import EventName, State, Store, Trial, TrialPhase


def test_state_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    state = State().with_slot(Slot.A, state=SlotState.GOOD, version="1.0")
    state = State(slots=state.slots, trial=Trial(Slot.B, "2.0", "1.0", "t", TrialPhase.CHECKING, 2))
    store.save(state)
    assert store.load() == state
    assert not list((tmp_path / "s").glob(".*.tmp")), "a temp file was left behind"


def test_missing_state_is_empty_and_corrupt_state_is_an_error(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.load() == State()
    store.state_path.write_text('{"format": 1, "slots": {"A": {"state": "nonsense"}}}')
    with pytest.raises(OperationalError, match="corrupt"):
        store.load()


def test_history_drops_a_torn_line_and_keeps_appending(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.record(EventName.INSTALLED, Slot.B, "2.0", "first")
    with open(store.history_path, "ab") as f:
        f.write(b'{"time": "2026-01-01T00:00:00+00:00", "event": "comm')  # power cut
    assert [e.event for e in store.history()] == ["installed"]
    store.record(EventName.COMMITTED, Slot.B, "2.0", "second")
    lines = store.history_path.read_bytes().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["installed", "committed"]
    assert [e.event for e in store.history(1)] == ["committed"]


def _try_lock(directory: str, queue: multiprocessing.Queue[str]) -> None:
    try:
        with Store(Path(directory)).lock():
            queue.put("got it")
    except PolicyRefusal as exc:
        queue.put(str(exc))


def test_lock_refuses_a_second_process(tmp_path: Path) -> None:
    store = Store(tmp_path)
    queue: multiprocessing.Queue[str] = multiprocessing.Queue()
    with store.lock():
        proc = multiprocessing.Process(target=_try_lock, args=(str(tmp_path), queue))
        proc.start()
        proc.join(10)
        message = queue.get(timeout=5)
    assert "holds the lock" in message and "pid" in message
    proc = multiprocessing.Process(target=_try_lock, args=(str(tmp_path), queue))
    proc.start()
    proc.join(10)
    assert queue.get(timeout=5) == "got it"


def test_store_keeps_the_last_boot_quarantines_and_probes(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.ensure()
    assert store.last_boot() is None
    store.remember_boot("boot-1", "committed")
    assert store.last_boot() == ("boot-1", "committed")
    store.state_path.write_text("{broken")
    kept = store.quarantine()
    assert kept.read_text() == "{broken" and not store.state_path.exists()
    assert kept.name.startswith("state.json.corrupt-")
    store.probe()
    assert sorted(p.name for p in store.dir.iterdir()) == sorted([kept.name, "last-boot"])
