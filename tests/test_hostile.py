"""Hostile images through the real `abupgrade apply` on a loop disk (version 1.0 committed in
slot A): a corpus of 200+ bad images made here from the mutation helpers of
test_image_reject - every named rejection, bit flips in every region, truncation at every
member boundary, wrong compatible, downgrade, a payload larger than the slot. Each image
carries a kernel and an initrd, so the same corpus runs on every bootloader: on GRUB with an
empty slot B and with a good image in slot B (so the path that takes B out of the
bootloader's choice before writing it runs too), and on syslinux with an empty slot B.

Each must exit 3 (format, signature, hash) or 4 (policy) with one line on stderr and leave
slot B's bytes as they were (the slot is filled with a pattern first, so any byte written
shows) unless the image's signature verified. The bootloader's state (env blocks or
extlinux.conf and the ADV, every boot file) stays byte-identical where B was empty; where B
was good, the only change allowed is B taken out of the bootloader's choice: it is never armed,
A stays the default. Most run
in-process through `abupgrade.__main__.main` - the same entry point as the command, on a disk
attached once - and every 25th instead as a real `abupgrade` process (about 0.6 s each:
the process's startup, not the refusal, so a sample of a dozen per disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from abupgrade import config as configuration
from abupgrade import ops
from abupgrade.__main__ import main
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.grub import GrubConfig
from abupgrade.bootloader.syslinux import SyslinuxConfig
from abupgrade.errors import AbupgradeError
from abupgrade.image import signature
from abupgrade.image.manifest import Compression, Manifest, Payload, PayloadKind
from abupgrade.image.reader import ImageReader
from abupgrade.image.tar import BLOCK, END_MARKER, padding
from abupgrade.model import Slot
from abupgrade.system import Options
from fixtures.hostile_images import (
    BOOT,
    CASES,
    GOOD,
    HEAD_LEN,
    INITRD,
    KERN,
    KEY,
    P_ROOT,
    RING,
    ROOT,
    ROOT_PAD,
    flip,
    member,
)
from fixtures.machine import Machine, run_cli, running_machine
from fixtures.reliability import record
from fixtures.tiers import needs

pytestmark = pytest.mark.loop

COMPATIBLE = "acme-box"  # what test_image_reject's images are built for
PATTERN_SIZE = 4 << 20  # bytes of slot B filled with a pattern and hashed after each image
PROCESS_EVERY = 25  # every 25th image runs as a real process, the others in-process


def signed_head(*, compatible: str = COMPATIBLE, version: str = "1.0",
                payloads: tuple[Payload, ...] = (P_ROOT, *BOOT)) -> bytes:
    manifest = Manifest(1, version, compatible, "2024-05-01T00:00:00Z", payloads)
    data = manifest.serialize()
    return member("manifest.json", data) + member("manifest.sig", signature.sign(data, (KEY,)))


def regions() -> dict[str, tuple[int, int]]:
    """[start, end) of each region of GOOD."""
    manifest = Manifest(1, "1.0", COMPATIBLE, "2024-05-01T00:00:00Z", (P_ROOT, *BOOT))
    manifest_len = len(member("manifest.json", manifest.serialize()))
    assert GOOD.startswith(member("manifest.json", manifest.serialize()))
    root_start = HEAD_LEN
    kern_start = root_start + BLOCK + len(ROOT) + ROOT_PAD
    initrd_start = kern_start + BLOCK + len(KERN) + padding(len(KERN))
    end_start = len(GOOD) - len(END_MARKER)
    assert end_start == initrd_start + BLOCK + len(INITRD) + padding(len(INITRD))
    return {
        "manifest header": (0, BLOCK),
        "manifest body": (BLOCK, manifest_len),
        "signature header": (manifest_len, manifest_len + BLOCK),
        "signature body": (manifest_len + BLOCK, HEAD_LEN),
        "rootfs header": (root_start, root_start + BLOCK),
        "rootfs data": (root_start + BLOCK, root_start + BLOCK + len(ROOT)),
        "rootfs padding": (root_start + BLOCK + len(ROOT), kern_start),
        "kernel header": (kern_start, kern_start + BLOCK),
        "kernel data": (kern_start + BLOCK, kern_start + BLOCK + len(KERN)),
        "kernel padding": (kern_start + BLOCK + len(KERN), initrd_start),
        "initrd header": (initrd_start, initrd_start + BLOCK),
        "initrd data": (initrd_start + BLOCK, initrd_start + BLOCK + len(INITRD)),
        "initrd padding": (initrd_start + BLOCK + len(INITRD), end_start),
        "end marker": (end_start, len(GOOD)),
    }


def _prefix(cut: int) -> bytes:
    return GOOD[:cut]


def corpus(slot_size: int) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """(name, expected exit code, maker) of every hostile image."""
    for name, (make, _) in CASES.items():
        yield f"case: {name}", 3, make
    for region, (start, end) in regions().items():
        span = end - start
        offsets = sorted({start + span * i // 12 for i in range(12)} | {end - 1})
        for at in offsets:
            yield f"flip: {region} byte {at}", 3, partial(flip, GOOD, at, 0x10)
    member_edges = sorted({0, BLOCK, *[e for r in regions().values() for e in r]})
    for edge in member_edges:
        for cut in {edge - 1, edge, edge + 1} - {len(GOOD)}:
            if 0 <= cut < len(GOOD):
                yield f"truncated at byte {cut}", 3, partial(_prefix, cut)
    body = GOOD[HEAD_LEN:]
    yield "wrong compatible", 4, lambda: signed_head(compatible="other-box") + body
    yield "downgrade", 4, lambda: signed_head(version="0.9") + body
    too_big = dataclasses.replace(P_ROOT, size=slot_size + 1)
    yield "payload larger than the slot", 4, lambda: (
        signed_head(payloads=(too_big, *BOOT)) + member("rootfs", ROOT) + END_MARKER)
    huge = dataclasses.replace(P_ROOT, size=1 << 40, compression=Compression.ZSTD)
    yield "declared size of a terabyte", 4, lambda: (
        signed_head(payloads=(huge, *BOOT)) + END_MARKER)
    unsigned_manifest = Manifest(1, "2.0", COMPATIBLE, "2024-05-01T00:00:00Z", (P_ROOT, *BOOT))
    yield "unsigned, no signature member", 3, lambda: (
        member("manifest.json", unsigned_manifest.serialize()) + body)
    other = Payload("rootfs", PayloadKind.BOOT, len(ROOT), P_ROOT.sha256, Compression.NONE)
    yield "rootfs declared as a boot file", 3, lambda: signed_head(payloads=(other, *BOOT)) + body


def digest(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(length) if length is not None else f.read())
    return h.hexdigest()


def boot_state(m: Machine) -> dict[str, str]:
    """Every byte of the boot state: GRUB's env blocks, or extlinux.conf and ldlinux.sys
    (its ADV); and every boot file."""
    if m.config.bootloader is BootloaderKind.GRUB:
        env = m.config.section(GrubConfig).env
        folder, state = env.parent, [env, env.with_name(env.name + ".1")]
    else:
        folder = m.config.section(SyslinuxConfig).dir
        state = [folder / "extlinux.conf", folder / "ldlinux.sys"]
    files = [*state, *sorted((folder / "slots").rglob("*"))]
    assert all(p.is_file() for p in state), state
    return {str(p): digest(p) for p in files if p.is_file()}


def only_b_disabled(m: Machine) -> bool:
    """The bootloader boots A and nothing else: B was taken out of its choice, not armed."""
    status = ops.status(Options(config=m.config_path)).to_json()
    return (status["next_boot"] == "A" and status["trial"] is None
            and status["slots"]["A"]["state"] == "good"
            and status["slots"]["B"]["state"] in ("empty", "bad"))


def signed_by_trusted_key(data: bytes) -> bool:
    """Whether the image's manifest verifies: only then may a refusal come after slot bytes
    were written (a payload is hashed as it streams into the slot)."""
    try:
        ImageReader(io.BytesIO(data), RING)
    except AbupgradeError:
        return False
    return True


def slot_b_state(m: Machine) -> str:
    return str(ops.status(Options(config=m.config_path)).slots[Slot.B].state)


def apply_in_process(m: Machine, image: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--config", str(m.config_path), "apply", str(image)])
    return code, err.getvalue()


# (bootloader, what slot B holds before the corpus)
DISKS = [(BootloaderKind.GRUB, "empty"), (BootloaderKind.GRUB, "good"),
         (BootloaderKind.SYSLINUX, "empty")]


@pytest.fixture(params=DISKS, ids=[f"{k}-b-{b}" for k, b in DISKS])
def hostile_machine(request: pytest.FixtureRequest,
                    disk_template: Callable[[BootloaderKind], Path],
                    make_image: Callable[..., Path], tmp_path: Path) -> Iterator[Machine]:
    needs(loop=True)
    kind, slot_b = request.param
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(disk_template(kind)), str(disk)], check=True)
    if slot_b == "good":  # B gets a good image, committed, then A is the default again
        proc = run_cli("--disk", str(disk), "apply", str(make_image("1.1")))
        assert proc.returncode == 0, proc.stderr
        with running_machine(disk, tmp_path / "commit-b", booted=Slot.B) as m:
            hook = m.cli("boot-hook", "--no-reboot")
            assert hook.returncode == 0, hook.stderr
        proc = run_cli("--disk", str(disk), "rollback")
        assert proc.returncode == 0, proc.stderr
    with running_machine(disk, tmp_path / "machine", booted=Slot.A) as m:
        # the images are test_image_reject's: its compatible, its key
        cfg = dataclasses.replace(m.config, compatible=COMPATIBLE)
        m.config_path.write_text(configuration.render(cfg))
        m.config = configuration.load(m.config_path)
        (cfg.keyring / "reject-tests.pub").write_bytes(KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        yield m


def test_hostile_images_are_refused_and_change_nothing(hostile_machine: Machine,
                                                        tmp_path: Path) -> None:
    m = hostile_machine
    slot_b = m.device(Slot.B)
    b_was_good = slot_b_state(m) == "good"
    fd = os.open(slot_b, os.O_WRONLY)
    try:
        if not b_was_good:  # a good B keeps its image: its own bytes show any write
            pattern = b"slot B before the corpus\n" * (PATTERN_SIZE // 25 + 1)
            os.pwrite(fd, pattern[:PATTERN_SIZE], 0)
            os.fsync(fd)
        slot_size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    slot_before = digest(slot_b, PATTERN_SIZE)
    boot_before = boot_state(m)
    kind = f"{m.config.bootloader}, slot B {'good' if b_was_good else 'empty'}"
    image = tmp_path / "hostile.tar"
    tried = accepted = processes = untouched = 0
    wrong: list[str] = []
    for n, (name, expected, make) in enumerate(corpus(slot_size)):
        data = make()
        image.write_bytes(data)
        tried += 1
        if n % PROCESS_EVERY == 0:
            proc = run_cli("--config", str(m.config_path), "apply", str(image))
            code, err = proc.returncode, proc.stderr
            processes += 1
        else:
            code, err = apply_in_process(m, image)
        if code == 0:
            accepted += 1
            wrong.append(f"{name}: ACCEPTED")
            break  # a trial is armed now; the rest would be refused for that
        problems = []
        if code != expected:
            problems.append(f"exit {code}, expected {expected}")
        if len(err.strip().splitlines()) != 1:
            problems.append(f"stderr has {len(err.strip().splitlines())} lines")
        slot_now = digest(slot_b, PATTERN_SIZE)
        if slot_now == slot_before:
            untouched += 1
        elif expected != 3 or not signed_by_trusted_key(data):
            problems.append("slot B written before the signature verified")
        slot_before = slot_now
        if boot_state(m) != boot_before:
            if b_was_good and only_b_disabled(m):
                boot_before = boot_state(m)  # B taken out of the choice: allowed, once
                b_was_good = False
            else:
                problems.append("bootloader state changed")
        if slot_b_state(m) == "good" and not b_was_good:
            problems.append("slot B is good")
        if problems:
            wrong.append(f"{name}: {'; '.join(problems)}: {err.strip()[:160]}")
    record("hostile", kind, tried=tried, accepted=accepted, wrong=len(wrong),
           processes=processes, untouched=untouched)
    print(f"\nhostile images ({kind}): {tried} tried ({processes} as processes), {accepted} accepted, "
          f"{len(wrong)} with a wrong outcome; slot B untouched by {untouched}, written but "
          f"left unbootable by {tried - untouched} (signed images refused mid-stream)")
    assert not wrong, "\n".join(wrong[:40])
    assert tried >= 200
    # and the disk still takes a good image
    good = tmp_path / "good.tar"
    good.write_bytes(signed_head(version="2.0") + GOOD[HEAD_LEN:])
    code, err = apply_in_process(m, good)
    assert code == 0, err
