"""The command line: options anywhere, one-line errors, exit codes of the contract."""

from __future__ import annotations

import json
from pathlib import Path

from abupgrade.cli import parse
from fixtures.images import keypair
from fixtures.machine import run_cli


def test_global_options_stand_anywhere() -> None:
    g, args = parse(["status", "--json", "--config", "x.toml"])
    assert g.json and g.config == Path("x.toml") and args.run.__name__ == "status"
    g, args = parse(["--disk=d.img", "apply", "img", "--dry-run", "-q"])
    assert g.disk == Path("d.img") and g.quiet and args.image == "img" and args.dry_run
    g, args = parse(["--json", "image", "--debug", "verify", "x.tar"])
    assert g.json and g.debug and args.image == "x.tar" and not g.quiet
    g, args = parse(["apply", "--", "--json"])  # after --, an image named --json
    assert args.image == "--json" and not g.json


def test_usage_error_is_exit_2_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("--config", str(tmp_path / "missing.toml"), "status")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no configuration" in proc.stderr
    assert proc.stderr.startswith("abupgrade: ") and "hint:" in proc.stderr
    assert proc.stdout == ""


def test_unknown_command_is_exit_2() -> None:
    assert run_cli("frobnicate").returncode == 2


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    proc = run_cli("keygen", str(tmp_path / "k"), "--json")
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    assert Path(made["private"]).stat().st_mode & 0o777 == 0o600
    before = Path(made["private"]).read_bytes()
    again = run_cli("keygen", str(tmp_path / "k"))
    assert again.returncode == 2 and Path(made["private"]).read_bytes() == before


def test_build_verify_inspect_through_the_cli(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"\0" * 65536 + b"root" * 1000)
    out = tmp_path / "image.tar"
    proc = run_cli("image", "build", "--rootfs", str(rootfs), "--version", "1.2.3",
                   "--compatible", "box", "--key", str(key.private), "-o", str(out),
                   "--compress", "zstd")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("image", "verify", str(out), "--pubkey", str(key.public), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == "1.2.3"
    info = json.loads(run_cli("image", "inspect", str(out), "--json").stdout)
    assert info["compatible"] == "box" and info["signatures"][0]["trusted"] is None
    assert [p["name"] for p in info["payloads"]] == ["rootfs"]
    stranger = keypair(tmp_path, "stranger")
    proc = run_cli("image", "verify", str(out), "--pubkey", str(stranger.public))
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1
    proc = run_cli("image", "verify", "-", "--pubkey", str(key.public), stdin=out.read_bytes()[:-2000])
    assert proc.returncode == 3


def test_install_hook_into_a_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = run_cli("install-hook", "--root", str(tmp_path), "--init", "busybox", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == [str(tmp_path / "etc/inittab")]
    assert "abupgrade boot-hook" in (tmp_path / "etc/inittab").read_text()
    first = (tmp_path / "etc/inittab").read_text()
    again = run_cli("install-hook", "--root", str(tmp_path), "--init", "busybox")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "etc/inittab").read_text() == first  # no second hook line
    assert run_cli("install-hook", "--root", str(tmp_path), "--init", "upstart").returncode == 2
