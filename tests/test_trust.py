"""Trust boundaries on plain files: strict modes (each violation refused with the path and the
fix), the keyring's revocation list, and the manifest's security floor field."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from abupgrade import trust
from abupgrade.errors import ImageRejected, UsageError
from abupgrade.image import keys, manifest, reader
from abupgrade.image.build import build
from abupgrade.image.keys import Keyring
from abupgrade.trust import Kind, UnsafePath

NOBODY = 65534


def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")


def refused(path: Path, kind: Kind = Kind.FILE) -> UnsafePath:
    with pytest.raises(UnsafePath) as caught:
        trust.check(path, "thing", kind)
    assert caught.value.exit_code == 2
    assert "\n" not in caught.value.message
    return caught.value


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp_path/etc/keys/a.pub, all root's (or ours) and 0755/0644: nothing to refuse."""
    (tmp_path / "etc/keys").mkdir(parents=True)
    (tmp_path / "etc/keys/a.pub").write_text("key\n")
    for path in (tmp_path / "etc", tmp_path / "etc/keys"):
        path.chmod(0o755)
    (tmp_path / "etc/keys/a.pub").chmod(0o644)
    return tmp_path


# ------------------------------------------------------------------ strict modes


def test_safe_paths_pass_and_resolve(tree: Path) -> None:
    """tmp_path lies under /tmp (1777): the sticky rule lets it pass, as documented."""
    assert os.stat("/tmp").st_mode & 0o1777 == 0o1777
    assert trust.check(tree / "etc/keys", "keyring", Kind.FOLDER) == tree / "etc/keys"
    assert trust.check(tree / "etc/keys/a.pub", "key", Kind.FILE) == tree / "etc/keys/a.pub"
    assert trust.check(tree / "etc/keys/b.pub", "key", Kind.FILE) is None


@pytest.mark.parametrize("mode,who", [(0o664, "group"), (0o646, "others"),
                                      (0o666, "group and others")])
def test_a_writable_file_is_refused(tree: Path, mode: int, who: str) -> None:
    key = tree / "etc/keys/a.pub"
    key.chmod(mode)
    error = refused(key)
    assert f"{key} is writable by {who} (mode 0{mode:o})" in error.message
    assert error.hint == f"chmod go-w {key}"


def test_a_writable_folder_is_refused_for_itself_and_for_what_is_under_it(tree: Path) -> None:
    (tree / "etc").chmod(0o775)
    for path, kind in ((tree / "etc/keys", Kind.FOLDER), (tree / "etc/keys/a.pub", Kind.FILE),
                       (tree / "etc/keys/missing.pub", Kind.FILE)):
        error = refused(path, kind)
        assert error.hint == f"chmod go-w {tree / 'etc'}" and str(path) in error.message


def test_a_writable_folder_is_refused_even_when_what_it_should_hold_is_missing(tree: Path) -> None:
    (tree / "etc/keys").chmod(0o777)
    error = refused(tree / "etc/keys/revoked")
    assert "mode 0777" in error.message


def test_foreign_owners_are_refused(tree: Path) -> None:
    as_root()
    key = tree / "etc/keys/a.pub"
    os.chown(key, NOBODY, NOBODY)
    error = refused(key)
    assert f"{key} is owned by uid {NOBODY}" in error.message and error.hint == f"chown root {key}"
    os.chown(key, 0, 0)
    os.chown(tree / "etc", NOBODY, NOBODY)
    assert refused(key).hint == f"chown root {tree / 'etc'}"


def test_sticky_folders_pass_on_the_way_only_to_entries_of_root(tree: Path) -> None:
    etc = tree / "etc"
    etc.chmod(0o1777)
    assert trust.check(etc / "keys/a.pub", "key", Kind.FILE) == etc / "keys/a.pub"
    assert "does not exist yet" in refused(etc / "missing").message  # anyone could make it
    listed = refused(etc, Kind.FOLDER)  # a folder whose entries are trusted: never
    assert listed.message.endswith(f"{etc} is writable by group and others (mode 1777)")
    assert listed.hint == f"chmod go-w {etc}"
    as_root()
    os.chown(etc / "keys", NOBODY, NOBODY)
    error = refused(etc / "keys/a.pub")
    assert f"keys in it is owned by uid {NOBODY}" in error.message
    assert error.hint == f"chmod go-w {etc}"


def test_symlinks_are_judged_by_their_target_and_the_way_there(tree: Path) -> None:
    elsewhere = tree / "opt/real"
    elsewhere.mkdir(parents=True)
    (tree / "opt").chmod(0o755)
    elsewhere.chmod(0o755)
    (elsewhere / "k.pub").write_text("key\n")
    link = tree / "etc/keys/k.pub"
    link.symlink_to("../../opt/real/k.pub")
    assert trust.check(link, "key", Kind.FILE) == elsewhere / "k.pub"
    (elsewhere / "k.pub").chmod(0o666)
    assert refused(link).hint == f"chmod go-w {elsewhere / 'k.pub'}"
    (elsewhere / "k.pub").chmod(0o644)
    (tree / "opt").chmod(0o777)  # a folder on the way to the target
    assert refused(link).hint == f"chmod go-w {tree / 'opt'}"
    (tree / "opt").chmod(0o755)
    absolute = tree / "etc/abs"
    absolute.symlink_to(elsewhere)
    assert trust.check(absolute / "k.pub", "key", Kind.FILE) == elsewhere / "k.pub"


def test_bad_shapes_are_refused(tree: Path) -> None:
    (tree / "etc/loop").symlink_to("loop")
    assert "too many symlinks" in refused(tree / "etc/loop").message
    assert "is not a folder" in refused(tree / "etc/keys/a.pub/x").message
    assert "is not a folder" in refused(tree / "etc/keys/a.pub", Kind.FOLDER).message
    assert "is not a regular file" in refused(tree / "etc/keys", Kind.FILE).message
    os.mkfifo(tree / "etc/keys/fifo.pub", 0o644)
    assert "is not a regular file" in refused(tree / "etc/keys/fifo.pub").message


# ------------------------------------------------------------------ the keyring


@pytest.fixture
def keyring_dir(tmp_path: Path) -> Path:
    ring = tmp_path / "ring"
    ring.mkdir(mode=0o755)
    for name in ("old", "new"):
        keys.generate(tmp_path / name)
        (ring / f"{name}.pub").write_bytes((tmp_path / f"{name}.pub").read_bytes())
    return ring


def kid(ring: Path, name: str) -> str:
    return keys.key_id(keys.load_public(ring / f"{name}.pub"))


def test_keyring_checks_its_folder_keys_and_revocation_list(keyring_dir: Path) -> None:
    assert len(Keyring.from_dir(keyring_dir)) == 2
    for path in (keyring_dir, keyring_dir / "old.pub"):
        path.chmod(0o777 if path.is_dir() else 0o666)
        with pytest.raises(UnsafePath, match="chmod go-w|writable"):
            Keyring.from_dir(keyring_dir)
        path.chmod(0o755 if path.is_dir() else 0o644)
    revoked = keyring_dir / keys.REVOKED_NAME
    revoked.write_text(kid(keyring_dir, "old") + "\n")
    revoked.chmod(0o646)
    with pytest.raises(UnsafePath) as caught:
        Keyring.from_dir(keyring_dir)
    assert caught.value.hint == f"chmod go-w {revoked}"


def test_revocation_list_format(keyring_dir: Path) -> None:
    old, new = kid(keyring_dir, "old"), kid(keyring_dir, "new")
    revoked = keyring_dir / keys.REVOKED_NAME
    revoked.write_text(f"# stolen laptop\n\n{old}   # since 2024-05-01\n0123456789abcdef\n")
    ring = Keyring.from_dir(keyring_dir)
    assert ring.revoked == {old, "0123456789abcdef"}
    assert old not in ring and new in ring and ring.get(old) is None
    assert "revoked" in ring.describe()
    for bad in ("0123456789ABCDEF", f"{old} extra", "0123"):
        revoked.write_text(f"{new}\n{bad}\n")
        with pytest.raises(UsageError, match=r"line 2: .* is not a key id"):
            Keyring.from_dir(keyring_dir)


@pytest.fixture
def sign(tmp_path: Path) -> Callable[..., Path]:
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(os.urandom(8192))

    def make(*names: str, version: str = "2.0", floor: str | None = None) -> Path:
        out = tmp_path / f"{'-'.join(names)}-{version}-{floor}.tar"
        build(rootfs, version, "acme-box", [tmp_path / f"{n}.key" for n in names], out,
              compression="none", security_floor=floor, force=True)
        return out

    return make


def test_an_image_signed_only_by_revoked_keys_is_rejected(
        keyring_dir: Path, sign: Callable[..., Path]) -> None:
    old, new = kid(keyring_dir, "old"), kid(keyring_dir, "new")
    (keyring_dir / keys.REVOKED_NAME).write_text(old + "\n")
    ring = Keyring.from_dir(keyring_dir)
    with sign("old").open("rb") as stream, \
            pytest.raises(ImageRejected, match=f"signed only by revoked key.* {old}") as caught:
        reader.ImageReader(stream, ring)
    assert caught.value.exit_code == 3 and "revoked" in (caught.value.hint or "")
    with sign("old").open("rb") as stream:
        info = reader.inspect(stream, ring).to_json()
    assert info["signatures"] == [{"key_id": old, "trusted": False, "revoked": True}]
    # rotation: the same image signed by the old and the new key is still good
    with sign("old", "new").open("rb") as stream:
        verified = reader.verify(stream, ring)
    assert {s.key_id: (s.trusted, s.revoked) for s in verified.signatures} == {
        old: (False, True), new: (True, False)}
    # revoked plus a stranger: the message names both reasons
    (keyring_dir / "new.pub").unlink()
    with sign("old", "new").open("rb") as stream, \
            pytest.raises(ImageRejected, match=f"{new}, none in the keyring, and by revoked"):
        reader.ImageReader(stream, Keyring.from_dir(keyring_dir))


# ------------------------------------------------------------------ the manifest's floor


def test_manifest_security_floor(keyring_dir: Path, sign: Callable[..., Path]) -> None:
    ring = Keyring.from_dir(keyring_dir)
    with sign("new", floor="1.5").open("rb") as stream:
        info = reader.inspect(stream, ring)
    assert info.manifest.security_floor == "1.5" and info.to_json()["security_floor"] == "1.5"
    with sign("new").open("rb") as stream:
        plain = reader.inspect(stream, ring).manifest
    assert plain.security_floor is None and b"security_floor" not in plain.serialize()
    with pytest.raises(UsageError, match="security_floor 2.1 is above the image's own version"):
        sign("new", version="2.0", floor="2.1")
    doc = plain.to_json() | {"security_floor": ["1"]}
    with pytest.raises(ImageRejected, match="security_floor must be a string"):
        manifest.parse(manifest.canonical_json(doc))


# ------------------------------------------------------------------ registry files


def test_registry_credentials_and_ca_file_are_trust_deciding(tmp_path: Path) -> None:
    from abupgrade.config import RegistryConfig
    from abupgrade.oci.client import Registry, load_credentials
    from fixtures.registry import auth_file

    creds = auth_file(tmp_path / "auth.json", "registry.test", "ci", "s3cret")
    assert load_credentials(creds, "registry.test") is not None
    creds.chmod(0o620)
    with pytest.raises(UnsafePath, match="registry credentials .* writable by group") as caught:
        load_credentials(creds, "registry.test")
    assert caught.value.hint == f"chmod go-w {creds}"
    ca = tmp_path / "ca.pem"
    ca.write_text("not even a certificate\n")
    ca.chmod(0o666)
    with pytest.raises(UnsafePath, match="registry CA file"):
        Registry("registry.test", RegistryConfig(ca_file=ca))._tls()


# ------------------------------------------------------------------ folders of executables


def test_executables_are_listed_with_their_refusals(tmp_path: Path) -> None:
    folder = tmp_path / "required.d"
    assert list(trust.executables(folder, "health check")) == []  # missing: nothing to run
    folder.mkdir(mode=0o755)
    for name, mode in (("10-ok", 0o755), ("20-writable", 0o757), ("30-data", 0o644),
                       (".hidden", 0o755)):
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(mode)
    found = list(trust.executables(folder, "health check"))
    assert [(p.name, e is None) for p, e in found] == [("10-ok", True), ("20-writable", False)]
    refusal = found[1][1]
    assert refusal is not None and refusal.hint == f"chmod go-w {folder / '20-writable'}"
    assert refusal.message.startswith(f"refusing health check {folder / '20-writable'}: ")
    folder.chmod(0o777)
    found = list(trust.executables(folder, "health check"))
    assert len(found) == 1 and found[0][0] == folder and found[0][1] is not None
    assert "refusing health check folder" in found[0][1].message


# ------------------------------------------------------------------ configuration and CLI


def test_security_section_of_the_configuration(tmp_path: Path) -> None:
    from abupgrade import config

    base = {"compatible": "box", "bootloader": "grub",
            "slots": {"A": {"device": "/dev/a"}, "B": {"device": "/dev/b"}}}
    assert config.parse(base).security.min_version is None
    parsed = config.parse({**base, "security": {"min_version": "2.0-rc1"}})
    assert parsed.security.min_version == "2.0-rc1"
    path = tmp_path / "system.toml"
    path.write_text(config.render(parsed))
    assert config.load(path) == dataclasses.replace(parsed, source=path)
    for bad, says in (({"min_version": 2}, "must be a str"), ({"min_version": "../x"}, "must be a version"),
                      ({"floor": "1"}, "unknown key")):
        with pytest.raises(UsageError, match=says):
            config.parse({**base, "security": bad})
    path.chmod(0o666)
    with pytest.raises(UnsafePath, match="refusing configuration"):
        config.load(path)


def test_build_flag_and_inspect_text(tmp_path: Path, keyring_dir: Path) -> None:
    from fixtures.machine import run_cli

    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(os.urandom(4096))
    image = tmp_path / "image.tar"
    made = run_cli("image", "build", "--rootfs", str(rootfs), "--version", "2.1", "--compatible",
                   "box", "--key", str(tmp_path / "old.key"), "--key", str(tmp_path / "new.key"),
                   "-o", str(image), "--security-floor", "2.0")
    assert made.returncode == 0, made.stderr
    (keyring_dir / keys.REVOKED_NAME).write_text(kid(keyring_dir, "old") + "\n")
    shown = run_cli("image", "inspect", str(image), "--pubkey", str(keyring_dir / "new.pub"))
    assert "security floor: 2.0" in shown.stdout
    # --pubkey names the keys to trust; the keyring's revocation list is not consulted
    assert f"signature by key {kid(keyring_dir, 'new')}: trusted" in shown.stdout
    bad = run_cli("image", "build", "--rootfs", str(rootfs), "--version", "2.1", "--compatible",
                  "box", "--key", str(tmp_path / "old.key"), "-o", str(tmp_path / "x.tar"),
                  "--security-floor", "3")
    assert bad.returncode == 2 and "above the image's own version" in bad.stderr
