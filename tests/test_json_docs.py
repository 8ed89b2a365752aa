"""Every `--json` document the commands print, checked against the shapes docs/json.md gives."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from abupgrade import cli
from abupgrade.model import Slot
from fixtures.images import keypair
from fixtures.machine import file_machine, run_cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "json.md"
TOKEN = re.compile(r'\s*("[^"]*"|[A-Za-z_][A-Za-z0-9_]*|-?\d+|[\[\]{}|:,?])')


def parse_type(text: str) -> Any:
    """A shape's type as nested tuples: ("union", [...]), ("list", t), ("object", ({k: t},
    optional keys)), ("name", n), ("literal", value)."""
    tokens = [m[1] for m in TOKEN.finditer(text)]
    assert "".join(tokens) == re.sub(r"\s+", "", text), f"cannot read {text!r}"
    pos = 0

    def take(expected: str | None = None) -> str:
        nonlocal pos
        token = tokens[pos]
        assert expected is None or token == expected, (text, pos, token, expected)
        pos += 1
        return token

    def union() -> Any:
        options = [single()]
        while pos < len(tokens) and tokens[pos] == "|":
            take("|")
            options.append(single())
        return options[0] if len(options) == 1 else ("union", options)

    def single() -> Any:
        token = take()
        if token == "[":
            item = union()
            take("]")
            return ("list", item)
        if token == "{":
            keys: dict[str, Any] = {}
            optional: set[str] = set()
            while tokens[pos] != "}":
                key = json.loads(take())
                if tokens[pos] == "?":
                    take("?")
                    optional.add(key)
                take(":")
                keys[key] = union()
                if tokens[pos] == ",":
                    take(",")
            take("}")
            return ("object", (keys, frozenset(optional)))
        if token.startswith('"') or token.lstrip("-").isdigit() or token in ("true", "false"):
            return ("literal", json.loads(token))
        return ("name", token)

    found = union()
    assert pos == len(tokens), f"left over in {text!r}: {tokens[pos:]}"
    return found


def shapes() -> dict[str, Any]:
    text = DOC.read_text()
    found: dict[str, Any] = {}
    for block in re.findall(r"```shape\n(.*?)```", text, re.S):
        for line in block.strip().splitlines():
            name, _, definition = line.partition(" = ")
            assert name not in found, f"{name} is defined twice"
            found[name] = parse_type(definition)
    return found


SHAPES = shapes()
SIMPLE = {"str": str, "int": int, "bool": bool, "null": type(None)}


def conforms(value: Any, shape: Any, where: str = "$") -> list[str]:
    """What is wrong with `value` as an instance of `shape`; empty when it conforms."""
    kind, detail = shape
    if kind == "name":
        if detail == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return [] if ok else [f"{where}: {value!r} is not a number"]
        if detail in SIMPLE:
            ok = isinstance(value, SIMPLE[detail]) and (detail == "bool"
                                                        or not isinstance(value, bool))
            return [] if ok else [f"{where}: {value!r} is not {detail}"]
        return conforms(value, SHAPES[detail], where)
    if kind == "literal":
        return [] if value == detail and type(value) is type(detail) else \
            [f"{where}: {value!r} is not {detail!r}"]
    if kind == "union":
        errors = [conforms(value, option, where) for option in detail]
        return [] if any(not e for e in errors) else [f"{where}: {value!r} matches none of "
                                                      f"{len(detail)} choices: {errors}"]
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [e for i, item in enumerate(value) for e in conforms(item, detail, f"{where}[{i}]")]
    assert kind == "object"
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    keys, optional = detail
    problems = [f"{where}: undocumented key {k!r}" for k in value if k not in keys]
    problems += [f"{where}: missing key {k!r}" for k in keys if k not in value and k not in optional]
    for key, item in keys.items():
        if key in value:
            problems += conforms(value[key], item, f"{where}.{key}")
    return problems


def check(document: Any, shape: str) -> None:
    problems = conforms(document, ("name", shape))
    assert not problems, f"{shape}: " + "; ".join(problems)


def ok(*args: str) -> Any:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    for line in proc.stderr.splitlines():
        item = json.loads(line)
        assert not conforms(item, ("union", [("name", n) for n in ("Progress", "Warning", "Log")]))
    return json.loads(proc.stdout)


def failing(*args: str, code: int) -> Any:
    proc = run_cli(*args, "--json")
    assert proc.returncode == code, proc
    document = json.loads(proc.stdout)
    assert json.loads(proc.stderr.splitlines()[-1]) == document
    return document


# ---------------------------------------------------------------- the document itself


def test_the_shapes_parse_and_name_only_known_shapes() -> None:
    def names(shape: Any) -> set[str]:
        kind, detail = shape
        if kind == "name":
            return {detail}
        if kind in ("union",):
            return set().union(*(names(s) for s in detail))
        if kind == "list":
            return names(detail)
        if kind == "object":
            return set().union(*(names(s) for s in detail[0].values()))
        return set()

    known = set(SHAPES) | {"str", "int", "float", "bool", "null"}
    for name, shape in SHAPES.items():
        assert names(shape) <= known, (name, names(shape) - known)


def test_every_command_is_documented() -> None:
    text = DOC.read_text()
    for command in cli.REGISTRY.commands:
        assert f"`{command.name}`" in text or f"`{command.name} " in text, command.name


def test_a_wrong_document_is_caught() -> None:
    """The checker can fail: a renamed key, a wrong type, an extra key."""
    good = {"slot": "A", "version": None}
    check(good, "SlotVersion")
    assert conforms({"slot": "C", "version": None}, ("name", "SlotVersion"))
    assert conforms({"slot": "A", "vers": None}, ("name", "SlotVersion"))
    assert conforms({"slot": "A", "version": 1}, ("name", "SlotVersion"))
    assert conforms({**good, "extra": 1}, ("name", "SlotVersion"))


# ---------------------------------------------------------------- the commands


def test_machine_documents(tmp_path: Path) -> None:
    config = str(file_machine(tmp_path / "m"))
    check(ok("--config", config, "status"), "Status")
    hook = ok("--config", config, "boot-hook")
    check(hook, "HookCommittedBoot")
    check(ok("--config", config, "boot-hook"), "HookRun")  # second run in the same boot
    check(ok("--config", config, "mark-good"), "SlotVersion")
    check(ok("--config", config, "mark-bad", "B"), "MarkedBad")
    history = ok("--config", config, "history")
    check(history, "History")
    assert {e["event"] for e in history} >= {"committed", "marked-bad", "repaired"}
    # the built-in root-is-slot check fails here: the slots are no devices
    sick = failing("--config", config, "health", code=5)
    check(sick, "HealthError")
    assert "root-is-slot" in sick["error"]
    check(failing("--config", str(tmp_path / "none.toml"), "status", code=2), "Error")


def test_status_of_every_backend_and_firmware_is_documented() -> None:
    """The literals of `Status` are the backends and firmwares the program has."""
    from abupgrade.bootloader import BootloaderKind
    from abupgrade.bootloader.base import Firmware

    keys = SHAPES["Status"][1][0]
    assert {o[1] for o in keys["bootloader"][1]} == set(map(str, BootloaderKind))
    assert {o[1] for o in keys["firmware"][1]} == set(map(str, Firmware))


def test_uboot_status_document(tmp_path: Path) -> None:
    """`status` on a U-Boot machine (its environment as plain files) adds U-Boot's counters."""
    from abupgrade import ops
    from abupgrade.bootloader import BootloaderKind
    from abupgrade.system import Options
    from fixtures.filemachine import Bench

    bench = Bench(BootloaderKind.UBOOT, tmp_path, keypair(tmp_path), {})
    bench.template(tmp_path / "root")
    with bench.machine(tmp_path / "root", Slot.A):
        document = ops.status(Options()).to_json()
    check(document, "Status")
    assert document["uboot"]["bootcount"] == 0 and document["firmware"] == "bios", document
    assert conforms({**document, "uboot": {}}, ("name", "Status"))


def test_image_documents(tmp_path: Path) -> None:
    made = ok("keygen", str(tmp_path / "k"))
    check(made, "KeyPair")
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"root" * 100_000)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel" * 1000)
    image = tmp_path / "image.tar"
    check(ok("image", "build", "--rootfs", str(rootfs), "--kernel", str(kernel), "--version",
             "1.0", "--compatible", "box", "--key", made["private"], "-o", str(image),
             "--compress", "zstd"), "ImageInfo")
    check(ok("image", "verify", str(image), "--pubkey", made["public"]), "Verified")
    info = ok("image", "inspect", str(image))
    check(info, "ImageInfo")
    assert info["signatures"][0]["trusted"] is None
    stranger = keypair(tmp_path, "stranger")
    check(failing("image", "verify", str(image), "--pubkey", str(stranger.public), code=3),
          "Error")


def test_install_hook_document(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    check(ok("install-hook", "--root", str(tmp_path), "--init", "busybox"), "HookInstalled")


def test_registry_documents() -> None:
    """`image push` and `check` need a registry (tests/test_oci.py runs them against one):
    their result types, as the commands print them."""
    from abupgrade.oci.push import PushResult
    from abupgrade.results import CheckResult

    check(PushResult("oci://h/r@sha256:" + "0" * 64, "sha256:" + "0" * 64, "1.0", 2, 10, 1, 5)
          .to_json(), "Pushed")
    check(CheckResult("oci://h/r:stable", "2.0", None).to_json(), "Newer")


@pytest.mark.loop
def test_update_documents(tmp_path: Path) -> None:
    """disk init, apply (dry run and real), a trial boot committed by the hook, rollback."""
    from fixtures.images import rootfs_image, signed_image
    from fixtures.machine import running_machine
    from fixtures.tiers import needs

    needs(loop=True)
    key = keypair(tmp_path)
    images = {v: signed_image(tmp_path / f"{v}.tar", rootfs_image(tmp_path / f"{v}.ext4", tag=v),
                              key, version=v) for v in ("1.0", "2.0")}
    disk = tmp_path / "disk.img"
    check(ok("disk", "init", str(disk), "--bootloader", "grub", "--slot-size", "32M",
             "--image", str(images["1.0"]), "--pubkey", str(key.public)), "DiskMade")
    with running_machine(disk, tmp_path / "machine") as machine:
        config = ["--config", str(machine.config_path)]
        machine.add_check("required", "10-app", "echo fine")
        check(ok(*config, "health"), "Health")
        check(ok(*config, "apply", str(images["2.0"]), "--dry-run"), "DryRun")
        check(ok(*config, "apply", str(images["2.0"])), "Applied")
        machine.boot(Slot.B)
        check(ok(*config, "boot-hook", "--no-reboot"), "HookTrial")
        check(ok(*config, "rollback"), "SlotVersion")
