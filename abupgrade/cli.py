"""The typer commands: parse, call the logic, render. The only user of typer and rich."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichBar
from rich.table import Table

from abupgrade import ops
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.base import Arch, Firmware
from abupgrade.errors import AbupgradeError, UsageError
from abupgrade.model import Slot
from abupgrade.progress import NullProgress, Progress

app = typer.Typer(
    name="abupgrade",
    help="Atomic A/B OS upgrades with health-gated trial boots and automatic rollback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
image_app = typer.Typer(help="Make, check and inspect signed OS images.", no_args_is_help=True)
disk_app = typer.Typer(help="Lay out A/B disks.", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(disk_app, name="disk")

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


def print_error(exc: AbupgradeError) -> None:
    line = f"abupgrade: {exc.message}"
    if exc.hint:
        line += f" (hint: {exc.hint})"
    print(line.replace("\n", " "), file=sys.stderr, flush=True)


@dataclass
class Globals:
    config: Path | None = None
    json: bool = False
    quiet: bool = False
    debug: bool = False
    disk: Path | None = None

    def options(self) -> ops.Options:
        return ops.Options(config=self.config, disk=self.disk)


def _globals(ctx: typer.Context) -> Globals:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Globals) else Globals()


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Config file [default: $ABUPGRADE_CONFIG or /etc/abupgrade/system.toml]",
        show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Log details and show tracebacks.")] = False,
    disk: Annotated[Path | None, typer.Option(
        "--disk", help="Work on a disk image file or unmounted device instead of this system.",
        show_default=False)] = None,
) -> None:
    ctx.obj = Globals(config=config, json=json_output, quiet=quiet, debug=debug, disk=disk)
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="abupgrade: %(name)s: %(message)s")


# ------------------------------------------------------------------ output helpers


class Result(Protocol):
    def to_json(self) -> Any: ...


def emit(g: Globals, result: Result | Sequence[Result], text: str | None = None) -> None:
    """Print a result: its JSON on stdout with --json, else `text` unless quiet."""
    if g.json:
        data = [r.to_json() for r in result] if isinstance(result, Sequence) else result.to_json()
        print(json.dumps(data, indent=2, sort_keys=False))
    elif text is not None and not g.quiet:
        stdout.print(text)


class RichProgress:
    """A bar with bytes, rate and ETA on the terminal."""

    def __init__(self) -> None:
        self.bar = RichBar(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=stderr, transient=False,
        )
        self.task: Any = None

    def start(self, label: str, total: int) -> None:
        if self.task is None:
            self.bar.start()
        else:
            self.bar.stop_task(self.task)
        self.task = self.bar.add_task(label, total=total or None)

    def advance(self, done: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, done)

    def finish(self) -> None:
        if self.task is not None:
            self.bar.stop_task(self.task)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


class JsonProgress:
    """JSON lines on stderr, at most a few per second, for programs watching a run."""

    def __init__(self) -> None:
        self.label = ""
        self.total = 0
        self.done = 0
        self.last = 0.0

    def _line(self, final: bool = False) -> None:
        print(json.dumps({"progress": self.label, "done": self.done, "total": self.total,
                          "finished": final}), file=sys.stderr, flush=True)

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.last = label, total, 0, 0.0
        self._line()

    def advance(self, done: int) -> None:
        self.done += done
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            self._line()

    def finish(self) -> None:
        self._line(final=True)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def progress_for(g: Globals) -> Iterator[Progress]:
    """The progress sink for these options, closed when the command's work ends."""
    sink: RichProgress | JsonProgress | NullProgress
    if g.json:
        sink = JsonProgress()
    elif g.quiet or not sys.stderr.isatty():
        sink = NullProgress()
    else:
        sink = RichProgress()
    try:
        yield sink
    finally:
        if not isinstance(sink, NullProgress):
            sink.close()


# ------------------------------------------------------------------ keys and images


@app.command()
def keygen(ctx: typer.Context, prefix: Annotated[Path, typer.Argument(
        help="Writes PREFIX.key (private, mode 0600) and PREFIX.pub.")]) -> None:
    """Make an Ed25519 signing key pair; never overwrites."""
    g = _globals(ctx)
    made = ops.keygen(prefix)
    emit(g, made, f"wrote {made.private} (private) and {made.public} (public), "
         f"key id {made.key_id}")


@image_app.command("build")
def image_build(
    ctx: typer.Context,
    rootfs: Annotated[Path, typer.Option(help="Root filesystem image for the slot.")],
    version: Annotated[str, typer.Option(help="Image version, e.g. 1.4.2.")],
    compatible: Annotated[str, typer.Option(help="Machines this image is for.")],
    key: Annotated[list[Path], typer.Option(help="Private key; repeat to sign with several.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The image file to write.")],
    kernel: Annotated[Path | None, typer.Option(help="Kernel, installed on the boot partition.")] = None,
    initrd: Annotated[Path | None, typer.Option(help="Initrd, installed beside the kernel.")] = None,
    compress: Annotated[str, typer.Option(help="none, gzip, xz or zstd.")] = "none",
    index: Annotated[bool, typer.Option(
        "--index/--no-index", help="Add the chunk index delta updates use (with none or zstd); "
        "--no-index makes an image that abupgrade before delta updates reads.")] = True,
    security_floor: Annotated[str | None, typer.Option(
        help="Once committed, machines accept no image older than this version.")] = None,
) -> None:
    """Make a signed image from a root filesystem image (and optional kernel and initrd)."""
    g = _globals(ctx)
    with progress_for(g) as progress:
        info = ops.image_build(rootfs=rootfs, version=version, compatible=compatible,
                               signing_keys=key, output=output, kernel=kernel, initrd=initrd,
                               compression=compress, index=index, progress=progress,
                               security_floor=security_floor)
    emit(g, info, f"wrote {output}: version {version} for {compatible}, "
         f"{len(info.manifest.payloads)} payload(s), {len(info.signatures)} signature(s)")


@image_app.command("verify")
def image_verify(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Image path, - for stdin, an http(s) URL or oci://HOST/REPO:TAG.")],
    pubkey: Annotated[list[Path] | None, typer.Option(
        help="Trusted public key; repeat for several [default: the configured keyring].")] = None,
) -> None:
    """Check the signature and every payload hash; writes nothing."""
    g = _globals(ctx)
    with progress_for(g) as progress:
        verified = ops.image_verify(g.options(), image, pubkey or [], progress)
    signers = ", ".join(s.key_id for s in verified.signatures if s.trusted)
    emit(g, verified, f"OK: {image} version {verified.manifest.version} for "
         f"{verified.manifest.compatible}, signed by {signers}")


@image_app.command("inspect")
def image_inspect(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Image path, - for stdin, an http(s) URL or oci://HOST/REPO:TAG.")],
    pubkey: Annotated[list[Path] | None, typer.Option(help="Public key to check signatures with.")] = None,
) -> None:
    """Show the manifest and the signature status."""
    g = _globals(ctx)
    info = ops.image_inspect(g.options(), image, pubkey or [])
    manifest = info.manifest
    table = Table(title=f"{image}: version {manifest.version}, compatible {manifest.compatible}")
    for column in ("payload", "size", "compression", "sha256"):
        table.add_column(column)
    for p in manifest.payloads:
        table.add_row(p.name, f"{p.size:,}", str(p.compression), p.sha256)
    if g.json:
        emit(g, info)
    elif not g.quiet:
        stdout.print(table)
        if manifest.security_floor is not None:
            stdout.print(f"security floor: {manifest.security_floor} (once committed, nothing "
                         "older is accepted)")
        for sig in info.signatures:
            trust = {True: "trusted", False: "NOT trusted", None: "trust unknown (no keyring)"}
            said = "REVOKED (the keyring's revocation list names it)" if sig.revoked else \
                trust[sig.trusted]
            stdout.print(f"signature by key {sig.key_id}: {said}")


@image_app.command("push")
def image_push(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="The signed image file.")],
    target: Annotated[str, typer.Argument(help="oci://HOST[:PORT]/REPO:TAG")],
    pubkey: Annotated[list[Path] | None, typer.Option(
        help="Verify the image with this key before pushing; repeat for several.")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA certificate(s) of the registry, PEM.")] = None,
    auth_file: Annotated[Path | None, typer.Option(
        help="docker-style config.json with the registry's credentials.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow plain HTTP to this registry.")] = False,
) -> None:
    """Publish a signed image to an OCI registry; payloads already there are not uploaded again."""
    g = _globals(ctx)
    with progress_for(g) as progress:
        result = ops.image_push(image, target, pubkeys=pubkey or [], ca_file=ca_file,
                                auth_file=auth_file, insecure=insecure, progress=progress)
    emit(g, result, f"pushed {result.reference}")


@app.command()
def check(
    ctx: typer.Context,
    reference: Annotated[str, typer.Argument(help="oci://HOST[:PORT]/REPO:TAG")],
) -> None:
    """Exit 0 and print the version when the tag holds something newer than the committed
    version; exit 6 when it does not."""
    g = _globals(ctx)
    result = ops.check(g.options(), reference)
    emit(g, result, result.version)


# ------------------------------------------------------------------ the running system


@app.command()
def status(ctx: typer.Context) -> None:
    """Booted slot, each slot's state and version, what boots next, pending trial."""
    g = _globals(ctx)
    info = ops.status(g.options())
    if g.json:
        emit(g, info)
        return
    if g.quiet:
        return
    table = Table(title=f"abupgrade on {info.bootloader}, {info.firmware} firmware"
                  + (" with Secure Boot" if info.secure_boot else ""))
    for column in ("slot", "state", "version", "device", ""):
        table.add_column(column)
    for name, slot in info.slots.items():
        marks = []
        if name == info.booted:
            marks.append("booted")
        if name == info.next_boot:
            marks.append("boots next")
        if name == info.trial:
            marks.append(f"trial, {info.trial_boots_left} boot(s) left")
        table.add_row(str(name), str(slot.state), slot.version or "-", slot.device,
                      ", ".join(marks))
    stdout.print(table)
    for note in info.notes:
        stdout.print(note)
    if info.security_floor is not None:
        stdout.print(f"security floor: {info.security_floor} (no older image is accepted)")


@app.command()
def apply(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Image path, - for stdin, an http(s) URL or oci://HOST/REPO:TAG.")],
    reboot: Annotated[bool, typer.Option("--reboot", help="Reboot into the trial when done.")] = False,
    allow_downgrade: Annotated[bool, typer.Option(
        "--allow-downgrade", help="Accept a version lower than the committed one.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Verify everything, write nothing.")] = False,
) -> None:
    """Verify an image, write it to the inactive slot and arm a trial boot of it."""
    g = _globals(ctx)
    with progress_for(g) as progress:
        result = ops.apply(g.options(), image, allow_downgrade=allow_downgrade, dry_run=dry_run,
                           reboot=reboot, progress=progress)
    if dry_run:
        text = (f"dry run: {image} (version {result.version}) verified; it would go to "
                f"slot {result.slot}; nothing was written")
    else:
        text = (f"slot {result.slot} now holds version {result.version} "
                f"({result.written:,} bytes written, {result.seconds or 0:.1f} s); "
                f"the next boot tries it ({result.tries} boot(s) before falling back)")
        if result.traffic is not None:
            text += f"\n{result.traffic.summary()}"
    emit(g, result, text)


@app.command()
def rollback(
    ctx: typer.Context,
    reboot: Annotated[bool, typer.Option("--reboot", help="Reboot when done.")] = False,
) -> None:
    """Make the next boot go to the other slot, which must hold a good image."""
    g = _globals(ctx)
    result = ops.rollback(g.options(), reboot=reboot)
    emit(g, result, f"the next boot goes to slot {result.slot} (version {result.version})")


@app.command("mark-good")
def mark_good(ctx: typer.Context) -> None:
    """Commit the booted slot."""
    g = _globals(ctx)
    result = ops.mark_good(g.options())
    emit(g, result, f"slot {result.slot} committed (version {result.version})")


@app.command("mark-bad")
def mark_bad(
    ctx: typer.Context,
    slot: Annotated[str | None, typer.Argument(help="A or B [default: the booted slot].")] = None,
) -> None:
    """Declare a slot unusable; it is never booted again until a new image is applied."""
    g = _globals(ctx)
    result = ops.mark_bad(g.options(), Slot.parse(slot) if slot else None)
    emit(g, result, f"slot {result.slot} marked bad; the next boot goes to slot {result.next_boot}")


@app.command()
def history(
    ctx: typer.Context,
    n: Annotated[int | None, typer.Option("-n", help="Only the last N events.")] = None,
) -> None:
    """The persistent event log, newest last."""
    g = _globals(ctx)
    events = ops.history(g.options(), n)
    if g.json:
        emit(g, events)
        return
    if g.quiet:
        return
    table = Table()
    for column in ("time", "event", "slot", "version", "detail"):
        table.add_column(column)
    for e in events:
        table.add_row(e.time, str(e.event), str(e.slot or "-"), e.version or "-", e.detail)
    stdout.print(table)


@app.command("boot-hook")
def boot_hook(
    ctx: typer.Context,
    no_reboot: Annotated[bool, typer.Option(
        "--no-reboot", help="Do not reboot after a rollback (for tests).")] = False,
) -> None:
    """Run by init at every boot: trial -> health checks -> commit, or roll back and reboot."""
    g = _globals(ctx)
    result = ops.boot_hook(g.options(), reboot=not no_reboot)
    emit(g, result, f"abupgrade boot-hook: {result.summary}")


@app.command("install-hook")
def install_hook(
    ctx: typer.Context,
    init: Annotated[str | None, typer.Option(
        help="sysvinit, openrc, runit, busybox or systemd [default: detected].")] = None,
    root: Annotated[Path, typer.Option(help="The root filesystem to install into.")] = Path("/"),
    force: Annotated[bool, typer.Option("--force", help="Replace a different existing file.")] = False,
) -> None:
    """Make this system's init run `abupgrade boot-hook` once per boot."""
    g = _globals(ctx)
    result = ops.install_hook(init, root, force=force)
    emit(g, result, f"{result.init}: "
         + (", ".join(map(str, result.written)) or "already installed"))


@app.command()
def health(ctx: typer.Context) -> None:
    """Run the health checks now and report."""
    g = _globals(ctx)
    report = ops.health(g.options())
    if g.json:
        emit(g, report)
    elif not g.quiet:
        table = Table()
        for column in ("check", "kind", "result", "seconds", "output"):
            table.add_column(column)
        for c in report.results:
            table.add_row(c.name, str(c.kind), c.verdict, f"{c.seconds:.1f}", c.output)
        stdout.print(table)
    if not report.healthy:
        from abupgrade.errors import HealthFailed

        raise HealthFailed(report.summary())


@disk_app.command("init")
def disk_init(
    ctx: typer.Context,
    target: Annotated[Path, typer.Argument(help="Disk image file (created) or unmounted device.")],
    bootloader: Annotated[BootloaderKind, typer.Option(
        help=" or ".join(BootloaderKind) + ".")],
    firmware: Annotated[Firmware | None, typer.Option(
        help="The machine's firmware: " + " or ".join(Firmware)
             + " (default: the bootloader's own - bios for grub and syslinux, uefi for "
               "systemd-boot; uefi with --secure-boot).")] = None,
    secure_boot: Annotated[bool, typer.Option(
        "--secure-boot", help="UEFI Secure Boot: Debian's signed shim and GRUB on the ESP; "
                              "images must carry signed kernels.")] = False,
    size: Annotated[str | None, typer.Option(help="Size of a new image file, e.g. 2G.")] = None,
    slot_size: Annotated[str, typer.Option(help="Size of each root slot.")] = "512M",
    image: Annotated[str | None, typer.Option(help="Install this image in slot A and commit it.")] = None,
    pubkey: Annotated[list[Path] | None, typer.Option(help="Trusted key for the disk's keyring.")] = None,
    compatible: Annotated[str | None, typer.Option(
        help="The machine's compatible string [default: the --image's].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing partition table.")] = False,
    arch: Annotated[Arch | None, typer.Option(
        help="CPU the disk boots on (uboot): " + " or ".join(Arch) + " [default: amd64].")] = None,
) -> None:
    """Lay out an A/B disk: partitions, boot fs, bootloader, config and keyring."""
    g = _globals(ctx)
    platform = ops.platform_for(bootloader, firmware=firmware, arch=arch, secure_boot=secure_boot)
    with progress_for(g) as progress:
        result = ops.disk_init(target, bootloader, size=_size(size) if size else None,
                               slot_size=_size(slot_size), image=image, pubkeys=pubkey or [],
                               compatible=compatible, force=force, progress=progress,
                               platform=platform)
    text = f"{target}: A/B disk with {bootloader} for {platform}, slots of {result.slot_size:,} bytes"
    if result.version:
        text += f"; slot A holds version {result.version} (committed)"
    emit(g, result, text)


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise UsageError(f"not a size: {text!r}", hint="use bytes or a suffix: 512M, 2G") from None
    if value <= 0:
        raise UsageError(f"not a size: {text!r}")
    return int(value)
