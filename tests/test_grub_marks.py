"""What GRUB could not do reaches the boot hook in the same boot (grub.cfg's marks on the
kernel command line), decided by GRUB itself: grub-emu runs the rendered grub.cfg, the real
boot hook runs on the machine-as-files of fixtures/filemachine.py.

- A trial whose kernel GRUB cannot load: GRUB has spent one try and boots the fallback entry;
  the hook records `fallback` with the reason, the slot is bad, `apply` runs again.
- A damaged env block GRUB cannot save the count into: GRUB boots the default; the hook
  repairs the block, says so, and the trial runs at the next boot. `status` names the damage.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from abupgrade import ops
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.grub import block_paths, current
from abupgrade.model import Slot
from abupgrade.state import Store
from abupgrade.system import Options
from fixtures.filemachine import GRUB_ENV, STATE, Bench, GrubCache, Image, make_image
from fixtures.grubemu import EmuUnavailable, GrubEmu
from fixtures.images import KeyPair, keypair

pytestmark = pytest.mark.loop  # grub-emu: the tier that fails where a tool is missing


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyPair, dict[str, Image]]:
    base = tmp_path_factory.mktemp("images")
    key = keypair(base / "signer")
    return key, {v: make_image(base, key, v) for v in ("1.0", "2.0", "3.0")}


@pytest.fixture(scope="module")
def grub(tmp_path_factory: pytest.TempPathFactory) -> GrubCache:
    try:
        return GrubCache(GrubEmu(tmp_path_factory.mktemp("emu")))
    except EmuUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def bench(tmp_path: Path, images: tuple[KeyPair, dict[str, Image]],
          grub: GrubCache) -> Iterator[Bench]:
    key, made = images
    (tmp_path / "bench").mkdir()
    yield Bench(BootloaderKind.GRUB, tmp_path / "bench", key, made, grub.emu,
                grub_runs=grub.runs)


def history(root: Path) -> list[tuple[str, str]]:
    return [(e.event, e.detail) for e in Store(root / STATE).history()]


def status(bench: Bench, root: Path, booted: Slot) -> dict[str, object]:
    with bench.machine(root, booted):
        return ops.status(Options()).to_json()


def test_a_trial_grub_cannot_load_is_a_fallback_in_the_same_boot(bench: Bench) -> None:
    root = bench.work / "m"
    bench.init(root)
    bench.apply(root, Slot.A, "2.0")
    (root / "boot/grub/slots/B/vmlinuz").unlink()  # GRUB cannot load the trial's kernel
    slot, _loaded, why = bench.power_on(root)
    assert slot is Slot.A, why
    assert "abupgrade.fallback=B" in (bench.host / "cmdline").read_text()
    result = bench.hook(root, slot)
    assert result.outcome == "fallback", result
    event, detail = history(root)[-1]
    assert event == "fallback" and "could not load the trial slot's kernel" in detail, detail
    after = status(bench, root, Slot.A)
    assert after["trial"] is None and after["next_boot"] == "A", after
    bench.apply(root, Slot.A, "3.0")  # not refused as "trial pending"


@pytest.mark.parametrize("damage", [bytes(1024), os.urandom(1024)], ids=["zeroed", "garbage"])
def test_a_block_grub_cannot_save_into_is_repaired_and_the_trial_runs(
        bench: Bench, damage: bytes) -> None:
    root = bench.work / "m"
    bench.init(root)
    bench.apply(root, Slot.A, "2.0")
    paths = block_paths(root / GRUB_ENV)
    target = paths[current([p.read_bytes() for p in paths]).target]
    target.write_bytes(damage)
    noted = status(bench, root, Slot.A)["notes"]
    assert any(target.name in str(n) and "damaged" in str(n) for n in noted), noted  # type: ignore[attr-defined]
    slot, _loaded, why = bench.power_on(root)
    assert slot is Slot.A, why
    assert "abupgrade.unsaved=B" in (bench.host / "cmdline").read_text()
    result = bench.hook(root, slot)
    assert result.outcome == "trial-pending" and result.repaired, result
    event, detail = history(root)[-1]
    assert event == "repaired" and "could not save the trial's boot count" in detail, detail
    slot, _loaded, why = bench.power_on(root)
    assert slot is Slot.B, f"the trial did not run after the repair: {why}"
    assert bench.hook(root, slot).outcome == "committed"


def test_a_committed_boot_repairs_a_damaged_block(bench: Bench) -> None:
    root = bench.work / "m"
    bench.init(root)
    paths = block_paths(root / GRUB_ENV)
    paths[1].write_bytes(b"\xff" * 1024)
    result = bench.hook(root, Slot.A)
    assert result.outcome == "committed-boot" and result.repaired, result
    assert history(root)[-1][0] == "repaired"
    assert status(bench, root, Slot.A)["notes"] == []
    assert all(p.read_bytes().startswith(b"# GRUB Environment Block\n") for p in paths)
