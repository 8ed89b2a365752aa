"""abupgrade.fat on real FAT32 filesystems made by mkfs.fat, through mtools (this machine's
kernel has no vfat) and through plain file calls (KernelFat's code, on a folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abupgrade.errors import OperationalError, UsageError
from abupgrade.fat import NEW_SUFFIX, Entry, Fat, KernelFat, MtoolsFat, mkfs_fat32, open_fat
from fixtures.fatlog import RecordingFat, cut_states

MiB = 1 << 20
OFFSET = MiB  # the FAT starts 1 MiB into the image, like a first partition
SIZE = 40 * MiB


def fsck(image: Path, offset: int = OFFSET, size: int = SIZE) -> str:
    """fsck.fat -n over the filesystem's bytes; its report (it must find nothing to fix)."""
    part = image.with_name(image.name + ".part")
    with open(image, "rb") as src, open(part, "wb") as out:
        src.seek(offset)
        out.write(src.read(size))
    proc = subprocess.run(["fsck.fat", "-n", str(part)], capture_output=True, text=True,
                          check=False)
    part.unlink()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def image(tmp_path: Path) -> Path:
    missing = [t for t in ("mkfs.fat", "fsck.fat", "mcopy", "mren", "mdel", "mmd", "mdir")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (run scripts/setup)")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(OFFSET + SIZE + MiB)
    mkfs_fat32(disk, label="ESP", offset=OFFSET, size=SIZE)
    return disk


@pytest.fixture(params=["mtools", "kernel-calls"])
def fat(request: pytest.FixtureRequest, image: Path, tmp_path: Path) -> Iterator[Fat]:
    if request.param == "mtools":
        with open_fat(image, offset=OFFSET) as opened:
            assert isinstance(opened, MtoolsFat)
            yield opened
        fsck(image)
    else:
        root = tmp_path / "mounted"
        root.mkdir()
        yield KernelFat(root)


def test_files_round_trip(fat: Fat) -> None:
    data = os.urandom(300_000)
    fat.mkdir("EFI/BOOT")
    fat.mkdir("EFI/BOOT")  # exists: nothing happens
    fat.write("EFI/BOOT/BOOTX64.EFI", data)
    assert fat.read("EFI/BOOT/BOOTX64.EFI") == data
    assert fat.list("EFI") == [Entry("BOOT", True)]
    assert fat.list("EFI/BOOT") == [Entry("BOOTX64.EFI", False)]
    assert fat.exists("EFI/BOOT/BOOTX64.EFI") and not fat.exists("EFI/BOOT/grubx64.efi")
    fat.write("EFI/BOOT/BOOTX64.EFI", b"replaced")
    assert fat.read("EFI/BOOT/BOOTX64.EFI") == b"replaced"
    assert [e.name for e in fat.list("EFI/BOOT")] == ["BOOTX64.EFI"]  # no temporary left


def test_copy_in_streams_a_host_file(fat: Fat, tmp_path: Path) -> None:
    source = tmp_path / "vmlinuz"
    source.write_bytes(os.urandom(3 * MiB + 17))
    fat.mkdir("EFI/abupgrade/A")
    fat.copy_in("EFI/abupgrade/A/vmlinuz", source)
    assert fat.read("EFI/abupgrade/A/vmlinuz") == source.read_bytes()


def test_long_names_and_renames(fat: Fat) -> None:
    fat.mkdir("loader/entries")
    fat.write("loader/entries/slot-b+3-0.conf", b"title B\n")
    fat.write("loader/entries/slot-a.conf", b"title A\n")
    fat.rename("loader/entries/slot-b+3-0.conf", "loader/entries/slot-b+2-1.conf")
    assert [e.name for e in fat.list("loader/entries")] == ["slot-a.conf", "slot-b+2-1.conf"]
    with pytest.raises(FileExistsError):
        fat.rename("loader/entries/slot-b+2-1.conf", "loader/entries/slot-a.conf")
    fat.rename("loader/entries/slot-b+2-1.conf", "loader/entries/slot-a.conf", replace=True)
    assert fat.list("loader/entries") == [Entry("slot-a.conf", False)]
    assert fat.read("loader/entries/slot-a.conf") == b"title B\n"
    fat.remove("loader/entries/slot-a.conf")
    assert fat.list("loader/entries") == []


def test_missing_things_are_file_not_found(fat: Fat) -> None:
    fat.mkdir("loader")
    for call in (lambda: fat.read("loader/nothing.conf"), lambda: fat.remove("loader/x"),
                 lambda: fat.list("nowhere"), lambda: fat.rename("loader/a", "loader/b")):
        with pytest.raises(FileNotFoundError):
            call()
    assert not fat.exists("nowhere/x")


def test_rename_stays_in_one_folder(fat: Fat) -> None:
    fat.mkdir("a")
    fat.mkdir("b")
    fat.write("a/f", b"x")
    with pytest.raises(ValueError):
        fat.rename("a/f", "b/f")


@pytest.mark.parametrize("bad", ["", "..", "a/../b", "EFI/*.efi", "x?", 'q"uote', "sp ace"])
def test_paths_mtools_would_misread_are_refused(fat: Fat, bad: str) -> None:
    with pytest.raises(UsageError):
        fat.write(bad, b"x")


def test_a_left_over_temporary_is_replaced(fat: Fat) -> None:
    fat.mkdir("loader")
    fat.write(f"loader/loader.conf{NEW_SUFFIX}", b"half of something")  # a cut's leftover
    fat.write("loader/loader.conf", b"timeout 0\n")
    assert [e.name for e in fat.list("loader")] == ["loader.conf"]
    assert fat.read("loader/loader.conf") == b"timeout 0\n"


def test_lookups_ignore_case_like_fat(image: Path) -> None:
    with open_fat(image, offset=OFFSET) as fat:
        fat.mkdir("EFI/BOOT")
        fat.write("EFI/BOOT/BOOTX64.EFI", b"x")
        assert fat.read("efi/boot/bootx64.efi") == b"x"
        assert fat.exists("Efi/Boot/BootX64.efi")


@pytest.mark.loop
def test_mtools_refuses_a_device_the_kernel_has_open_exclusively(image: Path) -> None:
    """The private drive opens with O_EXCL: a block device the kernel has mounted (or
    holds exclusively) is refused. Shown on a loop device held open with O_EXCL."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a loop device")
    loop = subprocess.run(["losetup", "-f", "--show", "-o", str(OFFSET), "--sizelimit",
                           str(SIZE), str(image)], capture_output=True, text=True, check=True)
    device = Path(loop.stdout.strip())
    try:
        holder = os.open(device, os.O_RDONLY | os.O_EXCL)
        try:
            with open_fat(device) as fat, pytest.raises(OperationalError, match="on /dev/loop"):
                fat.mkdir("EFI")
        finally:
            os.close(holder)
        with open_fat(device) as fat:  # released: works, through the same device
            fat.mkdir("EFI")
            assert fat.list() == [Entry("EFI", True)]
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


# ------------------------------------------------------------------ power cuts

def _sweep(image: Path, tmp_path: Path, prepare: Callable[[Fat], None],
           change: Callable[[Fat], None], check: Callable[[Fat, str], None]) -> int:
    """Run `change` recording its writes, then `check` every state a power cut during it
    can leave (cut_states). Returns the number of states."""
    if shutil.which("strace") is None:
        pytest.skip("missing tool: strace (run scripts/setup)")
    with open_fat(image, offset=OFFSET) as fat:
        prepare(fat)
    before = tmp_path / "before.img"
    shutil.copyfile(image, before)
    with RecordingFat(image, OFFSET) as recording:
        change(recording)
    assert recording.writes, "the change wrote nothing"
    count = 0
    for what, state in cut_states(before, recording.writes, tmp_path):
        with MtoolsFat(state, OFFSET) as fat:
            check(fat, what)
        count += 1
    return count


@pytest.mark.parametrize("crowded", [False, True], ids=["one-sector", "entries-apart"])
def test_write_leaves_the_old_or_the_new_file_at_every_cut(image: Path, tmp_path: Path,
                                                          crowded: bool) -> None:
    """Replacing a file: at every cut the name reads whole, old bytes or new. "entries-apart"
    puts the temporary's directory entry in another sector than the file's."""
    old, new = os.urandom(5000), os.urandom(7000)

    def prepare(fat: Fat) -> None:
        fat.mkdir("loader/entries")
        fat.write("loader/entries/slot-a.conf", old)
        for i in range(30 if crowded else 0):  # the temporary's entry lands sectors later
            fat.write(f"loader/entries/filler-entry-number-{i}.conf", b"x")

    def check(fat: Fat, what: str) -> None:
        assert fat.read("loader/entries/slot-a.conf") in (old, new), what

    states = _sweep(image, tmp_path, prepare,
                    lambda fat: fat.write("loader/entries/slot-a.conf", new), check)
    assert states > 5


def test_a_direct_overwrite_is_caught_by_the_sweep(image: Path, tmp_path: Path) -> None:
    """The sweep can fail: overwriting in place (mcopy -o, no temporary) leaves states
    where the name reads neither the old nor the new bytes."""
    old, new = os.urandom(5000), os.urandom(7000)
    source = tmp_path / "new.bin"
    source.write_bytes(new)
    bad: list[str] = []

    def prepare(fat: Fat) -> None:
        fat.mkdir("loader")
        fat.write("loader/x.conf", old)

    def overwrite(fat: Fat) -> None:
        assert isinstance(fat, MtoolsFat)
        fat._m("mcopy", "-o", source, "z:/loader/x.conf")

    def check(fat: Fat, what: str) -> None:
        try:
            if fat.read("loader/x.conf") not in (old, new):
                bad.append(what)
        except (FileNotFoundError, OperationalError):
            bad.append(what)

    _sweep(image, tmp_path, prepare, overwrite, check)
    assert bad, "a torn overwrite went unnoticed"
