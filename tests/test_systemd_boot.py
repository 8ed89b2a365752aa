"""The systemd-boot backend's protocol on ESP files (no FAT yet: the power-cut sweep on real
FAT images is test_sdboot_powercut.py), with the loader modelled by bls.py, rename included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from abupgrade.bootloader import bls
from abupgrade.bootloader.base import BootState, DiskLayout
from abupgrade.bootloader.systemd_boot import (
    LOADER_CONF,
    LOADER_GUID,
    LOADER_SOURCE,
    Create,
    Name,
    SystemdBoot,
    SystemdBootConfig,
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
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.fat import MtoolsFat, mkfs_fat32
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
    apply_steps(files, plan_commit(snapshot(files), B, options=OPTIONS[B]))
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
        apply_steps(files, plan_commit(snapshot(files), B, options=OPTIONS[B]))
        assert snapshot(files).state().default is B and booted(files) is B


def test_rollback_sets_the_left_slot_aside_and_back() -> None:
    files = fresh()
    install(files, B)
    booted(files)
    apply_steps(files, plan_commit(snapshot(files), B, options=OPTIONS[B]))
    steps = plan_commit(snapshot(files), A, options=OPTIONS[A])  # rollback to A
    apply_steps(files, steps)
    assert "loader/entries/slot-b-kept+0-0.conf" in files  # B set aside, still there
    state = snapshot(files).state()
    assert (state.default, state.trial, state.bootable) == (A, None, frozenset({A, B}))
    assert booted(files) is A
    apply_steps(files, plan_commit(snapshot(files), B, options=OPTIONS[B]))  # and back
    assert sorted(n for n in files if n.startswith("loader/entries/")) == \
        ["loader/entries/slot-a.conf", "loader/entries/slot-b.conf"]
    assert booted(files) is B


def test_updates_alternate_slots_and_generations_grow() -> None:
    files = fresh()
    for n, slot in enumerate([B, A, B, A, B]):
        install(files, slot)
        assert booted(files) is slot
        apply_steps(files, plan_commit(snapshot(files), slot, options=OPTIONS[slot]))
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
    assert kernel_options(B, "root=PARTLABEL=rootfs_b console=ttyS0") == \
        "root=PARTLABEL=rootfs_b console=ttyS0 panic=5 abupgrade.slot=B"
    assert kernel_options(A, "root=/dev/vda3 panic=10 abupgrade.slot=B quiet") == \
        "root=/dev/vda3 panic=10 quiet abupgrade.slot=A"


def test_two_names_of_a_committed_slot_are_one_good_slot() -> None:
    """A cut in the commit rename can leave both names (on the same clusters)."""
    files = fresh()
    install(files, B)
    booted(files)
    files["loader/entries/slot-b.conf"] = files["loader/entries/slot-b+2-1.conf"]
    state = snapshot(files).state()
    assert (state.default, state.trial) == (B, None)
    assert plan_commit(snapshot(files), B, options=OPTIONS[B]) == []
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


def test_a_new_esp_boots_nothing_until_the_first_commit() -> None:
    files = {"loader/loader.conf": LOADER_CONF.encode()}
    state = snapshot(files).state()
    assert (state.default, state.bootable, state.trial) == (A, frozenset(), None)
    files[boot_path(A, "kernel")] = b"kernel A"
    apply_steps(files, plan_commit(snapshot(files), A, options=OPTIONS[A]))
    assert snapshot(files).state().bootable == frozenset({A}) and booted(files) is A
    entry = bls.Entry.parse("x.conf", files["loader/entries/slot-a.conf"])
    assert entry is not None and entry.initrds == () and entry.version == "1"


def test_marking_the_default_bad_brings_back_the_slot_a_rollback_set_aside() -> None:
    files = fresh()
    install(files, B)
    apply_steps(files, plan_commit(snapshot(files), B, options=OPTIONS[B]))
    apply_steps(files, plan_commit(snapshot(files), A, options=OPTIONS[A]))  # rollback
    steps = plan_disable(snapshot(files), A)
    apply_steps(files, steps)
    assert sorted(files) == sorted([
        "loader/loader.conf", *(boot_path(s, n) for s in Slot for n in ("kernel", "initrd")),
        "loader/entries/slot-b.conf"])
    assert snapshot(files).state() == BootState(default=B, bootable=frozenset({B}))


def test_a_spent_trial_is_no_fallback_to_disable_the_default_for() -> None:
    files = fresh()
    install(files, B, tries=1)
    booted(files)
    with pytest.raises(PolicyRefusal):
        plan_disable(snapshot(files), A)


def test_dropping_files_takes_entries_the_loader_skips_and_refuses_live_ones() -> None:
    files = fresh()
    install(files, B)
    with pytest.raises(OperationalError, match="still has an entry"):
        plan_drop_files(snapshot(files), B)
    del files[boot_path(B, "kernel")]  # the loader skips B's entry now
    apply_steps(files, plan_drop_files(snapshot(files), B))
    assert not [p for p in files if "slot-b" in p or "/B/" in p]


def test_kept_names_are_only_spent_ones() -> None:
    assert Name.parse("slot-b-kept+0-3.conf") == Name(B, bls.Counter("slot-b-kept", 0, 3), True)
    assert Name.parse("slot-b-kept+1-0.conf") is None and Name.parse("slot-b-kept.conf") is None


def test_a_foreign_entry_first_in_the_loaders_order_is_an_error() -> None:
    files = fresh()
    files["loader/loader.conf"] = b"timeout 0\n"
    files["loader/entries/zzz.conf"] = b"sort-key a\nlinux /abupgrade/A/vmlinuz\n"
    with pytest.raises(OperationalError, match="zzz.conf"):
        snapshot(files).state()


# ---------------------------------------------------------------- the backend on a FAT image


@pytest.fixture
def loader(tmp_path: Path) -> SystemdBoot:
    """The backend on a fresh ESP image, as `disk init` leaves it (no entry yet)."""
    missing = [t for t in ("mkfs.fat", "mcopy") if shutil.which(t) is None]
    if missing or not LOADER_SOURCE.is_file():
        pytest.skip(f"needs dosfstools, mtools and systemd-boot-efi (scripts/setup): {missing}")
    esp = tmp_path / "esp.img"
    with open(esp, "wb") as f:
        f.truncate(40 << 20)
    mkfs_fat32(esp, label="ESP")
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    backend = SystemdBoot(SystemdBootConfig(esp=str(esp), tries=2, efivars=efivars))
    backend.install(DiskLayout(disk=esp, boot_root=tmp_path, boot_partition=2,
                               slot_partitions={A: 3, B: 4}, slot_roots={},
                               partitions={1: esp}, esp_partition=1))
    return backend


def write_files(loader: SystemdBoot, slot: Slot, kernel: bytes) -> None:
    for name, data in (("kernel", kernel), ("initrd", b"initrd " + slot.value.encode())):
        with loader.boot_file_writer(slot, name) as out:
            out.write(data)


KERNEL = b"MZ" + bytes(0x3A) + (0x40).to_bytes(4, "little") + b"PE\0\0" + bytes(100)


def esp_names(loader: SystemdBoot, folder: str = "loader/entries") -> list[str]:
    with MtoolsFat(Path(loader.settings.esp)) as fat:
        return [e.name for e in fat.list(folder)]


def set_efivar(folder: Path, name: str, value: str) -> None:
    (folder / f"{name}-{LOADER_GUID}").write_bytes(
        b"\x06\0\0\0" + (value + "\0").encode("utf-16-le"))


def test_backend_first_image_then_trial_commit_rollback(loader: SystemdBoot) -> None:
    assert loader.read() == BootState(default=A, bootable=frozenset())
    loader.drop_boot_files(A)
    write_files(loader, A, KERNEL)
    loader.check_boot_files(A)
    loader.commit(A)  # disk init --image
    loader.preflight()
    assert loader.read() == BootState(default=A, bootable=frozenset({A}))
    write_files(loader, B, KERNEL)
    loader.arm_trial(B, loader.trial_boots())
    assert esp_names(loader) == ["slot-a.conf", "slot-b+2-0.conf"]
    assert loader.read() == BootState(default=A, bootable=frozenset({A, B}), trial=B, tries_left=2)
    loader.commit(B)
    assert loader.read() == BootState(default=B, bootable=frozenset({A, B}))
    loader.commit(A)  # rollback
    assert esp_names(loader) == ["slot-a.conf", "slot-b-kept+0-0.conf"]
    assert loader.read().default is A
    loader.disable(A)  # mark-bad A: the good B takes over
    assert esp_names(loader) == ["slot-b.conf"] and loader.read().default is B
    loader.drop_boot_files(A)
    write_files(loader, A, KERNEL)
    loader.arm_trial(A, 2)
    loader.commit(A)
    assert loader.read() == BootState(default=A, bootable=frozenset({A, B}))
    loader.disable(B)  # mark-bad
    loader.drop_boot_files(B)
    assert esp_names(loader) == ["slot-a.conf"] and esp_names(loader, "abupgrade/B") == []
    with pytest.raises(PolicyRefusal):
        loader.disable(A)


def test_backend_entry_carries_the_configured_command_line(loader: SystemdBoot) -> None:
    write_files(loader, A, KERNEL)
    loader.commit(A)
    with MtoolsFat(Path(loader.settings.esp)) as fat:
        entry = bls.Entry.parse("slot-a.conf", fat.read("loader/entries/slot-a.conf"))
    assert entry is not None
    assert (entry.linux, entry.initrds, entry.options) == (
        "abupgrade/A/vmlinuz", ("abupgrade/A/initrd.img",),
        "root=PARTLABEL=rootfs_a console=ttyS0 panic=5 abupgrade.slot=A")


def test_backend_refuses_a_kernel_without_the_efi_stub(loader: SystemdBoot) -> None:
    write_files(loader, B, b"\x7fELF not a PE image" * 10)
    with pytest.raises(PolicyRefusal, match="not an EFI executable"):
        loader.check_boot_files(B)


def test_backend_reports_and_refuses_what_overrides_its_order(loader: SystemdBoot) -> None:
    write_files(loader, A, KERNEL)
    loader.commit(A)
    write_files(loader, B, KERNEL)
    loader.arm_trial(B, 2)
    efivars = loader.settings.efivars
    assert efivars is not None
    set_efivar(efivars, "LoaderEntrySelected", "slot-a.conf")
    assert loader.notes() == ("systemd-boot started slot-a.conf in this boot",)
    set_efivar(efivars, "LoaderEntrySelected", "slot-b+2-0.conf")
    assert len(loader.notes()) == 2 and "could not count" in loader.notes()[1]
    set_efivar(efivars, "LoaderBootCountPath", "\\loader\\entries\\slot-b+1-1.conf")
    assert loader.notes() == ("systemd-boot started slot-b+2-0.conf in this boot",)
    set_efivar(efivars, "LoaderEntryDefault", "slot-a.conf")
    assert loader.read().trial is None  # what the loader will really do
    with pytest.raises(UsageError, match="LoaderEntryDefault"):
        loader.preflight()
    (efivars / f"LoaderEntryDefault-{LOADER_GUID}").unlink()
    with MtoolsFat(Path(loader.settings.esp)) as fat:
        fat.write("loader/loader.conf", b"timeout 0\ndefault slot-a.conf\n")
    with pytest.raises(UsageError, match="default slot-a.conf"):
        loader.preflight()


def test_settings_refuse_a_kernel_that_never_reboots() -> None:
    with pytest.raises(UsageError, match="panic=0"):
        SystemdBootConfig.from_toml({"options_b": "root=/dev/vda3 panic=0"}, "[systemd-boot] ")
    with pytest.raises(UsageError, match="tries"):
        SystemdBootConfig.from_toml({"tries": 0}, "[systemd-boot] ")
    assert SystemdBootConfig().options(B) == \
        "root=PARTLABEL=rootfs_b console=ttyS0 panic=5 abupgrade.slot=B"
