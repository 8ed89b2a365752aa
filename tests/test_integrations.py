"""The init-system integrations: detection on root trees, installation, refusal, idempotence,
and shell syntax of the shipped scripts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from abupgrade import integrations
from abupgrade.errors import PolicyRefusal, UsageError
from abupgrade.integrations import KINDS, SERVICE, detect, install

HOOK = "abupgrade boot-hook"


def tree(root: Path, *files: str, links: dict[str, str] | None = None) -> Path:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text("#\n")
    for name, target in (links or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    return root


def busybox_root(root: Path) -> Path:
    return tree(root, "bin/busybox", links={"sbin/init": "/bin/busybox"})


@pytest.mark.parametrize(("files", "links", "kind"), [
    (["bin/busybox"], {"sbin/init": "/bin/busybox"}, "busybox"),
    (["usr/bin/busybox"], {"bin": "usr/bin", "sbin/init": "/bin/busybox"}, "busybox"),
    (["lib/systemd/systemd"], {"sbin/init": "../lib/systemd/systemd"}, "systemd"),
    (["bin/busybox", "sbin/openrc-run"], {"sbin/init": "/bin/busybox"}, "openrc"),
    (["sbin/openrc-init", "sbin/openrc-run"], {"sbin/init": "openrc-init"}, "openrc"),
    (["sbin/runit-init", "etc/runit/1"], {"sbin/init": "runit-init"}, "runit"),
    (["sbin/init", "etc/inittab", "etc/init.d/rcS"], {}, "sysvinit"),
])
def test_detect(tmp_path: Path, files: list[str], links: dict[str, str], kind: str) -> None:
    assert detect(tree(tmp_path, *files, links=links)) == kind


def test_detect_reads_links_inside_the_root_not_the_host(tmp_path: Path) -> None:
    # an absolute link names a path of the root tree; the host's /sbin/init does not count
    tree(tmp_path, "etc/inittab", links={"sbin/init": "/lib/systemd/systemd"})
    with pytest.raises(UsageError, match="cannot tell the init system"):
        detect(tmp_path)


def test_detect_unknown(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        detect(tmp_path)
    assert caught.value.hint is not None and "--init" in caught.value.hint


@pytest.mark.parametrize("kind", KINDS)
def test_data_files_run_the_hook(kind: str) -> None:
    assert HOOK in integrations.data(kind)


@pytest.mark.parametrize("kind", ["sysvinit", "openrc", "runit"])
def test_scripts_parse(kind: str, tmp_path: Path) -> None:
    script = tmp_path / kind
    script.write_text(integrations.data(kind))
    proc = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_busybox_line_parses() -> None:
    line = integrations.data("busybox").strip()
    assert line.startswith("::sysinit:")
    command = line.split(":", 3)[3]
    proc = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


EXPECTED = {
    "sysvinit": [f"etc/init.d/{SERVICE}"] + [f"etc/rc{n}.d/S90{SERVICE}" for n in "2345"],
    "openrc": [f"etc/init.d/{SERVICE}", f"etc/runlevels/default/{SERVICE}"],
    "runit": [f"etc/sv/{SERVICE}/run", f"etc/service/{SERVICE}"],
    "systemd": [f"etc/systemd/system/{SERVICE}.service",
                f"etc/systemd/system/multi-user.target.wants/{SERVICE}.service"],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_install_writes_and_links(kind: str, tmp_path: Path) -> None:
    written = install(kind, tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in written] == EXPECTED[kind]
    main = written[0]
    assert main.read_text() == integrations.data(kind)
    assert os.stat(main).st_mode & 0o777 == integrations.INTEGRATIONS[kind].mode
    for link in written[1:]:
        assert link.is_symlink()
        target = os.readlink(link)
        resolved = tmp_path / target.lstrip("/") if target.startswith("/") else link.parent / target
        assert resolved.resolve() == main.resolve() or resolved.resolve() == main.parent.resolve()
    assert install(kind, tmp_path) == []  # again: nothing to write, no refusal
    assert not [p for p in tmp_path.rglob("*abupgrade-tmp*")]


def test_install_runit_uses_the_distribution_service_dir(tmp_path: Path) -> None:
    tree(tmp_path, "etc/runit/runsvdir/default/", links={"var/service": "/etc/runit/runsvdir/default"})
    written = install("runit", tmp_path)
    assert written[1] == tmp_path / f"etc/runit/runsvdir/default/{SERVICE}"
    assert os.readlink(written[1]) == f"/etc/sv/{SERVICE}"


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_install_refuses_a_different_file_without_force(kind: str, tmp_path: Path) -> None:
    target = tmp_path / EXPECTED[kind][0]
    target.parent.mkdir(parents=True)
    target.write_text("mine\n")
    with pytest.raises(PolicyRefusal, match="differs"):
        install(kind, tmp_path)
    assert target.read_text() == "mine\n"
    install(kind, tmp_path, force=True)
    assert target.read_text() == integrations.data(kind)


def test_install_refuses_a_foreign_link_without_force(tmp_path: Path) -> None:
    link = tmp_path / EXPECTED["openrc"][1]
    link.parent.mkdir(parents=True)
    link.symlink_to("/etc/init.d/something-else")
    with pytest.raises(PolicyRefusal, match="link"):
        install("openrc", tmp_path)
    install("openrc", tmp_path, force=True)
    assert os.readlink(link) == f"/etc/init.d/{SERVICE}"


def test_busybox_inserts_after_the_last_sysinit_line(tmp_path: Path) -> None:
    inittab = busybox_root(tmp_path) / "etc/inittab"
    inittab.parent.mkdir()
    inittab.write_text("# mine\n::sysinit:/etc/init.d/rcS\n::sysinit:/sbin/mount -a\n"
                       "ttyS0::respawn:/sbin/getty -L ttyS0 115200 vt100\n")
    inittab.chmod(0o600)
    assert install(detect(tmp_path), tmp_path) == [inittab]
    lines = inittab.read_text().splitlines()
    line = integrations.data("busybox").strip()
    assert lines == ["# mine", "::sysinit:/etc/init.d/rcS", "::sysinit:/sbin/mount -a", line,
                     "ttyS0::respawn:/sbin/getty -L ttyS0 115200 vt100"]
    assert os.stat(inittab).st_mode & 0o777 == 0o600
    install("busybox", tmp_path)
    assert inittab.read_text().splitlines().count(line) == 1


def test_busybox_without_inittab_keeps_busybox_defaults(tmp_path: Path) -> None:
    install("busybox", busybox_root(tmp_path))
    lines = (tmp_path / "etc/inittab").read_text().splitlines()
    assert lines[:2] == ["::sysinit:/etc/init.d/rcS", integrations.data("busybox").strip()]
    assert "::askfirst:-/bin/sh" in lines


def test_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no integration"):
        install("upstart", tmp_path)
