"""`abupgrade adopt`: an existing Debian machine whose GRUB its own Debian packages installed
(fixtures/existing.py) comes under abupgrade and goes out again; then the whole story in
QEMU: the machine adopts itself on its first boot, boots through abupgrade's script, takes an
update from the host and commits it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from abupgrade import adopt as adoption
from abupgrade.bootloader.base import Firmware
from abupgrade.errors import OperationalError, PolicyRefusal, UsageError
from abupgrade.model import Slot
from fixtures import existing, pyguest
from fixtures.existing import BOOT, DATA, ROOT_1, ROOT_2, ExistingMachine
from fixtures.guest import MARKER, QEMU, qemu_boot
from fixtures.images import KeyPair, keypair
from fixtures.machine import run_cli
from fixtures.tiers import guest_skips, needs

COMPATIBLE = "old-box"
TOOLS = ("debootstrap", "chroot", "sfdisk", "mkfs.ext4", "blkid", "grub-editenv", "modprobe")


# ---------------------------------------------------------------- unit


def test_the_handover_block_comes_and_goes_alone() -> None:
    mine = "menuentry 'rescue' { linux /rescue }\n"
    block = adoption.handover("0b3c5d2e-1111-2222-3333-444455556666")
    assert "search --no-floppy --fs-uuid --set=ab_bootfs 0b3c5d2e-1111-2222-3333-444455556666" \
        in block and 'configfile "($ab_bootfs)/abupgrade/grub.cfg"' in block
    assert adoption.strip_block(mine + block) == mine
    assert adoption.strip_block(block) == ""
    assert adoption.strip_block(mine.rstrip("\n")) == mine  # only a final newline is added
    assert adoption.strip_block(mine + block + mine) == mine + mine


def test_the_firmware_is_read_from_sysfs(tmp_path: Path) -> None:
    """What GRUB's settings record: BIOS without /sys/firmware/efi, else UEFI, with Secure
    Boot as the SecureBoot variable says (4 bytes of attributes, then its value)."""
    efi = tmp_path / "efi"
    assert adoption.Running(efi=efi).firmware() == (Firmware.BIOS, False)
    (efi / "efivars").mkdir(parents=True)
    assert adoption.Running(efi=efi).firmware() == (Firmware.UEFI, False)
    for value, on in ((1, True), (0, False)):
        (efi / "efivars" / adoption.SECURE_BOOT_VAR).write_bytes(b"\x06\0\0\0" + bytes([value]))
        assert adoption.Running(efi=efi).firmware() == (Firmware.UEFI, on)


# ---------------------------------------------------------------- the machine

ADOPT_ONCE = f"""#!/bin/sh
# first boot after the administrator installed abupgrade: adopt, as the README says
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ -e /boot/abupgrade/adopted.json ] && exit 0
abupgrade --json adopt --compatible {COMPATIBLE} --pubkey /etc/release.pub --version 1.0 \\
  > /tmp/adopt.json 2> /tmp/adopt.err
echo "{MARKER} adopt-rc=$? $(tr -d '\\n' < /tmp/adopt.json) $(tail -c 400 /tmp/adopt.err)"
"""

INITTAB = f"""::sysinit:/{pyguest.GUEST_DIR}/rcS
::sysinit:/{pyguest.GUEST_DIR}/adopt-once
::wait:/{pyguest.GUEST_DIR}/report
"""


@pytest.fixture(scope="module")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This tree's abupgrade, for the machine and for the update (built once)."""
    needs(loop=True, tools=TOOLS)
    with guest_skips():
        return pyguest.build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, release_key: KeyPair,
          wheel: Path) -> ExistingMachine:
    """The machine, built once (a test copies its disk before changing it)."""
    work = tmp_path_factory.mktemp("existing")
    files = {
        "etc/release.pub": (release_key.public.read_text(), 0o644),
        f"{pyguest.GUEST_DIR}/rcS": (pyguest.rc_script(fstab=True), 0o755),
        f"{pyguest.GUEST_DIR}/adopt-once": (ADOPT_ONCE, 0o755),
        f"{pyguest.GUEST_DIR}/report": (pyguest.report_script(), 0o755),
    }
    with guest_skips():
        return existing.build(work, inittab=INITTAB, files=files, wheel=wheel)


@pytest.fixture
def machine(built: ExistingMachine, tmp_path: Path) -> ExistingMachine:
    image = tmp_path / "existing.img"
    subprocess.run(["cp", "--sparse=always", str(built.image), str(image)], check=True)
    return ExistingMachine(image, built.release, built.kernel, built.initrd)


def devno(node: Path) -> str:
    rdev = node.stat().st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def running(root: Path, disk_partitions: dict[int, Path], machine: ExistingMachine,
            work: Path, *, points: dict[str, int]) -> adoption.Running:
    """The machine as adopt reads it while it runs from root 1: mountinfo (mount point ->
    partition), the kernel command line its GRUB gave it."""
    lines = [f"{20 + i} 1 {devno(disk_partitions[n])} / {point} rw - ext4 "
             f"{disk_partitions[n]} rw" for i, (point, n) in enumerate(points.items())]
    (work / "mountinfo").write_text("\n".join(lines) + "\n")
    (work / "cmdline").write_text(f"BOOT_IMAGE=/vmlinuz-{machine.release} root=UUID="
                                  f"{existing.fs_uuid(disk_partitions[ROOT_1])} ro "
                                  "console=ttyS0 panic=5\n")
    return adoption.Running(prefix=root, mountinfo=work / "mountinfo",
                            cmdline=work / "cmdline", release=machine.release,
                            efi=work / "no-efi")  # the machine boots with BIOS


def files_of(folder: Path, *, skip: tuple[str, ...] = ("lost+found",)) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256; symlinks -> their target), but
    what is under `skip` and the fixture's device.map (it names this session's loop device)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if relative.split("/")[0] in skip or path.name == "device.map":
            continue
        if path.is_symlink():
            found[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


EVERYWHERE = {"/": ROOT_1, "/boot": BOOT, "/data": DATA}


@pytest.mark.loop
def test_adopt_then_update_grub_then_undo(machine: ExistingMachine, release_key: KeyPair,
                                          tmp_path: Path) -> None:
    with machine.mounted() as (disk, root):
        run_as = running(root, dict(disk.partitions), machine, tmp_path, points=EVERYWHERE)
        before_boot = files_of(root / "boot")
        before_inittab = (root / "etc/inittab").read_text()
        layout = adoption.inspect_machine(run_as)
        assert layout.booted is Slot.A and layout.state_dir == Path("/data/abupgrade")
        assert layout.slots[Slot.B].node == disk.partitions[ROOT_2]
        assert layout.cmdline == "ro console=ttyS0 panic=5"
        kwargs = dict(compatible=COMPATIBLE, pubkeys=[release_key.public], version="1.0",
                      tries=3, init=None, hook=True)
        adoption.adopt(run_as, layout, dry_run=True, **kwargs)  # type: ignore[arg-type]
        assert files_of(root / "boot") == before_boot and not (root / "data/abupgrade").exists()

        result = adoption.adopt(run_as, layout, **kwargs)  # type: ignore[arg-type]
        assert result.hook is not None and result.hook.init == "busybox"
        env = subprocess.run(["grub-editenv", str(root / "boot/abupgrade/grubenv"), "list"],
                             capture_output=True, text=True, check=True).stdout.split()
        assert {"ab_default=A", "ab_A=g", "ab_B=b", "ab_trial=-"} <= set(env)
        script = (root / "boot/abupgrade/grub.cfg").read_text()
        partuuid = disk.table.get(ROOT_2).partuuid if disk.table else ""
        assert f"root=PARTUUID={partuuid} ro console=ttyS0 panic=5 abupgrade.slot=B" in script
        assert "($ab_bootfs)/abupgrade/slots/A/vmlinuz" in script
        assert "terminal_output" not in script  # the machine's own console stays
        assert (root / "boot/abupgrade/slots/A/vmlinuz").read_bytes() == \
            machine.kernel.read_bytes()
        custom = (root / "boot/grub/custom.cfg").read_text()
        assert custom == adoption.handover(existing.fs_uuid(disk.partitions[BOOT]))
        assert "abupgrade boot-hook" in (root / "etc/inittab").read_text()

        # update-grub (a kernel update, an administrator) rewrites grub.cfg, never custom.cfg,
        # and the new grub.cfg still hands over to it
        machine.chroot(root, "update-grub")
        assert "custom.cfg" in (root / "boot/grub/grub.cfg").read_text()
        assert (root / "boot/grub/custom.cfg").read_text() == custom
        with pytest.raises(PolicyRefusal, match="under abupgrade already"):
            adoption.adopt(run_as, layout, **kwargs)  # type: ignore[arg-type]

    # the disk as abupgrade sees it from outside
    status = json.loads(run_cli("--disk", str(machine.image), "status", "--json").stdout)
    assert status["committed"] == "A" and status["next_boot"] == "A"
    assert status["slots"]["A"]["state"] == "good" and status["slots"]["A"]["version"] == "1.0"
    assert status["slots"]["B"]["state"] == "empty"
    assert status["firmware"] == "bios" and status["secure_boot"] is False

    with machine.mounted() as (disk, root):
        run_as = running(root, dict(disk.partitions), machine, tmp_path, points=EVERYWHERE)
        with pytest.raises(PolicyRefusal, match="not slot A that was adopted"):
            adoption.undo(run_as, Slot.B, trial_pending=False)
        with pytest.raises(PolicyRefusal, match="trial boot is pending"):
            adoption.undo(run_as, Slot.A, trial_pending=True)
        undone = adoption.undo(run_as, Slot.A, trial_pending=False)
        assert undone.kept == (Path("/data/abupgrade"),)
        assert files_of(root / "boot", skip=("lost+found", "grub")) == \
            {k: v for k, v in before_boot.items() if not k.startswith("grub")}
        grub_before = {k: v for k, v in before_boot.items() if k.startswith("grub")}
        assert {f"grub/{k}": v for k, v in files_of(root / "boot/grub").items()} == grub_before
        assert (root / "etc/inittab").read_text() == before_inittab


@pytest.mark.loop
def test_a_failed_adopt_takes_back_what_it_wrote(machine: ExistingMachine, release_key: KeyPair,
                                                tmp_path: Path) -> None:
    """The boot hook's integration cannot be written (its inittab is a folder): what adopt
    wrote before goes again, so GRUB boots as before and adopt can run again."""
    with machine.mounted() as (disk, root):
        run_as = running(root, dict(disk.partitions), machine, tmp_path, points=EVERYWHERE)
        before = files_of(root / "boot")
        inittab = root / "etc/inittab"
        inittab.rename(root / "etc/inittab.real")
        inittab.mkdir()
        try:
            with pytest.raises(OperationalError, match="adopt failed and was undone"):
                adoption.adopt(run_as, adoption.inspect_machine(run_as), compatible=COMPATIBLE,
                               pubkeys=[release_key.public], version="1.0", tries=3, init=None,
                               hook=True)
        finally:
            inittab.rmdir()
            (root / "etc/inittab.real").rename(inittab)
        assert files_of(root / "boot") == before
        assert not (root / "data/abupgrade").exists()
        adoption.adopt(run_as, adoption.inspect_machine(run_as), compatible=COMPATIBLE,
                       pubkeys=[release_key.public], version="1.0", tries=3, init=None,
                       hook=True)


@pytest.mark.loop
def test_adopt_refuses_what_cannot_work(machine: ExistingMachine, tmp_path: Path) -> None:
    with machine.mounted() as (disk, root):
        parts = dict(disk.partitions)
        no_boot = running(root, parts, machine, tmp_path, points={"/": ROOT_1, "/data": DATA})
        with pytest.raises(UsageError, match="/boot is on the root filesystem"):
            adoption.inspect_machine(no_boot)
        run_as = running(root, parts, machine, tmp_path, points=EVERYWHERE)
        with pytest.raises(UsageError, match="it is mounted"):
            adoption.inspect_machine(run_as, other=str(parts[DATA]))
        with pytest.raises(UsageError, match="running root or /boot"):
            adoption.inspect_machine(run_as, other=str(parts[BOOT]))
        with pytest.raises(UsageError, match="state folder /var/lib/abupgrade is on a slot"):
            adoption.inspect_machine(run_as, state_dir=Path("/var/lib/abupgrade"))
        with pytest.raises(UsageError, match="no kernel at /boot/vmlinuz-0.0"):
            adoption.inspect_machine(run_as, kernel=Path("/boot/vmlinuz-0.0"))
        # without a data partition the state goes to /boot
        no_data = running(root, parts, machine, tmp_path, points={"/": ROOT_1, "/boot": BOOT})
        assert adoption.inspect_machine(no_data).state_dir == Path("/boot/abupgrade/state")
        with pytest.raises(UsageError, match="smaller"):
            adoption.inspect_machine(no_data, other=str(parts[DATA]))


# ---------------------------------------------------------------- the story in QEMU

ONE_BOOT = 150  # seconds for one boot of the Python guest under TCG


@pytest.mark.boot
@pytest.mark.loop
def test_an_existing_machine_adopts_itself_and_takes_an_update(
        machine: ExistingMachine, release_key: KeyPair, wheel: Path, tmp_path: Path) -> None:
    """Two boots. Boot 1: the machine's own GRUB menu boots Debian, which runs `abupgrade
    adopt`. Then an administrator runs update-grub, and the host applies version 2.0 to slot
    B with `--disk`. Boot 2: the distribution's regenerated grub.cfg hands over to
    abupgrade's script, which tries slot B; the hook's checks pass and B is committed."""
    needs(loop=True, tools=(QEMU, *TOOLS))

    def boot(name: str) -> tuple[str, list[pyguest.BootReport]]:
        log = tmp_path / f"{name}.log"
        text = qemu_boot(machine.image, log, timeout=ONE_BOOT, no_reboot=True)
        return text, pyguest.reports(text)

    text, reports = boot("1-adopt")
    adopted = [line for line in text.splitlines() if f"{MARKER} adopt-rc=" in line]
    assert adopted and "adopt-rc=0" in adopted[0], text[-3000:]
    document = json.loads(adopted[0].split("adopt-rc=0", 1)[1].strip())
    assert document["booted"] == "A" and document["hook"]["init"] == "busybox"
    assert "abupgrade-grub" not in text  # the machine's own menu booted it
    assert reports and reports[0].slot == "none"  # Debian's own entry: no abupgrade.slot=

    with machine.mounted() as (_, root):  # as an administrator would, after a kernel update
        machine.chroot(root, "update-grub")
    with guest_skips():
        image = pyguest.signed_guest_image(tmp_path / "v2.tar", release_key, version="2.0",
                                           compatible=COMPATIBLE, wheel=wheel)
    proc = run_cli("--disk", str(machine.image), "apply", str(image))
    assert proc.returncode == 0, proc.stderr

    text, reports = boot("2-update")
    assert "abupgrade-grub: try slot=B" in text, text[-3000:]
    assert reports and reports[0].slot == "B" and reports[0].version == "2.0"
    assert reports[0].last_boot.endswith("committed"), text[-3000:]
    status = json.loads(run_cli("--disk", str(machine.image), "status", "--json").stdout)
    assert status["committed"] == "B" and status["slots"]["B"]["version"] == "2.0"
    assert status["slots"]["A"]["state"] == "good" and status["slots"]["A"]["version"] == "1.0"


@pytest.fixture(autouse=True)
def _no_leftover_mounts() -> Iterator[None]:
    yield
    leftover = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if "/machine-" in line and "existing" in line]
    assert not leftover, leftover
