"""The GRUB env protocol as a state machine, against a model of grub.cfg.

`ModelGrub` reads and writes the two env blocks the way grub.cfg does on stock GRUB 2.06:
`load_env -f FILE <whitelist>` (GRUB's envblk iterate), the validity and newest-block tests,
the decrement chain, and `save_env -f FILE ...` (a port of GRUB's grub_envblk_set writing the
whole 1024-byte block in place). The backend under test is the real `Grub` class on plain
files. A power cut is a write that stops after any byte: the prefix is new, the rest old.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from abupgrade.bootloader import grub as grub_mod
from abupgrade.bootloader.base import BootState
from abupgrade.bootloader.grub import (
    ENV_SIZE,
    EnvState,
    Grub,
    GrubConfig,
    block_generation,
    block_paths,
    create_blocks,
    current,
    format_envblk,
    parse_envblk,
    render_cfg,
)
from abupgrade.errors import PolicyRefusal, UsageError
from abupgrade.model import Slot
from fixtures.grub_model import (
    REAL_WRITE_IN_PLACE,
    SIG,
    Decision,
    ModelGrub,
    PowerCut,
    grub_envblk_set,
    grub_iterate,
    torn,
)

# ---------------------------------------------------------------- the machine

@pytest.fixture
def env_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when there is one: thousands of fsyncs then cost nothing."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="abupgrade-grub-") as d:
            yield Path(d)
    else:
        yield tmp_path


def make_grub(env_dir: Path, tries: int = 3) -> Grub:
    settings = GrubConfig(env=env_dir / "grubenv", tries=tries)
    create_blocks(settings.env)
    return Grub(settings)


@dataclass
class Write:
    who: str  # "abupgrade" or "grub"
    old: bytes
    new: bytes
    state_before: BootState


class Machine:
    """Two slots with images that boot ok, panic, hang or fail to load; GRUB modelled;
    abupgrade's backend real. Every env write - abupgrade's and GRUB's - goes through
    `write`, which logs it and can cut the power after any byte of the n-th one."""

    def __init__(self, env_dir: Path, monkeypatch: pytest.MonkeyPatch, tries: int = 3,
                 cut: tuple[int, int] | None = None) -> None:
        self.grub = make_grub(env_dir, tries)
        self.images = {Slot.A: "ok", Slot.B: "empty"}
        self.booted: list[Slot] = []
        self.trial_boots = 0
        self.cut = cut
        self.log: list[Write] = []
        self.real_write = REAL_WRITE_IN_PLACE
        self.who = "abupgrade"
        monkeypatch.setattr(grub_mod, "write_in_place", self.write)

    def write(self, path: Path, data: bytes) -> None:
        old = path.read_bytes()
        self.log.append(Write(self.who, old, data, self.grub.read()))
        if self.cut is not None and len(self.log) - 1 == self.cut[0]:
            self.real_write(path, torn(old, data, self.cut[1]))
            raise PowerCut()
        self.real_write(path, data)

    def power_on(self) -> Slot | None:
        """One boot: GRUB decides, the kernel runs the image; an ok image's hook commits a
        slot booted while it is not the default (a trial), as the boot hook does. None when
        the power failed while GRUB wrote."""
        before = self.grub.read()
        self.who = "grub"
        try:
            decision = ModelGrub(self.grub.env_paths, self.write).boot()
        except PowerCut:
            return None
        finally:
            self.who = "abupgrade"
        slot = decision.boot
        if self.images[slot] == "noload":
            assert decision.fallback is not None, "a kernel failed to load and no fallback"
            slot = decision.fallback
        assert self.images[slot] != "empty", f"booted empty slot {slot}"
        self.booted.append(slot)
        if decision.tried:
            assert before.trial == decision.boot and before.tries_left >= 1
            if slot == decision.boot:
                self.trial_boots += 1
        if self.images[slot] == "ok" and self.grub.read().default != slot:
            try:
                self.grub.commit(slot)
            except PowerCut:
                pass
        return slot

    def update(self, slot: Slot, image: str, tries: int) -> bool:
        """What `apply` does to the bootloader: disable the slot, write it, arm a trial.
        False when the power failed on the way."""
        try:
            self.grub.disable(slot)
            self.images[slot] = image
            self.grub.arm_trial(slot, tries)
        except PowerCut:
            return False
        return True


# ---------------------------------------------------------------- plain behaviour

def test_fresh_blocks_boot_a_only(env_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine(env_dir, monkeypatch)
    assert m.grub.read() == BootState(default=Slot.A, bootable=frozenset({Slot.A}))
    assert [m.power_on() for _ in range(3)] == [Slot.A] * 3
    assert ModelGrub(m.grub.env_paths).boot() == Decision(Slot.A, None, False)
    assert m.log == []  # GRUB writes nothing without a trial


@pytest.mark.parametrize("tries", range(1, 10))
@pytest.mark.parametrize("image", ["panic", "hang"])
def test_failing_trial_gets_exactly_n_boots(
        env_dir: Path, monkeypatch: pytest.MonkeyPatch, tries: int, image: str) -> None:
    m = Machine(env_dir, monkeypatch, tries)
    assert m.update(Slot.B, image, tries)
    assert m.grub.read().next_boot is Slot.B
    seq = [m.power_on() for _ in range(tries + 3)]
    assert seq == [Slot.B] * tries + [Slot.A] * 3
    assert m.trial_boots == tries
    assert [w.who for w in m.log] == ["abupgrade"] * 2 + ["grub"] * tries
    state = m.grub.read()
    assert (state.default, state.trial, state.tries_left, state.next_boot) == \
        (Slot.A, Slot.B, 0, Slot.A)
    assert state.bootable == {Slot.A}


def test_good_trial_is_committed_and_keeps_the_old_slot_as_fallback(
        env_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine(env_dir, monkeypatch)
    assert m.update(Slot.B, "ok", 3)
    assert [m.power_on() for _ in range(3)] == [Slot.B] * 3
    assert m.trial_boots == 1
    assert m.grub.read() == BootState(default=Slot.B, bootable=frozenset(Slot))
    assert ModelGrub(m.grub.env_paths).boot() == Decision(Slot.B, Slot.A, False)


def test_trial_whose_kernel_fails_to_load_falls_back_to_default(
        env_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine(env_dir, monkeypatch)
    assert m.update(Slot.B, "noload", 2)
    assert ModelGrub(m.grub.env_paths, lambda p, d: None).boot() == Decision(Slot.B, Slot.A, True)
    assert [m.power_on() for _ in range(4)] == [Slot.A] * 4
    assert m.grub.read().next_boot is Slot.A


def test_updates_alternate_slots_through_many_generations(
        env_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine(env_dir, monkeypatch)
    slot = Slot.B
    for round_ in range(12):
        image = "panic" if round_ % 3 == 2 else "ok"
        assert m.update(slot, image, 2)
        for _ in range(4):
            m.power_on()
        if image == "ok":
            assert m.grub.read().default is slot
            assert m.booted[-1] is slot
            slot = slot.other
        else:
            assert m.booted[-4:] == [slot, slot, slot.other, slot.other]


# ---------------------------------------------------------------- transitions

def test_disable_moves_default_to_the_other_good_slot(env_dir: Path) -> None:
    g = make_grub(env_dir)
    g.commit(Slot.B)
    assert g.read() == BootState(default=Slot.B, bootable=frozenset(Slot))
    g.disable(Slot.B)
    assert g.read() == BootState(default=Slot.A, bootable=frozenset({Slot.A}))


def test_disable_refuses_the_last_bootable_slot(env_dir: Path) -> None:
    g = make_grub(env_dir)
    before = [p.read_bytes() for p in g.env_paths]
    with pytest.raises(PolicyRefusal):
        g.disable(Slot.A)
    assert [p.read_bytes() for p in g.env_paths] == before


def test_disable_clears_a_trial_of_that_slot(env_dir: Path) -> None:
    g = make_grub(env_dir)
    g.arm_trial(Slot.B, 3)
    assert g.read() == BootState(default=Slot.A, bootable=frozenset(Slot), trial=Slot.B,
                                 tries_left=3)
    g.disable(Slot.B)
    assert g.read() == BootState(default=Slot.A, bootable=frozenset({Slot.A}))


def test_commit_clears_the_trial(env_dir: Path) -> None:
    g = make_grub(env_dir)
    g.arm_trial(Slot.B, 3)
    g.commit(Slot.B)
    assert g.read() == BootState(default=Slot.B, bootable=frozenset(Slot))
    g.commit(Slot.A)
    assert g.read() == BootState(default=Slot.A, bootable=frozenset(Slot))


def test_tries_are_capped_at_nine(env_dir: Path) -> None:
    g = make_grub(env_dir)
    g.arm_trial(Slot.B, 42)
    assert g.read().tries_left == 9
    with pytest.raises(ValueError):
        g.arm_trial(Slot.B, 0)


def test_every_write_goes_to_the_block_that_is_not_current(env_dir: Path) -> None:
    g = make_grub(env_dir)
    for i in range(7):
        before = g.current()
        assert before.index is not None
        kept = g.env_paths[before.index].read_bytes()
        if i % 2:
            g.arm_trial(Slot.B, 1 + i % 3)
        else:
            g.commit(Slot.A)
        after = g.current()
        assert after.index == before.target
        assert after.generation == (before.generation + 1) % 3
        assert g.env_paths[before.index].read_bytes() == kept


def test_grub_and_abupgrade_pick_the_same_block(env_dir: Path) -> None:
    """Every pair of block contents: valid generations 0..2, torn, zeroed, duplicated."""
    paths = block_paths(env_dir / "grubenv")
    states = [EnvState(default=Slot.B, good=frozenset({Slot.B})),
              EnvState(default=Slot.A, good=frozenset(Slot), trial=Slot.B, tries=2)]
    variants: list[bytes] = [states[i % 2].block(i) for i in range(3)]
    variants.append(torn(states[0].block(0), states[1].block(1), 40))
    variants.append(b"\0" * ENV_SIZE)
    variants.append(format_envblk([("ab_gen", "1"), ("ab_end", "1"), ("ab_gen", "2")]))
    for first in variants:
        for second in variants:
            paths[0].write_bytes(first)
            paths[1].write_bytes(second)
            model = ModelGrub(paths, lambda p, d: None)
            assert (block_generation(first) is not None) == model.load(0)[1]
            assert (block_generation(second) is not None) == model.load(1)[1]
            cur = current([first, second])
            expected = cur.state.boot_state().next_boot
            if not [first, second][cur.target].startswith(SIG):
                # GRUB cannot save a trial's count into a block that is not an envblk at
                # all, so it does not boot the trial: the safe way round.
                expected = cur.state.boot_state().default
            assert model.boot().boot == expected


# ---------------------------------------------------------------- power cuts

def distinct_cuts(old: bytes, new: bytes) -> list[int]:
    """Every cut position 0..len, one per distinct torn result."""
    seen: set[bytes] = set()
    cuts = []
    for cut in range(len(new) + 1):
        result = torn(old, new, cut)
        if result not in seen:
            seen.add(result)
            cuts.append(cut)
    return cuts


def update_and_boot(m: Machine, image: str, tries: int) -> bool:
    armed = m.update(Slot.B, image, tries)
    for _ in range(tries + 4):
        m.power_on()
    return armed


@pytest.mark.parametrize("image", ["ok", "panic", "hang", "noload"])
def test_power_cut_at_every_byte_of_every_write(
        env_dir: Path, monkeypatch: pytest.MonkeyPatch, image: str) -> None:
    """An update of slot B (disable, arm a trial), boots until it settles, and the boot
    hook's commit. Run once to learn every env write, abupgrade's and GRUB's; then, for each
    write and each byte of it, again with the power cut there. Every run must boot only
    slot A (good) or the armed trial, give the trial at most N boots (exactly N when it
    never commits), and settle on a good image; after a cut abupgrade reads the state from
    before or after that write."""
    tries = 2
    clean = Machine(env_dir, monkeypatch, tries)
    assert update_and_boot(clean, image, tries)
    writes = clean.log
    assert [w.who for w in writes].count("grub") == (1 if image == "ok" else tries)
    final = clean.grub.read()
    runs = 0
    for index, write in enumerate(writes):
        state_after = writes[index + 1].state_before if index + 1 < len(writes) else final
        for cut in distinct_cuts(write.old, write.new):
            for f in env_dir.iterdir():
                f.unlink()
            m = Machine(env_dir, monkeypatch, tries, cut=(index, cut))
            m.update(Slot.B, image, tries)
            for _ in range(tries + 4):
                if len(m.log) > index:
                    break
                m.power_on()
            # The cut write is done: abupgrade reads the state from before or after it.
            assert m.grub.read() in (write.state_before, state_after), (index, cut)
            for _ in range(tries + 4):
                m.power_on()
            check_run(m, image, tries, where=(index, write.who, cut))
            runs += 1
    assert runs > 3 * len(writes)


def check_run(m: Machine, image: str, tries: int, where: tuple[int, str, int]) -> None:
    armed = any(w.who == "grub" for w in m.log) or m.trial_boots > 0
    assert set(m.booted) <= {Slot.A, Slot.B}, where
    assert m.trial_boots <= tries, where
    final = m.grub.read()
    assert m.images[m.booted[-1]] == "ok", where  # settled on a good image
    if image == "ok":
        if armed:
            assert final.default is Slot.B and m.booted[-1] is Slot.B, where
        assert 1 <= m.trial_boots or not armed, where
    else:
        assert m.booted[-1] is Slot.A and final.next_boot is Slot.A, where
        if image != "noload" and armed:
            # A cut while GRUB saves the decrement, or after it, costs that try its boot.
            spent = 1 if where[1] == "grub" else 0
            assert tries - spent <= m.trial_boots <= tries, (where, m.booted)
        # B boots only as a trial: never as a default or fallback
        assert m.booted.count(Slot.B) == m.trial_boots, where


def second_update(m: Machine, image: str, tries: int) -> int:
    """B updated and committed, then A updated with `image`; the writes of the first part."""
    assert m.update(Slot.B, "ok", tries)
    for _ in range(2):
        m.power_on()
    first = len(m.log)
    m.update(Slot.A, image, tries)
    for _ in range(tries + 4):
        m.power_on()
    return first


@pytest.mark.parametrize("image", ["ok", "panic"])
def test_power_cut_in_an_update_of_a_after_b_was_committed(
        env_dir: Path, monkeypatch: pytest.MonkeyPatch, image: str) -> None:
    """The same, one update later: other values change, the generations wrap around."""
    tries = 3
    clean = Machine(env_dir, monkeypatch, tries)
    first = second_update(clean, image, tries)
    assert clean.booted[-1] is (Slot.A if image == "ok" else Slot.B)
    for index in range(first, len(clean.log)):
        write = clean.log[index]
        for cut in distinct_cuts(write.old, write.new):
            for f in env_dir.iterdir():
                f.unlink()
            m = Machine(env_dir, monkeypatch, tries, cut=(index, cut))
            second_update(m, image, tries)
            where = (index, write.who, cut)
            assert m.images[m.booted[-1]] == "ok", where
            after_commit = m.booted[2:]
            a_trials = [w for w in m.log[first:] if w.who == "grub"]
            if image == "panic":
                assert after_commit.count(Slot.A) <= tries, where
                assert m.booted[-1] is Slot.B and m.grub.read().next_boot is Slot.B, where
                if a_trials and write.who == "abupgrade":
                    assert after_commit.count(Slot.A) == tries, (where, m.booted)
            elif a_trials:
                assert m.grub.read().default is Slot.A and m.booted[-1] is Slot.A, where


# ---------------------------------------------------------------- format and template

def test_envblk_round_trip_with_escapes() -> None:
    items = [("plain", "x"), ("slash", "a\\b"), ("newline", "one\ntwo"), ("empty", "")]
    data = format_envblk(items)
    assert len(data) == ENV_SIZE
    assert parse_envblk(data) == dict(items)
    assert dict(grub_iterate(data)) == dict(items)
    with pytest.raises(ValueError):
        format_envblk([("big", "x" * ENV_SIZE)])
    assert parse_envblk(b"garbage" + b"#" * 1017) is None


def test_grub_envblk_set_port_matches_our_format() -> None:
    state = EnvState(default=Slot.A, good=frozenset({Slot.A}), trial=Slot.B, tries=3)
    buf = bytearray(state.block(0))
    for name, value in EnvState(default=Slot.B, good=frozenset(Slot)).variables(1):
        assert grub_envblk_set(buf, name, value)
    assert bytes(buf) == EnvState(default=Slot.B, good=frozenset(Slot)).block(1)


def test_rendered_cfg_has_every_placeholder_filled() -> None:
    text = render_cfg(boot_device="(hd0,gpt2)", env_rel="grub/grubenv",
                      parts={Slot.A: "(hd0,gpt3)", Slot.B: "(hd0,gpt4)"},
                      roots={Slot.A: "PARTLABEL=rootfs_a", Slot.B: "PARTUUID=1234-5"},
                      cmdline="console=ttyS0 panic=5")
    assert "@" not in text
    assert 'ab_load "(hd0,gpt2)/grub/grubenv"' in text
    assert 'ab_target="(hd0,gpt2)/grub/grubenv.1"' in text
    assert "linux (hd0,gpt2)/grub/slots/B/vmlinuz root=PARTUUID=1234-5 console=ttyS0 " \
           "panic=5 abupgrade.slot=B" in text
    assert "terminal_input" not in text
    with pytest.raises(UsageError):
        render_cfg(boot_device="(hd0,gpt2)", env_rel="grub/grubenv",
                   parts={Slot.A: "(hd0,gpt3)", Slot.B: "(hd0,gpt4)"},
                   roots={Slot.A: "a", Slot.B: "b"}, cmdline="quiet; reboot")


def test_preflight_refuses_btrfs_and_lvm_from_mountinfo(env_dir: Path, tmp_path: Path) -> None:
    g = make_grub(env_dir)
    for fstype, source, words in (("btrfs", "/dev/sda2", "btrfs"),
                                  ("zfs", "pool/boot", "ZFS"),
                                  ("ext4", "/dev/mapper/vg-boot", "device-mapper"),
                                  ("ext4", "/dev/md0", "RAID")):
        mountinfo = tmp_path / f"mountinfo-{fstype}"
        mountinfo.write_text(f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
                             f"30 1 0:99 / {env_dir.resolve()} rw - {fstype} {source} rw\n")
        bad = Grub(g.settings, mountinfo=mountinfo)
        with pytest.raises(UsageError, match=words) as info:
            bad.preflight()
        assert info.value.hint
