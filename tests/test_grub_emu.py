"""The GRUB protocol decided by GRUB's own code: the rendered grub.cfg run by grub-emu
(fixtures/grubemu.py) against env blocks written by abupgrade's real `Grub` backend.

The Python model of grub.cfg (fixtures/grub_model.py) is a readable spec; here each
grub-emu decision is checked against it too, so the spec cannot drift from GRUB."""

from __future__ import annotations

from pathlib import Path

import pytest

from abupgrade.bootloader.grub import Grub, GrubConfig, block_paths, create_blocks, current
from abupgrade.model import Slot
from fixtures.grub_model import ModelGrub
from fixtures.grubemu import EmuMachine, GrubEmu, GrubRun, boot_files, sha256

pytestmark = pytest.mark.loop  # needs grub-emu: where every tier must run, a skip fails

KERNELS = {Slot.A: b"kernel of slot A\n" * 64, Slot.B: b"kernel of slot B\n" * 64}
INITRDS = {Slot.A: b"initrd of slot A\n" * 32, Slot.B: b"initrd of slot B\n" * 32}


def make_grub(folder: Path, tries: int = 3) -> Grub:
    settings = GrubConfig(env=folder / "grubenv", tries=tries)
    create_blocks(settings.env)
    return Grub(settings)


def machine(emu: GrubEmu, grub: Grub, *, kernels: dict[Slot, bytes] | None = None) -> EmuMachine:
    return EmuMachine(emu, grub.settings.env,
                      boot_files(KERNELS if kernels is None else kernels, INITRDS))


def agrees_with_spec(grub: Grub, before: list[bytes], run: GrubRun) -> None:
    """The model of grub.cfg makes the same choice and saves the same block as GRUB did."""
    paths = block_paths(grub.settings.env)
    saved: dict[int, bytes] = {}

    def keep(path: Path, data: bytes) -> None:
        saved[paths.index(path)] = data

    spec_dir = paths[0].parent / "spec"
    spec_dir.mkdir(exist_ok=True)
    spec_paths = block_paths(spec_dir / "grubenv")
    for path, data in zip(spec_paths, before, strict=True):
        path.write_bytes(data)
    decision = ModelGrub(spec_paths, lambda p, d: keep(paths[spec_paths.index(p)], d)).boot()
    assert run.entries, run.output
    assert run.entries[0].slot == decision.boot, (decision, run.output)
    after = [p.read_bytes() for p in paths]
    expected = [saved.get(i, before[i]) for i in range(2)]
    assert after == expected, f"GRUB saved other bytes than the spec: {run.output}"


def boot(m: EmuMachine, grub: Grub) -> GrubRun:
    before = [p.read_bytes() for p in block_paths(grub.settings.env)]
    run = m.power_on()
    agrees_with_spec(grub, before, run)
    return run


@pytest.mark.parametrize("tries", range(1, 10))
def test_a_trial_that_never_reaches_the_hook_gets_exactly_n_boots(
        emu: GrubEmu, tmp_path: Path, tries: int) -> None:
    """Slot B armed with N tries hangs every time: GRUB boots it exactly N times, then A."""
    grub = make_grub(tmp_path, tries)
    grub.commit(Slot.A)
    grub.arm_trial(Slot.B, tries)
    m = machine(emu, grub)
    booted = [boot(m, grub).slot for _ in range(tries + 2)]
    assert booted == [Slot.B] * tries + [Slot.A] * 2, [r.output for r in m.runs]
    assert grub.read().next_boot is Slot.A
    loaded = m.runs[0].booted
    assert loaded is not None
    assert [x.sha256 for x in loaded.loads] == [sha256(KERNELS[Slot.B]), sha256(INITRDS[Slot.B])]


def test_a_committed_machine_boots_its_default_and_writes_nothing(
        emu: GrubEmu, tmp_path: Path) -> None:
    grub = make_grub(tmp_path)
    grub.commit(Slot.B)
    m = machine(emu, grub)
    before = m.files()
    run = boot(m, grub)
    assert run.slot is Slot.B
    assert [e.slot for e in run.entries] == [Slot.B, Slot.A]  # A is the fallback
    assert m.files() == before


def test_grubs_own_save_cut_at_any_byte_leaves_a_good_boot(emu: GrubEmu, tmp_path: Path) -> None:
    """GRUB writes the decremented count in place; a cut tears that write anywhere. Every
    torn block leaves a state from which GRUB boots B (this try) or A, never nothing, and B
    never gets more than its tries."""
    tries = 2
    grub = make_grub(tmp_path, tries)
    grub.arm_trial(Slot.B, tries)
    before = [p.read_bytes() for p in block_paths(grub.settings.env)]
    m = machine(emu, grub)
    boot(m, grub)
    after = [p.read_bytes() for p in block_paths(grub.settings.env)]
    target = next(i for i in range(2) if before[i] != after[i])
    torn_blocks = {after[target][:cut] + before[target][cut:] for cut in range(1025)}
    assert len(torn_blocks) >= 3
    for torn in sorted(torn_blocks):
        blocks = list(before)
        blocks[target] = torn
        for path, data in zip(block_paths(grub.settings.env), blocks, strict=True):
            path.write_bytes(data)
        left = current(blocks).state.tries
        trial_boots = [boot(m, grub).slot for _ in range(tries + 1)].count(Slot.B)
        assert trial_boots == left, (left, [r.output for r in m.runs[-tries - 1:]])
