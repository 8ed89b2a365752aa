"""Trust boundaries through the command line on loop disks: strict modes refuse what another
user could have written (the boot hook fails a refused check, never skips it), a revoked key
signs nothing through `apply` from a file, an http URL or a registry, and the security floor
holds even with --allow-downgrade and rises only when an image that declares it is committed."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abupgrade import config as configuration
from abupgrade import oci
from abupgrade.config import SecurityConfig
from abupgrade.image import build, keys
from abupgrade.model import Slot
from fixtures.images import KeyPair, keypair, rootfs_image
from fixtures.machine import Machine, run_cli, running_machine
from fixtures.registry import RegistryServer, available, registry
from fixtures.tiers import any_bootloader, needs, needs_registry

pytestmark = pytest.mark.loop

NOBODY = 65534

# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture
def machine(ab_disk: Path, tmp_path: Path) -> Iterator[Machine]:
    with running_machine(ab_disk, tmp_path / "machine", booted=Slot.A, health_timeout=5) as m:
        yield m


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, signer: KeyPair) -> dict[str, KeyPair]:
    """`signer` is the key the test disks trust; `new` is the key it is rotated to."""
    return {"signer": signer, "new": keypair(tmp_path_factory.mktemp("keys"), "new")}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security-images")


@pytest.fixture(scope="module")
def images(image_dir: Path, pairs: dict[str, KeyPair]) -> Callable[..., Path]:
    """images(version, *signers, floor=None) -> a signed image (signers by name, see pairs;
    `signer` when none is named), with `floor` as its manifest's security_floor."""
    made: dict[tuple[object, ...], Path] = {}

    def make(version: str, *signers: str, floor: str | None = None) -> Path:
        names = signers or ("signer",)
        if (version, names, floor) not in made:
            name = f"v{version}-{'-'.join(names)}" + (f"-floor{floor}" if floor else "")
            rootfs = rootfs_image(image_dir / f"{name}.ext4", tag=version, size=8 << 20)
            out = image_dir / f"{name}.tar"
            build.build(rootfs, version, "test-box", [pairs[n].private for n in names], out,
                        compression="none", security_floor=floor)
            made[version, names, floor] = out
        return made[version, names, floor]

    return make


@pytest.fixture(scope="module")
def web(image_dir: Path) -> Iterator[str]:
    """The image folder over plain HTTP on 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(image_dir))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading a rejected image: nothing to report


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    needs_registry(available())
    with registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


def sources(image: Path, web: str, hub: RegistryServer) -> list[str]:
    """The same image as a path, an http URL and an oci:// reference."""
    ref = hub.reference("security/os", image.name.removesuffix(".tar"))
    oci.push(image, ref)
    return [str(image), f"{web}/{image.name}", ref]


def refused(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The one line a refusal prints, after checking its exit code and words."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert "\n" not in line, line
    for word in words:
        assert word in line, line
    return line


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def status(m: Machine) -> dict[str, object]:
    data: dict[str, object] = json.loads(ok(m.cli("status", "--json")).stdout)
    return data


def events(m: Machine) -> list[dict[str, str]]:
    data: list[dict[str, str]] = json.loads(ok(m.cli("history", "--json")).stdout)
    return data


def key_id(pair: KeyPair) -> str:
    return keys.key_id(keys.load_public(pair.public))


def cancel_trial(m: Machine) -> None:
    ok(m.cli("mark-bad", "B"))


# ------------------------------------------------------------------ strict modes


@any_bootloader
def test_strict_modes_refuse_configuration_keyring_and_state(
        machine: Machine, images: Callable[..., Path]) -> None:
    needs(root=True)
    image = str(images("2.0"))
    keyring, state = machine.config.keyring, machine.config.state_dir / "state.json"
    before = events(machine)
    cases: list[tuple[Path, int, tuple[str, ...], str]] = [
        # path, mode, the command, what the refusal names
        (machine.config_path, 0o664, ("status",), "refusing configuration"),
        (machine.workdir, 0o777, ("status",), "refusing configuration"),
        (keyring, 0o775, ("apply", image), "refusing keyring"),
        (keyring / "signer.pub", 0o666, ("apply", image), "refusing key"),
        (state, 0o646, ("apply", image), "refusing state file"),
        (state.parent, 0o757, ("history",), "refusing"),
    ]
    (keyring / "revoked").write_text("# nobody yet\n")
    cases.append((keyring / "revoked", 0o664, ("apply", image), "refusing revocation list"))
    for path, mode, command, what in cases:
        original = path.stat().st_mode & 0o7777
        path.chmod(mode)
        try:
            refused(machine.cli(*command), 2, what, f"(hint: chmod go-w {path})")
        finally:
            path.chmod(original)
    for path in (keyring / "signer.pub", keyring):
        os.chown(path, NOBODY, NOBODY)
        try:
            refused(machine.cli("apply", image), 2, f"owned by uid {NOBODY}",
                    f"(hint: chown root {path})")
        finally:
            os.chown(path, 0, 0)
    assert events(machine) == before  # nothing was written, nothing armed
    assert status(machine)["trial"] is None
    # a symlink is judged by its target: a key linked from a writable folder is refused
    loose = machine.workdir / "loose"
    loose.mkdir(mode=0o755)
    (loose / "other.pub").write_bytes((keyring / "signer.pub").read_bytes())
    (keyring / "other.pub").symlink_to(loose / "other.pub")
    loose.chmod(0o777)
    refused(machine.cli("apply", image), 2, "refusing key", f"(hint: chmod go-w {loose})")
    loose.chmod(0o755)
    ok(machine.cli("apply", "--dry-run", image))


@any_bootloader
def test_refused_checks_fail_the_trial_and_refused_hooks_never_run(
        machine: Machine, images: Callable[..., Path]) -> None:
    ran = machine.workdir / "ran"
    ran.mkdir()
    machine.add_check("required", "10-fine", f"touch {ran}/10-fine")
    machine.add_check("required", "20-open", f"touch {ran}/20-open").chmod(0o757)
    hooks = machine.config.hooks_dir
    assert hooks is not None
    for event, mode in (("rolled-back", 0o777), ("committed", 0o755)):
        hook = hooks / f"{event}.d" / "10-report"
        hook.parent.mkdir(parents=True)
        hook.write_text(f"#!/bin/sh\ntouch {ran}/{event}-hook\n")
        hook.chmod(mode)
    ok(machine.cli("apply", str(images("2.0"))))
    machine.boot(Slot.B)
    refused(machine.cli("boot-hook", "--no-reboot"), 5, "required check 20-open failed",
            "refusing required check")
    assert sorted(p.name for p in ran.iterdir()) == ["10-fine"]  # neither 20-open nor the hook
    history = events(machine)
    rolled = next(e for e in history if e["event"] == "rolled-back")
    assert f"chmod go-w {machine.config.health.dir / 'required.d/20-open'}" in rolled["detail"]
    failed = [e["detail"] for e in history if e["event"] == "hook-failed"]
    assert len(failed) == 1 and "rolled-back hook 10-report not run: refusing" in failed[0]
    # the same trial again: the open check is gone, but a folder of wanted checks others may
    # write is refused as a whole (recorded, not blocking); the committed hook runs
    (machine.config.health.dir / "required.d/20-open").unlink()
    wanted = machine.add_check("wanted", "30-any", f"touch {ran}/30-any").parent
    wanted.chmod(0o777)
    machine.boot(Slot.A)
    ok(machine.cli("apply", str(images("2.0"))))
    machine.boot(Slot.B)
    result = json.loads(ok(machine.cli("boot-hook", "--no-reboot", "--json")).stdout)
    assert result["outcome"] == "committed"
    checks = {c["name"]: c for c in result["health"]["checks"]}
    assert checks["wanted.d"]["result"] == "fail" and "refusing wanted check folder" in \
        checks["wanted.d"]["output"]
    assert sorted(p.name for p in ran.iterdir()) == ["10-fine", "committed-hook"]


def test_disk_init_under_a_loose_umask_passes_strict_modes(
        tmp_path: Path, make_image: Callable[..., Path], signer: KeyPair) -> None:
    """What `disk init` writes must pass, whatever the umask of whoever ran it."""
    needs(loop=True)
    disk = tmp_path / "disk.img"
    proc = subprocess.run(
        [sys.executable, "-m", "abupgrade", "disk", "init", str(disk), "--bootloader", "grub",
         "--size", "512M", "--slot-size", "64M", "--image", str(make_image("1.0")),
         "--pubkey", str(signer.public)],
        capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o002))
    assert proc.returncode == 0, proc.stderr
    ok(run_cli("--disk", str(disk), "status"))  # the disk's own configuration
    with running_machine(disk, tmp_path / "m") as m:  # its keyring and state
        assert status(m)["slots"]["A"]["version"] == "1.0"  # type: ignore[index]
        ok(m.cli("apply", "--dry-run", str(make_image("2.0"))))


# ------------------------------------------------------------------ revocation


@any_bootloader
def test_revoked_key_signs_nothing_through_file_url_and_oci(
        machine: Machine, images: Callable[..., Path], pairs: dict[str, KeyPair], web: str,
        hub: RegistryServer) -> None:
    old, new = key_id(pairs["signer"]), key_id(pairs["new"])
    keyring = machine.config.keyring
    (keyring / "revoked").write_text(f"# the build host was broken into\n{old}\n")
    only_old = sources(images("2.0"), web, hub)
    for source in only_old:
        refused(machine.cli("apply", source), 3, f"signed only by revoked key(s) {old}")
        refused(machine.cli("image", "verify", source), 3, "revoked")
    refused(machine.cli("check", only_old[-1]), 3, "revoked")
    assert status(machine)["trial"] is None
    inspected = json.loads(ok(machine.cli("image", "inspect", only_old[0], "--json")).stdout)
    assert inspected["signatures"] == [{"key_id": old, "trusted": False, "revoked": True}]
    assert f"signature by key {old}: REVOKED" in ok(machine.cli("image", "inspect", only_old[0])).stdout

    # rotation: the image signed by the old and the new key installs once the new one is trusted
    both = sources(images("2.0", "signer", "new"), web, hub)
    refused(machine.cli("apply", both[0]), 3, f"{new}, none in the keyring", "revoked")
    (keyring / "new.pub").write_bytes(pairs["new"].public.read_bytes())
    assert ok(machine.cli("check", both[-1])).stdout.strip() == "2.0"
    for source in both:
        applied = json.loads(ok(machine.cli("apply", source, "--json")).stdout)
        assert applied["version"] == "2.0" and status(machine)["trial"] == "B"
        cancel_trial(machine)
    signatures = json.loads(ok(machine.cli("image", "inspect", both[0], "--json")).stdout)
    assert {s["key_id"]: (s["trusted"], s["revoked"]) for s in signatures["signatures"]} == {
        old: (False, True), new: (True, False)}


# ------------------------------------------------------------------ the security floor


@any_bootloader
def test_security_floor_holds_through_file_url_and_oci_and_rises_on_commit(
        machine: Machine, images: Callable[..., Path], web: str, hub: RegistryServer) -> None:
    assert status(machine)["security_floor"] is None
    machine.config = dataclasses.replace(machine.config, security=SecurityConfig("1.5"))
    machine.config_path.write_text(configuration.render(machine.config))
    assert status(machine)["security_floor"] == "1.5"
    below = sources(images("1.2"), web, hub)
    for source in below:
        refused(machine.cli("apply", "--allow-downgrade", source), 4,
                "version 1.2, below the security floor 1.5", "not even with --allow-downgrade")
    refused(machine.cli("check", below[-1]), 4, "below the security floor 1.5")

    # an image that raises the floor to 2.0 does so when committed, not when installed
    raising = sources(images("2.0", floor="2.0"), web, hub)
    ok(machine.cli("apply", raising[-1]))
    assert status(machine)["security_floor"] == "1.5"
    machine.boot(Slot.B)
    ok(machine.cli("boot-hook", "--no-reboot"))
    assert status(machine)["security_floor"] == "2.0"
    raised = events(machine)[-1]
    assert (raised["event"], raised["version"], raised["slot"]) == ("security-floor", "2.0", "B")
    # a state file lost to corruption is rebuilt with the floor the history recorded
    (machine.config.state_dir / "state.json").write_text("{")
    machine.boot(Slot.B)
    ok(machine.cli("boot-hook", "--no-reboot"))
    assert events(machine)[-1]["event"] == "repaired"
    assert status(machine)["security_floor"] == "2.0"
    for source in sources(images("1.8"), web, hub):
        refused(machine.cli("apply", "--allow-downgrade", source), 4,
                "version 1.8, below the security floor 2.0")
    # nor does a way back lead below it: slot A (1.0) stays where it is
    refused(machine.cli("rollback"), 4, "slot A holds version 1.0, below the security floor 2.0")
    refused(machine.cli("mark-bad", "B"), 4, "would boot slot A, version 1.0, below")
    ok(machine.cli("apply", "--allow-downgrade", "--dry-run", raising[0]))  # at the floor: fine

    # a trial that fails its checks raises nothing: its slot never was committed
    machine.add_check("required", "10-no", "exit 1")
    ok(machine.cli("apply", str(images("3.0", floor="3.0"))))
    machine.boot(Slot.A)
    refused(machine.cli("boot-hook", "--no-reboot"), 5, "required check 10-no failed")
    assert status(machine)["security_floor"] == "2.0"
    machine.boot(Slot.B)  # the reboot after the rollback
    ok(machine.cli("apply", "--dry-run", str(images("2.5"))))
