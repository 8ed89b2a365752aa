"""The `--json` documents, byte for byte: the shapes of the contract (docs in the project's
CONTRACT: status, history, image inspect) and the key order the commands have always printed.

Each expected document is written out here by hand; the results are built from typed values,
so a renamed key, a reordered field or a value of another type fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abupgrade.health import Kind, Report, Result
from abupgrade.image import build
from abupgrade.model import Slot, SlotState
from abupgrade.results import (
    CheckResult,
    DiskMade,
    HookInstalled,
    HookResult,
    Installed,
    KeyPair,
    MarkedBad,
    Outcome,
    SlotStatus,
    SlotVersion,
    Status,
    Traffic,
)
from abupgrade.state import Event, EventName
from fixtures.images import keypair
from fixtures.machine import run_cli


def printed(document: Any) -> str:
    """What cli.emit prints for a document."""
    return json.dumps(document, indent=2, sort_keys=False)


def same(result: Any, expected: Any) -> None:
    assert printed(result.to_json()) == printed(expected)
    assert list(result.to_json()) == list(expected)  # the order too, not only the content


def test_status() -> None:
    status = Status(
        booted=Slot.A, next_boot=Slot.B, trial=Slot.B, trial_boots_left=3, committed=Slot.A,
        bootloader="grub", firmware="uefi", secure_boot=True,
        slots={Slot.A: SlotStatus("/dev/sda3", SlotState.GOOD, "1.0", "2026-01-01T00:00:00+00:00"),
               Slot.B: SlotStatus("/dev/sda4", SlotState.TRIAL, "2.0", None)},
        notes=())
    same(status, {
        "booted": "A", "next_boot": "B", "trial": "B", "trial_boots_left": 3, "committed": "A",
        "bootloader": "grub", "firmware": "uefi", "secure_boot": True,
        "slots": {
            "A": {"device": "/dev/sda3", "state": "good", "version": "1.0",
                  "installed": "2026-01-01T00:00:00+00:00"},
            "B": {"device": "/dev/sda4", "state": "trial", "version": "2.0", "installed": None},
        },
        "notes": [],
        "security_floor": None,
    })
    offline = Status(booted=None, next_boot=Slot.A, trial=None, trial_boots_left=None,
                     committed=Slot.A, bootloader="syslinux", firmware="bios",
                     secure_boot=False,
                     slots={s: SlotStatus(f"disk.img partition {n}", SlotState.EMPTY, None, None)
                            for s, n in ((Slot.B, 3), (Slot.A, 2))},
                     notes=("one note",))
    document = offline.to_json()
    assert document["booted"] is None and document["trial"] is None
    assert document["trial_boots_left"] is None  # no trial pending: null, not 0
    assert list(document["slots"]) == ["A", "B"] and document["notes"] == ["one note"]


def test_history_event() -> None:
    same(Event("2026-01-01T00:00:00+00:00", EventName.ROLLED_BACK, Slot.B, "2.0", "why"),
         {"time": "2026-01-01T00:00:00+00:00", "event": "rolled-back", "slot": "B",
          "version": "2.0", "detail": "why"})
    same(Event("t", "from-a-later-version", None, None, ""),
         {"time": "t", "event": "from-a-later-version", "slot": None, "version": None,
          "detail": ""})
    assert [str(e) for e in EventName] == [
        "installed", "install-failed", "delta-fallback", "interrupted", "trial-armed",
        "trial-boot", "committed", "rolled-back", "fallback", "manual-rollback", "marked-bad",
        "repaired", "hook-failed", "security-floor"]


def test_apply() -> None:
    dry = Installed(Slot.B, "2.0", "acme-box", 0, dry_run=True)
    same(dry, {"slot": "B", "version": "2.0", "compatible": "acme-box", "written": 0,
               "dry_run": True})
    traffic = Traffic(downloaded=1000, written=3000, reused_from_target=5000,
                      copied_from_active=7000, delta="delta")
    armed = Installed(Slot.B, "2.0", "acme-box", 4096, dry_run=False, seconds=1.25, tries=3,
                      traffic=traffic)
    same(armed, {"slot": "B", "version": "2.0", "compatible": "acme-box", "written": 4096,
                 "dry_run": False, "seconds": 1.25, "tries": 3, "bytes_downloaded": 1000,
                 "bytes_written": 3000, "bytes_reused_from_target": 5000,
                 "bytes_copied_from_active": 7000, "update": "delta"})


def test_small_results() -> None:
    same(SlotVersion(Slot.A, "1.0"), {"slot": "A", "version": "1.0"})
    same(MarkedBad(Slot.B, Slot.A), {"slot": "B", "next_boot": "A"})
    same(KeyPair(Path("k.key"), Path("k.pub"), "abcd"),
         {"private": "k.key", "public": "k.pub", "key_id": "abcd"})
    same(CheckResult("oci://h/r:t", "2.0", "1.0"),
         {"reference": "oci://h/r:t", "version": "2.0", "committed": "1.0"})
    same(DiskMade(Path("disk.img"), "grub", 64 << 20, "acme-box", None),
         {"target": "disk.img", "bootloader": "grub", "slot_size": 64 << 20,
          "compatible": "acme-box", "version": None})
    same(HookInstalled("busybox", Path("/"), (Path("/etc/inittab"),)),
         {"init": "busybox", "root": "/", "written": ["/etc/inittab"]})


def test_boot_hook() -> None:
    report = Report((Result("10-app", Kind.REQUIRED, True, 0.5, "fine"),))
    same(HookResult(Slot.B, Outcome.COMMITTED, "healthy", health=report),
         {"slot": "B", "outcome": "committed", "summary": "healthy",
          "health": {"healthy": True, "summary": "healthy: 1 of 1 checks passed",
                     "checks": [{"name": "10-app", "kind": "required", "result": "pass",
                                 "seconds": 0.5, "output": "fine"}]}})
    same(HookResult(Slot.A, Outcome.COMMITTED_BOOT, "nothing", repaired=(), problems=("p",)),
         {"slot": "A", "outcome": "committed-boot", "summary": "nothing", "repaired": [],
          "problems": ["p"]})
    same(HookResult(Slot.A, Outcome.TRIAL_PENDING, "armed"),
         {"slot": "A", "outcome": "trial-pending", "summary": "armed"})
    assert {o for o in Outcome if o.notifies} == {"committed", "rolled-back", "fallback"}


def test_image_documents(tmp_path: Path) -> None:
    """`image verify` and `image inspect` through the CLI: the contract's keys, in order."""
    key = keypair(tmp_path)
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"root" * 4096)
    image = tmp_path / "image.tar"
    build.build(rootfs, "1.2", "acme-box", [key.private], image, compression="zstd")
    verified = json.loads(run_cli("image", "verify", str(image), "--pubkey", str(key.public),
                                  "--json").stdout)
    assert list(verified) == ["version", "compatible", "payloads", "signatures"]
    inspected = json.loads(run_cli("image", "inspect", str(image), "--json").stdout)
    assert list(inspected) == ["version", "compatible", "format", "created", "payloads",
                               "signatures", "security_floor"]
    for document in (verified, inspected):
        assert (document["version"], document["compatible"]) == ("1.2", "acme-box")
        # the slot payload after its delta index (the group index and the chunk tables)
        assert [list(p) for p in document["payloads"]] == [
            ["name", "kind", "size", "sha256", "compression", "blake3"]] * 3
        assert [(p["kind"], p["compression"]) for p in document["payloads"]] == [
            ("index", "none"), ("chunks", "none"), ("slot", "zstd")]
        assert [list(s) for s in document["signatures"]] == [["key_id", "trusted", "revoked"]]
    assert verified["signatures"][0]["trusted"] is True
    assert inspected["signatures"][0]["trusted"] is None
