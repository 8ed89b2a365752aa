"""The GRUB env blocks against the real grub-editenv, and preflight on real files and a real
ext4 filesystem on a loop device."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from abupgrade.bootloader.grub import (
    ENV_SIZE,
    EnvState,
    Grub,
    GrubConfig,
    block_generation,
    create_blocks,
    format_envblk,
    parse_envblk,
)
from abupgrade.errors import UsageError
from abupgrade.model import Slot
from fixtures.guest import loop_device, make_ext4_image, mounted
from fixtures.tiers import guest_skips, needs

pytestmark = pytest.mark.loop

EDITENV = shutil.which("grub-editenv")


@pytest.fixture(autouse=True)
def _need_editenv() -> None:
    needs(tools=("grub-editenv",))


def editenv(path: Path, *args: str) -> str:
    assert EDITENV is not None
    return subprocess.run([EDITENV, str(path), *args], check=True, capture_output=True,
                          text=True).stdout


def grub(env: Path) -> Grub:
    return Grub(GrubConfig(env=env))


ODD_VALUES = [("plain", "x"), ("spaces", "a b  c"), ("slash", "C:\\boot\\"),
              ("newline", "one\ntwo"), ("empty", ""), ("hash", "#not a comment"),
              ("equals", "k=v=w")]


def test_grub_editenv_lists_what_we_write(tmp_path: Path) -> None:
    block = tmp_path / "grubenv"
    block.write_bytes(format_envblk(ODD_VALUES))
    listed = editenv(block, "list")
    assert listed == "".join(f"{name}={value}\n" for name, value in ODD_VALUES)
    state = EnvState(default=Slot.B, good=frozenset(Slot), trial=Slot.A, tries=7)
    block.write_bytes(state.block(2))
    assert editenv(block, "list") == ("ab_gen=2\nab_default=B\nab_A=g\nab_B=g\nab_trial=A\n"
                                      "ab_tries=7\nab_end=2\n")


def test_we_read_what_grub_editenv_writes(tmp_path: Path) -> None:
    block = tmp_path / "grubenv"
    editenv(block, "create")
    assert block.stat().st_size == ENV_SIZE
    assert parse_envblk(block.read_bytes()) == {}
    editenv(block, "set", *(f"{n}={v}" for n, v in ODD_VALUES))
    assert parse_envblk(block.read_bytes()) == dict(ODD_VALUES)
    editenv(block, "unset", "plain", "slash")
    assert parse_envblk(block.read_bytes()) == {
        n: v for n, v in ODD_VALUES if n not in ("plain", "slash")}


def test_a_block_grub_editenv_made_with_our_variables_is_read_as_ours(tmp_path: Path) -> None:
    block = tmp_path / "grubenv"
    editenv(block, "create")
    editenv(block, "set", "ab_gen=1", "ab_default=B", "ab_A=b", "ab_B=g", "ab_trial=A",
            "ab_tries=4", "ab_end=1")
    data = block.read_bytes()
    assert block_generation(data) == 1
    env = parse_envblk(data)
    assert env is not None
    assert EnvState.from_vars(env) == EnvState(default=Slot.B, good=frozenset({Slot.B}),
                                               trial=Slot.A, tries=4)
    assert list(env.items()) == EnvState(default=Slot.B, good=frozenset({Slot.B}),
                                         trial=Slot.A, tries=4).variables(1)
    editenv(block, "set", "ab_end=2")  # a torn block, as GRUB would see it
    assert block_generation(block.read_bytes()) is None


def test_state_changes_are_listed_by_grub_editenv(tmp_path: Path) -> None:
    env = tmp_path / "grubenv"
    create_blocks(env)
    g = grub(env)
    g.arm_trial(Slot.B, 3)
    g.commit(Slot.B)
    cur = g.current()
    assert cur.index is not None
    listed = dict(line.split("=", 1)
                  for line in editenv(g.env_paths[cur.index], "list").splitlines())
    assert listed["ab_default"] == "B" and listed["ab_B"] == "g" and listed["ab_trial"] == "-"
    assert listed["ab_gen"] == listed["ab_end"] == str(cur.generation)


def test_preflight_accepts_fresh_blocks_and_refuses_sparse_or_resized(tmp_path: Path) -> None:
    env = tmp_path / "grubenv"
    create_blocks(env)
    g = grub(env)
    g.preflight()
    second = g.env_paths[1]

    second.unlink()
    with pytest.raises(UsageError, match="no GRUB environment block") as info:
        g.preflight()
    assert info.value.hint

    with open(second, "wb") as f:  # a hole: right size, nothing allocated
        f.truncate(ENV_SIZE)
    assert second.stat().st_blocks == 0
    with pytest.raises(UsageError, match="sparse") as info:
        g.preflight()
    assert info.value.hint

    second.write_bytes(EnvState().block(2) + b"#" * ENV_SIZE)
    with pytest.raises(UsageError, match="2048 bytes") as info:
        g.preflight()
    assert info.value.hint

    editenv(second, "create")  # grub-editenv makes a good 1024-byte block
    g.preflight()


@pytest.fixture
def ext4_mount(tmp_path: Path) -> Iterator[Path]:
    needs(loop=True)
    image = tmp_path / "boot.ext4"
    with guest_skips():
        make_ext4_image(image, None, 16 << 20, "boot")
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt") as point:
        yield point


def physical_offset(path: Path) -> int:
    """Where the file's first block is on the device (filefrag, FIEMAP)."""
    out = subprocess.run(["filefrag", "-e", "-b1", str(path)], check=True, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        fields = line.replace(":", " ").replace("..", " ").split()
        if fields and fields[0] == "0":
            return int(fields[3])
    raise AssertionError(f"no extent in filefrag output:\n{out}")


def test_blocks_on_ext4_are_written_in_place(ext4_mount: Path) -> None:
    needs(tools=("filefrag",))
    env = ext4_mount / "grub" / "grubenv"
    env.parent.mkdir()
    create_blocks(env)
    os.sync()
    g = grub(env)
    g.preflight()
    where = [(p.stat().st_ino, physical_offset(p)) for p in g.env_paths]
    for i in range(6):
        g.arm_trial(Slot.B, 1 + i)
        g.commit(Slot.B if i % 2 else Slot.A)
    os.sync()
    assert [(p.stat().st_ino, physical_offset(p)) for p in g.env_paths] == where
    assert g.read().default is Slot.B
