"""The command line: options anywhere, one-line errors, exit codes of the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abupgrade.cli import parse
from fixtures.images import keypair
from fixtures.machine import file_machine, run_cli


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
    assert [p["name"] for p in info["payloads"]] == ["rootfs.index", "rootfs.chunks", "rootfs"]
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


def test_image_build_warns_and_builds_without_an_index_on_request(tmp_path: Path) -> None:
    from fixtures.guest import make_ext4_image

    key = keypair(tmp_path)
    rootfs = make_ext4_image(tmp_path / "small.ext4", None, 8 << 20, "r", block_size=1024)
    out = tmp_path / "image.tar"
    args = ("image", "build", "--rootfs", str(rootfs), "--version", "1", "--compatible", "box",
            "--key", str(key.private), "-o", str(out), "--compress", "zstd")
    proc = run_cli(*args)
    assert proc.returncode == 0 and "1024-byte blocks" in proc.stderr, proc.stderr
    inspected = json.loads(run_cli("image", "inspect", str(out), "--json").stdout)
    assert inspected["format"] == 3 and [p["name"] for p in inspected["payloads"]] == [
        "rootfs.index", "rootfs.chunks", "rootfs"]
    for extra, fmt, names in ((("--no-index",), 3, ["rootfs"]),
                              (("--sha256-only",), 2, ["rootfs.index", "rootfs.chunks", "rootfs"]),
                              (("--no-index", "--sha256-only"), 1, ["rootfs"])):
        proc = run_cli(*args, *extra, "--force")
        assert proc.returncode == 0, proc.stderr
        inspected = json.loads(run_cli("image", "inspect", str(out), "--json").stdout)
        assert inspected["format"] == fmt, extra
        assert [p["name"] for p in inspected["payloads"]] == names, extra
        assert all(("blake3" in p) == (fmt == 3) for p in inspected["payloads"]), extra


def lines_of_json(text: str) -> list[dict[str, object]]:
    """Every line of `text` parsed as a JSON object (the test fails on any other line)."""
    found = []
    for line in text.splitlines():
        item = json.loads(line)
        assert isinstance(item, dict), line
        found.append(item)
    return found


def test_failure_under_json_is_one_object_on_stdout_and_stderr(tmp_path: Path) -> None:
    proc = run_cli("--config", str(tmp_path / "missing.toml"), "status", "--json")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)
    assert lines_of_json(proc.stderr) == [error]
    assert error == {"error": f"no configuration at {tmp_path / 'missing.toml'}",
                     "hint": error["hint"], "exit": 2} and "--config" in error["hint"]


def test_stderr_holds_only_json_lines_under_json(tmp_path: Path) -> None:
    """Progress and a warning (a private key others can read) as JSON lines; the result on
    stdout."""
    key = keypair(tmp_path)
    key.private.chmod(0o644)
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"root" * 300_000)
    proc = run_cli("image", "build", "--rootfs", str(rootfs), "--version", "1", "--compatible",
                   "box", "--key", str(key.private), "-o", str(tmp_path / "i.tar"), "--json")
    assert proc.returncode == 0, proc.stderr
    events = lines_of_json(proc.stderr)
    assert any("progress" in e for e in events) and events[-1].get("finished") is True
    warnings = [e["warning"] for e in events if "warning" in e]
    assert len(warnings) == 1 and "readable by others" in str(warnings[0])
    assert json.loads(proc.stdout)["version"] == "1"


def test_a_public_key_given_as_key_fails_without_a_private_key_warning(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"root" * 1000)
    proc = run_cli("image", "build", "--rootfs", str(rootfs), "--version", "1", "--compatible",
                   "box", "--key", str(key.public), "-o", str(tmp_path / "i.tar"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not an unencrypted PEM private key" in proc.stderr and "warning" not in proc.stderr
    assert not (tmp_path / "i.tar").exists()


def test_image_build_never_replaces_its_input_and_asks_before_replacing(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"root" * 1000)
    out = tmp_path / "image.tar"
    base = ["image", "build", "--rootfs", str(rootfs), "--version", "1", "--compatible", "box",
            "--key", str(key.private)]
    assert run_cli(*base, "-o", str(out)).returncode == 0
    first = out.read_bytes()
    again = run_cli(*base, "-o", str(out))
    assert again.returncode == 2 and f"{out} exists" in again.stderr and "--force" in again.stderr
    assert out.read_bytes() == first
    assert run_cli(*base, "-o", str(out), "--force").returncode == 0
    for target in (rootfs, key.private, tmp_path / "." / "rootfs.img"):
        proc = run_cli(*base, "-o", str(target), "--force")
        assert proc.returncode == 2 and "is also an input" in proc.stderr, proc.stderr
    assert rootfs.read_bytes() == b"root" * 1000


def test_an_ext4_file_is_not_an_image(tmp_path: Path) -> None:
    from fixtures.images import rootfs_image

    ext4 = rootfs_image(tmp_path / "rootfs.ext4", tag="x", size=4 << 20)
    key = keypair(tmp_path)
    proc = run_cli("image", "verify", str(ext4), "--pubkey", str(key.public))
    assert proc.returncode == 3
    assert "abupgrade: not an abupgrade image: it starts with 512 zero bytes" in proc.stderr


def test_verify_without_keys_or_configuration_points_to_pubkey(tmp_path: Path) -> None:
    from abupgrade.config import config_path

    if config_path(None).exists():
        pytest.skip(f"this machine has a configuration ({config_path(None)})")
    proc = run_cli("image", "verify", str(tmp_path / "any.tar"))
    assert proc.returncode == 2 and "--pubkey" in proc.stderr, proc.stderr


def test_install_hook_twice_says_nothing_changed(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    first = run_cli("install-hook", "--root", str(tmp_path), "--init", "busybox")
    assert first.returncode == 0 and "etc/inittab" in first.stdout
    again = run_cli("install-hook", "--root", str(tmp_path), "--init", "busybox", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["written"] == []
    text = run_cli("install-hook", "--root", str(tmp_path), "--init", "busybox").stdout
    assert "already installed" in text


def test_status_history_and_mark_good_on_a_machine_of_files(tmp_path: Path) -> None:
    config = file_machine(tmp_path / "m")
    status = json.loads(run_cli("--config", str(config), "status", "--json").stdout)
    assert status["trial"] is None and status["trial_boots_left"] is None
    proc = run_cli("--config", str(config), "mark-good")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "slot A committed (version unknown)\n"
    assert "None" not in proc.stdout


def test_piped_output_is_plain_and_never_cut(tmp_path: Path) -> None:
    """history and image inspect print every value in full when stdout is a pipe."""
    config = file_machine(tmp_path / "m")
    assert run_cli("--config", str(config), "mark-good").returncode == 0
    events = json.loads(run_cli("--config", str(config), "history", "--json").stdout)
    text = run_cli("--config", str(config), "history").stdout
    assert events[-1]["time"] in text and events[-1]["detail"] in text
    assert "…" not in text and "..." not in text and "\x1b[" not in text
    key = keypair(tmp_path)
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"root" * 1000)
    image = tmp_path / "image.tar"
    assert run_cli("image", "build", "--rootfs", str(rootfs), "--version", "1",
                   "--compatible", "box", "--key", str(key.private), "-o", str(image)
                   ).returncode == 0
    info = json.loads(run_cli("image", "inspect", str(image), "--json").stdout)
    text = run_cli("image", "inspect", str(image)).stdout
    assert info["payloads"][0]["sha256"] in text and "…" not in text and "\x1b[" not in text
