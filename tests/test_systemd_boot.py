"""The systemd-boot backend's protocol on ESP files (no FAT yet: the power-cut sweep on real
FAT images is test_sdboot_powercut.py), with the loader modelled by bls.py, rename included."""

from __future__ import annotations

import pytest

from abupgrade.bootloader import bls
from abupgrade.bootloader.systemd_boot import (
    LOADER_CONF,
    Create,
    Esp,
    boot_path,
    entry_name,
    entry_text,
    kernel_options,
    plan_arm_trial,
    plan_commit,
    plan_disable,
    plan_drop_files,
    plan_tidy,
)
from abupgrade.errors import OperationalError, PolicyRefusal
from abupgrade.model import Slot
from fixtures.sdboot import Files, apply_steps, boot, snapshot

A, B = Slot.A, Slot.B
OPTIONS = {A: "root=PARTLABEL=rootfs_a panic=5 abupgrade.slot=A",
           B: "root=PARTLABEL=rootfs_b panic=5 abupgrade.slot=B"}


def fresh() -> Files:
    return {
        "loader/loader.conf": LOADER_CONF.encode(),
        boot_path(A, "kernel"): b"kernel A", boot_path(A, "initrd"): b"initrd A",
        f"loader/entries/{entry_name(A)}": entry_text(A, 1, options=OPTIONS[A], initrd=True),
    }


def install(files: Files, slot: Slot, tries: int = 3) -> None:
    """What apply does on the ESP: the slot disabled, its files replaced, a trial armed."""
    esp = snapshot(files)
    if esp.names(slot):
        apply_steps(files, plan_disable(esp, slot))
    apply_steps(files, plan_drop_files(snapshot(files), slot))
    files[boot_path(slot, "kernel")] = b"kernel " + slot.value.encode()
    files[boot_path(slot, "initrd")] = b"initrd " + slot.value.encode()
    apply_steps(files, plan_arm_trial(snapshot(files), slot, tries, options=OPTIONS[slot]))


def booted(files: Files) -> Slot:
    started = boot(files)
    assert started is not None
    return Slot(started.entry.name[5].upper())


def test_a_fresh_esp_boots_slot_a() -> None:
    files = fresh()
    state = snapshot(files).state()
    assert (state.default, state.bootable, state.trial) == (A, frozenset({A}), None)
    assert booted(files) is A


@pytest.mark.parametrize("tries", [1, 2, 3, 5])
def test_a_trial_gets_exactly_its_tries_then_the_default_boots(tries: int) -> None:
    files = fresh()
    install(files, B, tries)
    boots = []
    for left in range(tries, 0, -1):
        state = snapshot(files).state()
        assert (state.trial, state.tries_left, state.default) == (B, left, A)
        boots.append(booted(files))
    assert boots == [B] * tries
    state = snapshot(files).state()
    assert (state.trial, state.default, state.bootable) == (None, A, frozenset({A, B}))
    assert booted(files) is A and booted(files) is A
    assert f"loader/entries/slot-b+0-{tries}.conf" in files


def test_commit_keeps_the_trial_first_and_ends_the_counting() -> None:
    files = fresh()
    install(files, B)
    assert booted(files) is B
    apply_steps(files, plan_commit(snapshot(files), B))
    assert "loader/entries/slot-b.conf" in files
    state = snapshot(files).state()
    assert (state.default, state.trial, state.bootable) == (B, None, frozenset({A, B}))
    assert [booted(files) for _ in range(4)] == [B] * 4


def test_commit_on_the_last_try_and_after_it() -> None:
    for boots in (1, 2):
        files = fresh()
        install(files, B, tries=1)
        for _ in range(boots):
            booted(files)
        apply_steps(files, plan_commit(snapshot(files), B))
        assert snapshot(files).state().default is B and booted(files) is B


def test_rollback_sets_the_left_slot_aside_and_back() -> None:
    files = fresh()
    install(files, B)
    booted(files)
    apply_steps(files, plan_commit(snapshot(files), B))
    steps = plan_commit(snapshot(files), A)  # rollback to A
    apply_steps(files, steps)
    assert "loader/entries/slot-b+0-0.conf" in files  # B set aside, still there
    state = snapshot(files).state()
    assert (state.default, state.trial, state.bootable) == (A, None, frozenset({A, B}))
    assert booted(files) is A
    apply_steps(files, plan_commit(snapshot(files), B))  # and back
    assert sorted(n for n in files if n.startswith("loader/entries/")) == \
        ["loader/entries/slot-a.conf", "loader/entries/slot-b.conf"]
    assert booted(files) is B


def test_updates_alternate_slots_and_generations_grow() -> None:
    files = fresh()
    for n, slot in enumerate([B, A, B, A, B]):
        install(files, slot)
        assert booted(files) is slot
        apply_steps(files, plan_commit(snapshot(files), slot))
        assert snapshot(files).generation() == n + 2
        assert booted(files) is slot and booted(files) is slot


def test_a_failed_trial_is_disabled_and_the_next_one_works() -> None:
    files = fresh()
    install(files, B, tries=2)
    booted(files), booted(files)
    assert booted(files) is A
    apply_steps(files, plan_disable(snapshot(files), B))  # the hook marks B bad
    assert snapshot(files).state().bootable == {A}
    install(files, B, tries=2)
    assert booted(files) is B


def test_disable_refuses_to_leave_nothing_bootable() -> None:
    files = fresh()
    with pytest.raises(PolicyRefusal):
        plan_disable(snapshot(files), A)
    install(files, B, tries=1)
    booted(files)  # B spent: A must stay
    with pytest.raises(PolicyRefusal):
        plan_disable(snapshot(files), A)
    assert plan_disable(snapshot(files), B)


def test_arm_needs_a_disabled_slot_with_a_kernel() -> None:
    files = fresh()
    with pytest.raises(OperationalError, match="kernel"):
        plan_arm_trial(snapshot(files), B, 3, options=OPTIONS[B])
    with pytest.raises(OperationalError, match="disabled"):
        plan_arm_trial(snapshot(files), A, 3, options=OPTIONS[A])
    with pytest.raises(ValueError):
        plan_arm_trial(snapshot(files), B, 0, options=OPTIONS[B])


def test_an_image_without_initrd_gets_an_entry_without_one() -> None:
    files = fresh()
    files[boot_path(B, "kernel")] = b"k"
    steps = plan_arm_trial(snapshot(files), B, 3, options=OPTIONS[B])
    create = steps[-1]
    assert isinstance(create, Create) and b"initrd" not in create.data
    entry = bls.Entry.parse("x.conf", create.data)
    assert entry is not None and entry.version == "2" and entry.sort_key == "abupgrade"


def test_kernel_options_always_name_the_slot_and_a_panic_timeout() -> None:
    assert kernel_options(B, "PARTLABEL=rootfs_b", "console=ttyS0") == \
        "root=PARTLABEL=rootfs_b console=ttyS0 panic=5 abupgrade.slot=B"
    assert kernel_options(A, "/dev/vda3", "panic=10 abupgrade.slot=B quiet") == \
        "root=/dev/vda3 panic=10 quiet abupgrade.slot=A"


def test_two_names_of_a_committed_slot_are_one_good_slot() -> None:
    """A cut in the commit rename can leave both names (on the same clusters)."""
    files = fresh()
    install(files, B)
    booted(files)
    files["loader/entries/slot-b.conf"] = files["loader/entries/slot-b+2-1.conf"]
    state = snapshot(files).state()
    assert (state.default, state.trial) == (B, None)
    assert plan_commit(snapshot(files), B) == []
    steps = plan_disable(snapshot(files), B)
    assert [getattr(s, "path", "") for s in steps] == \
        ["loader/entries/slot-b+2-1.conf", "loader/entries/slot-b.conf"]


def test_tidy_removes_leftovers_only_of_slots_without_an_entry() -> None:
    files = fresh()
    files["loader/entries/slot-b+3-0.conf.abupgrade-new"] = b"half"
    files["loader/entries/SLOT-B~1.CON"] = b"remnant"
    files["loader/entries/SLOT-A~1.CON"] = b"may share clusters with slot-a.conf"
    files["loader/entries/other.conf"] = b"not ours"
    paths = [getattr(s, "path", "") for s in plan_tidy(snapshot(files))]
    assert paths == ["loader/entries/SLOT-B~1.CON",
                     "loader/entries/slot-b+3-0.conf.abupgrade-new"]


def test_a_default_set_in_efi_variables_is_what_the_loader_obeys() -> None:
    files = fresh()
    install(files, B)
    esp = snapshot(files, bls.EfiVars(entry_default="slot-a.conf"))
    assert (esp.state().trial, esp.state().default) == (None, A)


def test_an_esp_without_entries_or_with_a_foreign_first_entry_is_an_error() -> None:
    with pytest.raises(OperationalError, match="no entry"):
        Esp(entries={}, files=frozenset()).state()
    files = fresh()
    files["loader/loader.conf"] = b"timeout 0\n"
    files["loader/entries/zzz.conf"] = b"sort-key a\nlinux /abupgrade/A/vmlinuz\n"
    with pytest.raises(OperationalError, match="zzz.conf"):
        snapshot(files).state()
