"""Unit tier: the syslinux backend's protocol against a model of syslinux.

The model reads extlinux.conf and the two ADV copies the way syslinux 6.04 does at boot
(first valid copy; a boot-once record is cleared on disk before the kernel loads; a label or
kernel that fails to load runs `ONERROR reboot.c32`), written here independently of the
backend's own parser. Every reachable state and every operation is explored, and a power cut
is simulated after each byte of each ADV copy and on either side of each config rename.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from abupgrade.bootloader import adv
from abupgrade.bootloader.adv import Adv
from abupgrade.bootloader.base import BootState
from abupgrade.bootloader.syslinux import (
    ExtlinuxConf,
    Snapshot,
    Step,
    Syslinux,
    SyslinuxConfig,
    WriteAdv,
    WriteConf,
    fresh_config,
    plan_arm_trial,
    plan_commit,
    plan_disable,
)
from abupgrade.errors import AbupgradeError, OperationalError, PolicyRefusal
from abupgrade.model import Slot
from fixtures.syslinux_model import (
    ROOTS,
    Disk,
    model_boot,
    model_conf,
    model_once,
    snapshot,
    valid_copy,
)

# ---------------------------------------------------------------- power cuts


def apply_step(disk: Disk, step: Step) -> Disk:
    if isinstance(step, WriteConf):
        return replace(disk, conf=step.conf.render())
    pair = disk.pair
    for offset, data in adv.write_order(pair, step.adv):
        pair = pair[:offset] + data + pair[offset + len(data):]
    return replace(disk, pair=pair)


def cut_states(disk: Disk, steps: list[Step]) -> Iterator[Disk]:
    """Every state a power cut can leave: between steps (a rename is atomic: old or new
    file) and after each byte of each ADV copy written in place."""
    yield disk
    for step in steps:
        if isinstance(step, WriteAdv):
            pair = disk.pair
            for offset, data in adv.write_order(pair, step.adv):
                for n in range(1, len(data)):
                    yield replace(disk, pair=pair[:offset] + data[:n] + pair[offset + n:])
                pair = pair[:offset] + data + pair[offset + len(data):]
        disk = apply_step(disk, step)
        yield disk


# ---------------------------------------------------------------- exploring every transition

Op = tuple[str, Slot]
PLANS: dict[str, Callable[[Snapshot, Slot], list[Step]]] = {
    "disable": plan_disable, "arm_trial": plan_arm_trial, "commit": plan_commit}


def initial() -> Disk:
    return Disk(fresh_config(ROOTS, "console=ttyS0 panic=5"), Adv().encode_pair(),
                frozenset({Slot.A}))


def successors(disk: Disk) -> Iterator[tuple[str, Disk]]:
    """Everything that can happen next: an operation, a boot, writing a disabled slot."""
    snap = snapshot(disk)
    for name, plan in PLANS.items():
        for slot in Slot:
            try:
                steps = plan(snap, slot)
            except AbupgradeError:
                continue
            after = disk
            for step in steps:
                after = apply_step(after, step)
            yield f"{name}({slot})", after
    yield "boot", model_boot(disk).disk
    for slot in Slot:
        if slot not in snap.conf.enabled:  # abupgrade writes a slot only once it is disabled
            yield f"write({slot})", replace(disk, kernels=disk.kernels ^ {slot})


def reachable() -> list[Disk]:
    seen = {initial()}
    todo = [initial()]
    while todo:
        for _, nxt in successors(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return sorted(seen, key=disk_key)


def disk_key(disk: Disk) -> tuple[str, bytes, list[Slot]]:
    """The same order in every process (a frozenset's repr follows string hashing, which
    differs from process to process; the test processes must collect the same list)."""
    return disk.conf, disk.pair, sorted(disk.kernels)


def state_id(disk: Disk) -> str:
    state = snapshot(disk).state()
    return (f"default={state.default}-bootable={''.join(sorted(state.bootable))}"
            f"-trial={state.trial}-left={state.tries_left}")


STATES = reachable()


def test_state_space_is_explored() -> None:
    # default x enabled x once x kernels, minus what the protocol never reaches
    assert 10 <= len(STATES) <= 100, len(STATES)
    onces = {model_once(d.pair) for d in STATES}
    assert onces == {None, "a", "b"}
    assert {snapshot(d).conf.default for d in STATES} == set(Slot)


@pytest.mark.parametrize("disk", STATES, ids=state_id)
def test_every_state_boots_what_read_says(disk: Disk) -> None:
    state = snapshot(disk).state()
    first = model_boot(disk)
    assert first.slot is not None, "syslinux never finds a kernel"
    assert first.slot == state.next_boot
    assert first.slot in state.bootable
    # A trial gets exactly one boot: if it fails, the next power-on is the default.
    second = model_boot(first.disk)
    assert not second.once
    assert second.slot == state.default
    if state.trial is not None:
        assert first.once and first.slot == state.trial and state.tries_left == 1


@pytest.mark.parametrize("disk", STATES, ids=state_id)
@pytest.mark.parametrize("op", [(n, s) for n in PLANS for s in Slot], ids=str)
def test_every_transition_under_power_cuts(disk: Disk, op: Op) -> None:
    name, slot = op
    before = snapshot(disk)
    try:
        steps = PLANS[name](before, slot)
    except PolicyRefusal:
        assert name == "disable" and before.conf.default == slot
        assert slot.other not in before.bootable
        return
    except OperationalError:
        assert name in ("arm_trial", "commit") and slot not in disk.kernels
        return
    states = list(cut_states(disk, steps))
    after = snapshot(states[-1]).state()
    old = before.state()

    # The result of the whole operation.
    if name == "disable":
        assert slot not in after.bootable and after.trial != slot and after.default != slot
        assert after.default in after.bootable
    elif name == "arm_trial":
        assert (after.trial, after.next_boot, after.tries_left) == (slot, slot, 1)
        assert after.default == old.default
    else:
        assert (after.default, after.trial, after.next_boot) == (slot, None, slot)
        assert old.bootable - {slot} <= after.bootable
    end = states[-1].pair
    assert end[:512] == end[512:] and valid_copy(end) is not None, "both ADV copies written"
    boot = model_boot(states[-1])
    assert boot.slot == after.next_boot
    assert model_boot(boot.disk).slot == after.default

    # Any instant of the operation: a slot from the old or new state boots, the other one
    # follows when it fails, and what read() says is what syslinux does.
    allowed = {old.default, old.next_boot, after.default, after.next_boot}
    for cut in states:
        assert valid_copy(cut.pair) is not None, "a cut tears at most one ADV copy"
        state = snapshot(cut).state()
        first = model_boot(cut)
        assert first.slot in allowed, (name, slot, cut)
        assert first.slot == state.next_boot
        assert state.default in {old.default, after.default}
        assert model_boot(first.disk).slot == state.default


def test_update_cycle_scenarios() -> None:
    """disable, write, arm, boot: ok commits; panic and hang come back on the default."""
    for outcome in ("ok", "panic", "hang"):
        disk = initial()
        for step in plan_disable(snapshot(disk), Slot.B):
            disk = apply_step(disk, step)
        disk = replace(disk, kernels=disk.kernels | {Slot.B})  # the new image's boot files
        for step in plan_arm_trial(snapshot(disk), Slot.B):
            disk = apply_step(disk, step)
        boot = model_boot(disk)
        assert (boot.slot, boot.once) == (Slot.B, True)
        disk = boot.disk
        assert snapshot(disk).state().next_boot == Slot.A, "the trial is used up"
        if outcome == "ok":  # the boot hook's health checks passed: commit
            for step in plan_commit(snapshot(disk), Slot.B):
                disk = apply_step(disk, step)
            want = Slot.B
        else:  # panic=N reboot, or the watchdog resets a hung boot: no write happens
            want = Slot.A
        for _ in range(3):
            boot = model_boot(disk)
            assert (boot.slot, boot.once) == (want, False), outcome
            disk = boot.disk


def test_disabled_slot_is_never_default_nor_once() -> None:
    for disk in STATES:
        state = snapshot(disk).state()
        default, labels = model_conf(disk.conf)
        disabled = set(Slot) - snapshot(disk).conf.enabled
        for slot in disabled:
            assert slot.value.lower() not in labels, "a disabled slot has no bootable label"
            assert default != slot.value.lower()
            assert model_once(disk.pair) != slot.value.lower()
            assert slot not in state.bootable


def test_refuses_to_disable_the_last_bootable_slot() -> None:
    with pytest.raises(PolicyRefusal) as caught:
        plan_disable(snapshot(initial()), Slot.A)
    assert caught.value.exit_code == 4


def test_conf_edits_keep_user_lines() -> None:
    text = initial().conf.replace("TIMEOUT 1", "TIMEOUT 1\nMENU TITLE kept")
    conf = ExtlinuxConf.parse(text).with_enabled(Slot.B, True).with_default(Slot.B)
    rendered = conf.render()
    assert "MENU TITLE kept" in rendered and "DEFAULT b" in rendered
    assert ExtlinuxConf.parse(rendered) == ExtlinuxConf.parse(rendered)
    assert rendered.count("LABEL b\n") == 1 and "b-disabled" not in rendered
    for broken in ("DEFAULT b-disabled", "DEFAULT c"):
        with pytest.raises(OperationalError):
            ExtlinuxConf.parse(text.replace("DEFAULT a", broken))
    with pytest.raises(OperationalError, match="no LABEL b"):
        ExtlinuxConf.parse(text.replace("LABEL b-disabled", "LABEL c"))


def test_adv_codec_edges() -> None:
    full = Adv().with_record(2, b"x" * 255).with_once("b" * 200)
    assert Adv.decode(full.encode()) == full
    with pytest.raises(ValueError):
        full.with_record(3, b"y" * 100).encode()  # 259 + 202 + 102 > 500
    with pytest.raises(ValueError):
        Adv().with_record(0, b"x")
    assert Adv().with_once("b").with_once(None) == Adv()
    assert Adv.decode_pair(b"\0" * 1024) is None
    assert model_once(Adv().with_once("b").encode_pair()) == "b"


# ---------------------------------------------------------------- the real files


def _files(tmp_path: Path, disk: Disk) -> Syslinux:
    """The disk as plain files: a stand-in ldlinux.sys whose tail is the ADV pair."""
    directory = tmp_path / "extlinux"
    directory.mkdir(exist_ok=True)
    (directory / "ldlinux.sys").write_bytes(b"\x90" * 4096 + disk.pair)
    (directory / "extlinux.conf").write_text(disk.conf)
    loader = Syslinux(SyslinuxConfig(dir=directory))
    for slot in disk.kernels:
        for name in ("kernel", "initrd"):
            path = loader.boot_file_path(slot, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"boot file")
    return loader


def _on_disk(loader: Syslinux) -> Disk:
    return Disk(loader.conf_path.read_text(), adv.read_pair(loader.loader_path),
                frozenset(s for s in Slot if loader.boot_file_path(s, "kernel").exists()))


def test_backend_on_files_matches_the_model(tmp_path: Path) -> None:
    disk = replace(initial(), kernels=frozenset(Slot))
    loader = _files(tmp_path, disk)
    calls: list[tuple[str, Slot, Callable[[Slot], None]]] = [
        ("disable", Slot.B, loader.disable), ("arm_trial", Slot.B, lambda s: loader.arm_trial(s, 3)),
        ("commit", Slot.B, loader.commit), ("arm_trial", Slot.A, lambda s: loader.arm_trial(s, 1)),
        ("disable", Slot.A, loader.disable), ("commit", Slot.B, loader.commit)]
    for name, slot, call in calls:
        for step in PLANS[name](snapshot(disk), slot):
            disk = apply_step(disk, step)
        call(slot)
        assert _on_disk(loader) == disk, (name, slot)
        assert loader.read() == snapshot(disk).state()
    assert loader.read() == BootState(default=Slot.B, bootable=frozenset({Slot.B}))


def test_leftover_temp_file_of_a_cut_rename_changes_nothing(tmp_path: Path) -> None:
    loader = _files(tmp_path, replace(initial(), kernels=frozenset(Slot)))
    before = loader.read()
    new = ExtlinuxConf.parse(initial().conf).with_default(Slot.B).render().encode()
    for n in range(0, len(new) + 1, 7):  # the temp file at many lengths (a cut before rename)
        (loader.dir / ".extlinux.conf.cut.tmp").write_bytes(new[:n])
        assert loader.read() == before
    loader.commit(Slot.B)
    assert loader.read().default == Slot.B


def test_reads_a_hand_written_config_and_once_command() -> None:
    text = initial().conf.replace("DEFAULT a", "default\ta").replace("LABEL b-disabled", "LABEL b")
    disk = replace(initial(), conf=text, kernels=frozenset(Slot),
                   pair=Adv().with_once("b quiet").encode_pair())
    state = snapshot(disk).state()
    assert (state.default, state.trial, state.bootable) == (Slot.A, Slot.B, frozenset(Slot))
    assert model_boot(disk).slot == Slot.B
    upper = replace(disk, conf=text.replace("LABEL b", "LABEL B"))
    with pytest.raises(OperationalError, match="no LABEL b"):
        snapshot(upper)
