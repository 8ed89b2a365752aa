"""Two realistic releases of a root filesystem for the delta benchmark, built once and cached.

v1 is the Debian guest base tree of the tests (debootstrap minbase + python3 from this
machine's apt mirror, see fixtures.pyguest) as an ext4 image with 4 KiB blocks. v2 is the same
tree after a security update: the newer .deb of each package in PACKAGES that this machine's
apt offers (`apt-get download`), installed with dpkg. v2 comes twice:

- `rebuilt`: a new `mkfs.ext4 -d` of the updated tree, as an image pipeline makes every
  release. mkfs lays files out one after another, so every file after the first one that
  grew moves: few new bytes, but many blocks at new places;
- `in-place`: v1's image itself, mounted and updated, as a machine or a builder that keeps the
  previous filesystem would do: unchanged files keep their blocks.

Both mkfs runs use a fixed UUID, hash seed and time, so identical input gives identical bytes.
The cache lives beside the test guests' (/var/cache/abupgrade-tests), built in a temporary
folder and renamed into place.

    python bench/releases.py [--packages libssl3,...]   # prints the cache folder
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures import pyguest  # noqa: E402
from fixtures.images import (  # noqa: E402
    RELEASE_HASH_SEED,
    RELEASE_TIME,
    RELEASE_UUID,
    release_image,
)

PACKAGES = ("libssl3",)  # a security update that changes one shared library
SIZE = 512 << 20


@dataclass(frozen=True)
class Releases:
    folder: Path
    v1: Path
    rebuilt: Path
    in_place: Path
    packages: dict[str, str]  # package -> version installed in v2


def _run(argv: Sequence[str | Path], *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False,
                          cwd=cwd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed: {(proc.stderr or proc.stdout)[-800:]}")
    return str(proc.stdout)


def mkfs(image: Path, tree: Path) -> None:
    """A reproducible ext4 of `tree`: same tree, same bytes."""
    release_image(image, tree, SIZE)


def download(packages: Sequence[str], into: Path, base: Path) -> dict[str, Path]:
    """The candidate .deb of each package, which must be newer than the base tree's."""
    into.mkdir(parents=True, exist_ok=True)
    installed = _installed(base)
    _run(["apt-get", "download", *packages], cwd=into)
    debs: dict[str, Path] = {}
    for deb in into.glob("*.deb"):
        name = _run(["dpkg-deb", "-f", deb, "Package"]).strip()
        version = _run(["dpkg-deb", "-f", deb, "Version"]).strip()
        if installed.get(name) == version:
            raise SystemExit(f"apt offers no newer {name} than the base tree's {version}")
        debs[name] = deb
    return debs


def _installed(root: Path) -> dict[str, str]:
    versions: dict[str, str] = {}
    package = ""
    for line in (root / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            package = line.split(": ", 1)[1]
        elif line.startswith("Version: "):
            versions[package] = line.split(": ", 1)[1]
    return versions


def install(root: Path, debs: Sequence[Path]) -> None:
    """dpkg -i the packages inside `root` (maintainer scripts run in a chroot)."""
    inbox = root / "tmp/abupgrade-debs"
    inbox.mkdir(parents=True)
    for deb in debs:
        shutil.copy2(deb, inbox / deb.name)
    try:
        _run(["chroot", root, "dpkg", "-i", *(f"/tmp/abupgrade-debs/{d.name}" for d in debs)],
             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    finally:
        shutil.rmtree(inbox)


@contextlib.contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    """`image` on a loop device of its own, mounted at `where`; both undone at the end."""
    device = _run(["losetup", "-f", "--show", image]).strip()
    try:
        where.mkdir(parents=True, exist_ok=True)
        _run(["mount", device, where])
        try:
            yield where
        finally:
            _run(["umount", where])
    finally:
        _run(["losetup", "-d", device])


def key(packages: Sequence[str]) -> str:
    recipe = {"base": pyguest.recipe(), "packages": sorted(packages), "size": SIZE,
              "uuid": RELEASE_UUID, "seed": RELEASE_HASH_SEED, "time": RELEASE_TIME, "format": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def releases(packages: Sequence[str] = PACKAGES) -> Releases:
    """The cached releases, built on first use (a minute or two after the base tree)."""
    base = pyguest.base_root()
    entry = pyguest.cache_dir() / f"delta-releases-{key(packages)}"
    if not (entry / "complete").exists():
        with pyguest._locked(entry.with_suffix(".lock")):
            if not (entry / "complete").exists():
                _build(entry, base, packages)
    recipe = json.loads((entry / "recipe.json").read_text())
    return Releases(entry, entry / "v1.img", entry / "v2-rebuilt.img", entry / "v2-in-place.img",
                    recipe["installed"])


def _build(entry: Path, base: Path, packages: Sequence[str]) -> None:
    building = entry.parent / f".{entry.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(entry, ignore_errors=True)
    building.mkdir(parents=True)
    debs = download(packages, building / "debs", base)
    mkfs(building / "v1.img", base)
    tree = building / "tree"
    _run(["cp", "-a", base, tree])
    install(tree, list(debs.values()))
    mkfs(building / "v2-rebuilt.img", tree)
    installed = {name: _installed(tree)[name] for name in debs}
    shutil.rmtree(tree)
    shutil.copyfile(building / "v1.img", building / "v2-in-place.img")
    with mounted(building / "v2-in-place.img", building / "mnt") as root:
        install(root, list(debs.values()))
    (building / "mnt").rmdir()
    _run(["e2fsck", "-fn", building / "v2-in-place.img"])
    (building / "recipe.json").write_text(json.dumps(
        {"packages": list(packages), "installed": installed}, indent=2) + "\n")
    os.replace(building, entry)
    (entry / "complete").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--packages", default=",".join(PACKAGES))
    args = parser.parse_args()
    made = releases(tuple(filter(None, args.packages.split(","))))
    print(made.folder)


if __name__ == "__main__":
    main()
