"""The command line: parse, call the logic, render.

Commands are plain functions registered with `@command(...)`: their arguments are declared
next to them with `arg(...)` (argparse's own keywords), their body calls ops and renders the
typed result. Parsing is argparse, and parsers are made only for the commands named on the
line; at module level this imports nothing but the standard library and the registries its
choices come from (bootloader kinds, platforms). Each command imports what it uses, so
`boot-hook` and `status --json` start only a few times slower than Python itself.

Help reads like git's: `usage:` with the command's required options and arguments, its
options with metavars (IMAGE, FILE, SLOT) and defaults, then the global options, which every
command accepts anywhere on the line. Usage errors are one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol

from abupgrade import __version__
from abupgrade.bootloader import BootloaderKind
from abupgrade.bootloader.base import Arch, Firmware
from abupgrade.errors import AbupgradeError, UsageError

if TYPE_CHECKING:
    from abupgrade import ops
    from abupgrade.progress import Progress

PROG = "abupgrade"
SUMMARY = "Atomic A/B OS upgrades with health-gated trial boots and automatic rollback."
IMAGE_HELP = "image file, - for stdin, an http(s):// URL or oci://HOST/REPO:TAG"


# ------------------------------------------------------------------ global options


class Globals(NamedTuple):
    config: Path | None = None
    json: bool = False
    quiet: bool = False
    debug: bool = False
    disk: Path | None = None

    def options(self) -> ops.Options:
        from abupgrade.system import Options

        return Options(config=self.config, disk=self.disk)


# (flags, argparse keywords) of the options every command takes, anywhere on the line.
GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--config",), dict(metavar="FILE", type=Path, help=(
        "the configuration (default: $ABUPGRADE_CONFIG, else /etc/abupgrade/system.toml, "
        "else /boot/abupgrade/system.toml)"))),
    (("--json",), dict(action="store_true", help=(
        "machine-readable output on stdout; stderr carries only JSON lines"))),
    (("-q", "--quiet"), dict(action="store_true", help="print nothing but errors")),
    (("--debug",), dict(action="store_true", help="log what is done; tracebacks on errors")),
    (("--disk",), dict(metavar="TARGET", type=Path, help=(
        "work on a disk image file or unmounted device made by `disk init` instead of "
        "the running system"))),
)


def _add_globals(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The global options; on subcommands without defaults, so that a value given before
    the command is not reset by the subcommand's parser."""
    group = parser.add_argument_group("global options")
    for flags, keywords in GLOBAL_OPTIONS:
        keywords = dict(keywords)
        if not defaults:
            keywords["default"] = argparse.SUPPRESS
        group.add_argument(*flags, **keywords)


# ------------------------------------------------------------------ parsing


class HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        # The width as argparse finds it (COLUMNS, else the terminal, else 80), without its
        # `import shutil`: argparse makes a formatter for every add_argument.
        super().__init__(prog, max_help_position=32, width=terminal_columns() - 2)


def terminal_columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(1).columns or 80
    except (ValueError, OSError):
        return 80


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors (one line, exit 2, a hint)."""

    def __init__(self, *, formatter_class: Any = None, **keywords: Any) -> None:
        super().__init__(formatter_class=formatter_class or HelpFormatter, allow_abbrev=False,
                         add_help=False, **keywords)
        self._positionals.title = "arguments"
        self._optionals.title = "options"
        self.add_argument("-h", "--help", action="help", help="show this help and exit")

    def error(self, message: str) -> NoReturn:
        raise usage_error(message, self.prog)


def usage_error(message: str, prog: str) -> UsageError:
    """argparse's complaint about `prog`'s line as one line of ours."""
    where = prog.removeprefix(PROG).strip()
    command = f"{where}: " if where else ""
    choice = re.fullmatch(r"argument COMMAND: invalid choice: '([^']*)' .*", message)
    if choice:
        import difflib

        names = [c.name.removeprefix(where).split()[0] for c in REGISTRY.commands
                 if c.name.startswith(where)]
        close = difflib.get_close_matches(choice[1], names, n=1)
        return UsageError(f"{command}unknown command {choice[1]!r}",
                          hint=f"did you mean `{prog} {close[0]}`?" if close
                          else f"see `{prog} --help` for the commands")
    message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
    return UsageError(f"{command}{message}", hint=f"see `{prog} --help`")


def whole_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return number


class Arg(NamedTuple):
    flags: tuple[str, ...]
    keywords: dict[str, Any]


def arg(*flags: str, **keywords: Any) -> Arg:
    """An argument of a command, in argparse's terms; a flag without `metavar` or `action`
    is a switch (store_true)."""
    if flags[0].startswith("-") and "action" not in keywords and "metavar" not in keywords:
        keywords["action"] = "store_true"
    return Arg(flags, keywords)


Run = Callable[["Globals", argparse.Namespace], None]


class Command(NamedTuple):
    name: str  # "status", "image build"
    summary: str  # one line for the command list, without a full stop
    details: str  # more for its --help
    args: tuple[Arg, ...]
    run: Run
    section: str  # its heading in the command list
    usage: str | None  # the usage line's arguments, where the options alone do not say it

    @property
    def description(self) -> str:
        return f"{self.summary}." + (f" {self.details}" if self.details else "")


class Registry:
    """The commands in the order of the command list, and the groups (`image`, `disk`)."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.groups: dict[str, str] = {}  # "image" -> its summary
        self.section = "commands"  # the heading commands registered now go under


REGISTRY = Registry()


def section(heading: str) -> None:
    """The heading of the command list the commands registered next go under."""
    REGISTRY.section = heading


def group(name: str, summary: str) -> None:
    """A command with subcommands (`image`, `disk`)."""
    REGISTRY.groups[name] = summary


def command(name: str, summary: str, *args: Arg, details: str = "",
            usage: str | None = None) -> Callable[[Run], Run]:
    """Register a command: `summary` is its line in the command list, `details` follow it
    in its --help, `args` are its arguments; `usage` replaces the arguments of the usage line
    made from them."""
    def register(run: Run) -> Run:
        REGISTRY.commands.append(Command(name, summary, details, args, run, REGISTRY.section,
                                         usage))
        return run
    return register


def _usage(prog: str, args: Sequence[Arg]) -> str:
    """`prog --required X [options] ARG [OPT]`: required options first, as git lists them."""
    words = [prog]
    for a in args:
        if a.flags[0].startswith("-") and a.keywords.get("required"):
            words.append(f"{a.flags[-1]} {a.keywords['metavar']}")
    words.append("[options]")
    for a in args:
        if not a.flags[0].startswith("-"):
            metavar = a.keywords.get("metavar", a.flags[0].upper())
            words.append(f"[{metavar}]" if a.keywords.get("nargs") == "?" else metavar)
    return " ".join(words)


def _command_list() -> str:
    width = max(len(c.name) for c in REGISTRY.commands) + 2
    sections: dict[str, list[str]] = {}
    for c in REGISTRY.commands:
        sections.setdefault(c.section, []).append(f"  {c.name:<{width}}{c.summary}")
    return "\n\n".join(f"{heading}:\n" + "\n".join(lines) for heading, lines in sections.items())


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The parser of every command; with `argv`, of the commands whose words all appear in
    it (a command not named cannot be the one run, and each parser costs start time)."""
    top = Parser(prog=PROG, usage=f"{PROG} [options] COMMAND [ARGS]",
                 description=SUMMARY, formatter_class=RawTextHelpFormatter,
                 epilog=_command_list()
                 + f"\n\nRun `{PROG} COMMAND --help` for the options of a command.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                     help="print the version and exit")
    _add_globals(top, defaults=True)
    words = set(argv) if argv is not None else None
    children = {"": _subcommands(top)}
    for name, summary in REGISTRY.groups.items():
        if words is None or name in words:
            listing = "\n".join(f"  {c.name:<16}{c.summary}" for c in REGISTRY.commands
                                 if c.name.startswith(name + " "))
            sub = children[""].add_parser(
                name, prog=f"{PROG} {name}", usage=f"{PROG} {name} COMMAND [ARGS]",
                description=summary, epilog=f"commands:\n{listing}",
                formatter_class=RawTextHelpFormatter)
            _add_globals(sub, defaults=False)
            sub.set_defaults(group_parser=sub)
            children[name] = _subcommands(sub)
    for cmd in REGISTRY.commands:
        *path, leaf = cmd.name.split()
        if words is not None and not words.issuperset(cmd.name.split()):
            continue
        prog = f"{PROG} {cmd.name}"
        usage = f"{prog} {cmd.usage}" if cmd.usage else _usage(prog, cmd.args)
        sub = children[" ".join(path)].add_parser(leaf, prog=prog, description=cmd.description,
                                                  usage=usage)
        for a in cmd.args:
            sub.add_argument(*a.flags, **a.keywords)
        _add_globals(sub, defaults=False)
        sub.set_defaults(run=cmd.run, parser=sub)
    return top


def _subcommands(parent: Parser) -> argparse._SubParsersAction[Parser]:
    return parent.add_subparsers(dest=f"{parent.prog} command", metavar="COMMAND",
                                 parser_class=Parser, help=argparse.SUPPRESS)


class RawTextHelpFormatter(HelpFormatter):
    """Descriptions and epilogs as written (the command list is laid out already)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def parse(argv: Sequence[str]) -> tuple[Globals, argparse.Namespace]:
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(list(argv))
    owner: Parser = getattr(args, "parser", None) or getattr(args, "group_parser", None) or parser
    if extra:
        word = extra[0]
        what = f"unknown option {word}" if word.startswith("-") else f"unexpected argument {word!r}"
        raise usage_error(what, owner.prog)
    if getattr(args, "run", None) is None:
        group = owner.prog.removeprefix(PROG).strip()
        names = [c.name.split()[-1] for c in REGISTRY.commands if c.name.startswith(f"{group} ")]
        raise usage_error(f"which command? {', '.join(names[:-1])} or {names[-1]}" if group
                          else "no command given", owner.prog)
    g = Globals(config=args.config, json=args.json, quiet=args.quiet, debug=args.debug,
                disk=args.disk)
    return g, args


def run(argv: Sequence[str]) -> None:
    g, args = parse(argv)
    if g.debug:
        _log_to_stderr(g)
    args.run(g, args)


def _log_to_stderr(g: Globals) -> None:
    import logging

    class JsonLines(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps({"log": record.name, "level": record.levelname.lower(),
                               "message": record.getMessage()})

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if g.json else
                         logging.Formatter("abupgrade: %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG, handlers=[handler])


# ------------------------------------------------------------------ output


def print_error(exc: AbupgradeError, *, as_json: bool = False) -> None:
    """The one line a failure prints on stderr; with --json that line is JSON and stdout
    gets the same object, so a script needs one parser."""
    if as_json:
        line = json.dumps(exc.to_json())
        print(line, flush=True)
    else:
        line = f"abupgrade: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "")
    print(line.replace("\n", " "), file=sys.stderr, flush=True)


def warn(g: Globals, message: str) -> None:
    if g.json:
        print(json.dumps({"warning": message}), file=sys.stderr, flush=True)
    elif not g.quiet:
        print(f"abupgrade: warning: {message}", file=sys.stderr, flush=True)


class Result(Protocol):
    def to_json(self) -> Any: ...


def emit(g: Globals, result: Result | Sequence[Result], text: str | None = None) -> None:
    """Print a result: its JSON on stdout with --json, else `text` unless quiet."""
    if g.json:
        data = [r.to_json() for r in result] if isinstance(result, Sequence) else result.to_json()
        print(json.dumps(data, indent=2))
    elif text is not None and not g.quiet:
        print(text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain columns, every value in full (nothing is cut when piped or narrow)."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines)


class RichProgress:
    """A bar with bytes, rate and ETA on a terminal (rich is imported only here)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True, highlight=False), transient=False)
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
    """JSON lines on stderr, at most two a second, for programs watching a run."""

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


@contextmanager
def progress_for(g: Globals) -> Iterator[Progress]:
    """The progress sink for these options, closed when the command's work ends."""
    from abupgrade.progress import NullProgress

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


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise UsageError(f"not a size: {text!r}", hint="use bytes or a suffix: 512M, 2G") from None
    if value <= 0:
        raise UsageError(f"not a size: {text!r}", hint="a size is more than 0")
    return int(value)


# ------------------------------------------------------------------ the running system

section("on this machine")


@command("status", "Booted slot, each slot's state and version, what boots next")
def status(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    info = ops.status(g.options())
    if g.json or g.quiet:
        emit(g, info)
        return
    rows = []
    for name, slot in info.slots.items():
        marks = []
        if name == info.booted:
            marks.append("booted")
        if name == info.committed:
            marks.append("committed")
        if name == info.next_boot:
            marks.append("boots next")
        if name == info.trial:
            marks.append(f"trial, {info.trial_boots_left} boot(s) left")
        rows.append((str(name), str(slot.state), slot.version or "-", slot.device,
                     ", ".join(marks)))
    print(f"abupgrade on {info.bootloader}, {info.firmware} firmware"
          + (" with Secure Boot" if info.secure_boot else ""))
    print(table(("slot", "state", "version", "device", ""), rows))
    for note in info.notes:
        print(note)
    if info.security_floor is not None:
        print(f"security floor: {info.security_floor} (no older image is accepted)")


@command("apply", "Write an image to the other slot and arm a trial boot of it",
         arg("image", metavar="IMAGE", help=IMAGE_HELP),
         arg("--reboot", help="reboot into the trial when done"),
         arg("--allow-downgrade", help="accept a version lower than the committed one"),
         arg("--dry-run", help="verify everything and say where it would go; write nothing"),
         details="The image's signature is checked before anything is written, every byte "
                 "is hashed as it streams into the slot that is not running and read back "
                 "from the device; only then does the bootloader get a trial of the slot. "
                 "An image with a chunk index that can be read in parts (a file, https://, "
                 "oci://) is applied as a delta: blocks the slots already hold are reused "
                 "and only the rest is fetched and written. "
                 "The boot hook commits it once its health checks pass.")
def apply(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    with progress_for(g) as progress:
        result = ops.apply(g.options(), a.image, allow_downgrade=a.allow_downgrade,
                           dry_run=a.dry_run, reboot=a.reboot, progress=progress)
    if a.dry_run:
        text = (f"dry run: {a.image} (version {result.version}) verified; it would go to "
                f"slot {result.slot}; nothing was written")
    else:
        text = (f"slot {result.slot} now holds version {result.version} "
                f"({result.written:,} bytes written, {result.seconds or 0:.1f} s); "
                f"the next boot tries it ({result.tries} boot(s) before falling back)")
        if result.traffic is not None:
            text += f"\n{result.traffic.summary()}"
    emit(g, result, text)


def _version(version: str | None) -> str:
    return f"version {version}" if version else "version unknown"


@command("rollback", "Make the next boot go to the other, good slot",
         arg("--reboot", help="reboot when done"),
         details="The other slot must hold an image that booted healthy before.")
def rollback(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    result = ops.rollback(g.options(), reboot=a.reboot)
    emit(g, result, f"the next boot goes to slot {result.slot} ({_version(result.version)})")


@command("mark-good", "Commit the booted slot: it becomes the default")
def mark_good(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    result = ops.mark_good(g.options())
    emit(g, result, f"slot {result.slot} committed ({_version(result.version)})")


@command("mark-bad", "Declare a slot unusable until a new image is applied",
         arg("slot", metavar="SLOT", nargs="?", help="A or B (default: the booted slot)"),
         details="A pending trial of the slot is cancelled; the bootloader does not boot it "
                 "again.")
def mark_bad(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops
    from abupgrade.model import Slot

    result = ops.mark_bad(g.options(), Slot.parse(a.slot) if a.slot else None)
    emit(g, result, f"slot {result.slot} marked bad; the next boot goes to slot {result.next_boot}")


@command("history", "The persistent event log, newest last",
         arg("-n", metavar="N", dest="limit", type=whole_number, help="only the last N events"))
def history(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    events = ops.history(g.options(), a.limit)
    if g.json or g.quiet:
        emit(g, events)
        return
    print(table(("time", "event", "slot", "version", "detail"),
                [(e.time, str(e.event), str(e.slot or "-"), e.version or "-", e.detail)
                 for e in events]))


@command("health", "Run the health checks now and report",
         details="Exit 5 when a required check fails. Nothing changes.")
def health(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops
    from abupgrade.errors import HealthFailed

    report = ops.health(g.options())
    if not g.json and not g.quiet:
        print(table(("check", "kind", "result", "seconds", "output"),
                    [(c.name, str(c.kind), c.verdict, f"{c.seconds:.1f}",
                      " | ".join(c.output.strip().splitlines())) for c in report.results]))
    if not report.healthy:  # with --json the error document carries the report
        raise HealthFailed(report.summary(), report=report)
    emit(g, report)


@command("boot-hook", "Run by init at every boot: commit a healthy trial, or roll back",
         arg("--no-reboot", help="do not reboot after a rollback (for tests)"),
         details="On a trial boot it runs the health checks: all required ones pass, the "
                 "slot is committed; one fails, the slot is marked bad and the machine "
                 "reboots into the previous slot (exit 5). Other boots are compared with the "
                 "bootloader's state and what is safe is repaired.")
def boot_hook(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    result = ops.boot_hook(g.options(), reboot=not a.no_reboot)
    emit(g, result, f"abupgrade boot-hook: {result.summary}")


@command("install-hook", "Make init run `abupgrade boot-hook` once per boot",
         arg("--init", metavar="NAME", help="sysvinit, openrc, runit, busybox or systemd "
             "(default: detected)"),
         arg("--root", metavar="DIR", type=Path, default=Path("/"),
             help="the root filesystem to install into (default: %(default)s)"),
         arg("--force", help="replace a different file that is in the way"))
def install_hook(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    result = ops.install_hook(a.init, a.root, force=a.force)
    emit(g, result, f"{result.init}: "
         + (", ".join(map(str, result.written)) or "already installed, nothing changed"))


@command("check", "Exit 0 if REFERENCE holds a newer version, else 6",
         arg("reference", metavar="REFERENCE", help="oci://HOST[:PORT]/REPO:TAG"),
         details="Prints the newer version; compares with the committed one.")
def check(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    result = ops.check(g.options(), a.reference)
    emit(g, result, result.version)


@command("adopt", "Bring this GRUB machine with two root slots under abupgrade",
         arg("--compatible", metavar="NAME", help="this machine's compatible string: images "
             "must carry it (required)"),
         arg("--pubkey", metavar="FILE", type=Path, action="append", default=[],
             help="the images' signer's public key; repeat for several (required)"),
         arg("--version", metavar="VERSION",
             help="the running system's version (default: unknown; an image of any version "
                  "may follow)"),
         arg("--other", metavar="DEVICE", help="the other root partition "
             "(default: the one unmounted partition that fits); the next apply overwrites it"),
         arg("--state-dir", metavar="DIR", type=Path, help="where state and history go "
             "(default: /data/abupgrade where /data is a partition, else /boot/abupgrade/state)"),
         arg("--kernel", metavar="FILE", type=Path,
             help="the running kernel (default: /boot/vmlinuz-RELEASE)"),
         arg("--initrd", metavar="FILE", type=Path,
             help="its initrd (default: /boot/initrd.img-RELEASE, when there is one)"),
         arg("--cmdline", metavar="TEXT", help="the kernel command line both slots boot with "
             "(default: the running one's, without root= and BOOT_IMAGE=)"),
         arg("--tries", metavar="N", type=whole_number, default=3,
             help="boots a trial gets before GRUB falls back (default: %(default)s)"),
         arg("--init", metavar="NAME", help="the boot hook's init integration: sysvinit, "
             "openrc, runit, busybox or systemd (default: detected)"),
         arg("--no-hook", help="do not install the boot hook's init integration"),
         arg("--dry-run", help="check the machine and say what would be done; write nothing"),
         arg("--undo", help="take the machine out from under abupgrade again (on the slot "
             "that was adopted; the history stays)"),
         details="The checks come first: the running root and a second root partition on one "
                 "disk, /boot on a partition of its own, GRUB's grub.cfg sourcing custom.cfg. "
                 "Then the configuration, keyring, GRUB's environment blocks with the running "
                 "slot committed, abupgrade's boot-selection script and the running kernel go "
                 "to /boot/abupgrade, a hand-over block to /boot/grub/custom.cfg (which "
                 "update-grub keeps), and the boot hook into init.",
         usage="--compatible NAME --pubkey FILE [options]\n       abupgrade adopt --undo")
def adopt(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    if a.undo:
        undone = ops.adopt_undo(g.options())
        emit(g, undone, f"removed {len(undone.removed)} file(s); GRUB boots the machine as "
             "it did before adopt" + "".join(f"; kept {p}" for p in undone.kept))
        return
    for flag, value in (("--compatible", a.compatible), ("--pubkey", a.pubkey)):
        if not value:
            raise usage_error(f"{flag} is required", f"{PROG} adopt")
    result = ops.adopt(compatible=a.compatible, pubkeys=a.pubkey, version=a.version,
                       other=a.other, state_dir=a.state_dir, kernel=a.kernel, initrd=a.initrd,
                       cmdline=a.cmdline, tries=a.tries, init=a.init, hook=not a.no_hook,
                       dry_run=a.dry_run)
    other = result.booted.other
    text = (f"{'would bring' if result.dry_run else 'brought'} this machine under abupgrade: "
            f"slot {result.booted} ({result.slots[result.booted]}) is running and committed, "
            f"slot {other} ({result.slots[other]}) is empty until `abupgrade apply`; "
            f"configuration {result.config}, state {result.state_dir}")
    if result.hook is not None:
        text += f"; boot hook: {result.hook.init}"
    emit(g, result, text)


# ------------------------------------------------------------------ keys and images

section("images and keys")
group("image", "Make, check, inspect and publish signed OS images.")


@command("keygen", "Make an Ed25519 key pair: PREFIX.key and PREFIX.pub",
         arg("prefix", metavar="PREFIX", type=Path, help="path and name of the two files"),
         details="PREFIX.key is the private key (mode 0600), PREFIX.pub the public one. "
                 "Existing files are never overwritten.")
def keygen(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    made = ops.keygen(a.prefix)
    emit(g, made, f"wrote {made.private} (private) and {made.public} (public), "
         f"key id {made.key_id}")


@command("image build", "Make a signed image of a root filesystem",
         arg("--rootfs", metavar="FILE", type=Path, required=True,
             help="root filesystem image for the slot"),
         arg("--version", metavar="VERSION", required=True, help="image version, e.g. 1.4.2"),
         arg("--compatible", metavar="NAME", required=True,
             help="the machines this image is for (their `compatible`)"),
         arg("--key", metavar="FILE", type=Path, action="append", required=True,
             help="private key (PREFIX.key); repeat to sign with several"),
         arg("-o", "--output", metavar="FILE", type=Path, required=True,
             help="the image file to write"),
         arg("--kernel", metavar="FILE", type=Path, help="kernel, installed on the boot partition"),
         arg("--initrd", metavar="FILE", type=Path, help="initrd, installed beside the kernel"),
         arg("--compress", metavar="NAME", default="none",
             choices=("none", "gzip", "xz", "zstd"),
             help="compression of the rootfs payload: none, gzip, xz or zstd "
                  "(default: %(default)s)"),
         arg("--security-floor", metavar="VERSION", help="once an image of this one is "
             "committed, machines accept no image older than VERSION"),
         arg("--no-index", help="leave out the chunk index delta updates use (with none or "
             "zstd); with --sha256-only too, an image every abupgrade reads (format 1)"),
         arg("--sha256-only", help="give payloads a SHA-256 digest only, not also a BLAKE3 "
             "one (format 1 or 2, for machines whose abupgrade reads no format 3); apply "
             "hashes SHA-256 about three times slower"),
         arg("--force", help="replace an existing output file"),
         details="An existing output is never replaced without --force, and never when it "
                 "is one of the inputs.")
def image_build(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    with progress_for(g) as progress:
        info = ops.image_build(rootfs=a.rootfs, version=a.version, compatible=a.compatible,
                               signing_keys=a.key, output=a.output, kernel=a.kernel,
                               initrd=a.initrd, compression=a.compress, force=a.force,
                               progress=progress, warn=lambda text: warn(g, text),
                               index=not a.no_index, security_floor=a.security_floor,
                               blake3=not a.sha256_only)
    emit(g, info, f"wrote {a.output}: version {a.version} for {a.compatible}, "
         f"{len(info.manifest.payloads)} payload(s), {len(info.signatures)} signature(s)")


@command("image verify", "Check an image's signature and every payload hash",
         arg("image", metavar="IMAGE", help=IMAGE_HELP),
         arg("--pubkey", metavar="FILE", type=Path, action="append", default=[],
             help="trusted public key; repeat for several (default: the configured keyring)"),
         details="Writes nothing.")
def image_verify(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    with progress_for(g) as progress:
        verified = ops.image_verify(g.options(), a.image, a.pubkey, progress)
    signers = ", ".join(s.key_id for s in verified.signatures if s.trusted)
    emit(g, verified, f"OK: {a.image} version {verified.manifest.version} for "
         f"{verified.manifest.compatible}, signed by {signers}")


@command("image inspect", "Show an image's manifest and who signed it",
         arg("image", metavar="IMAGE", help=IMAGE_HELP),
         arg("--pubkey", metavar="FILE", type=Path, action="append", default=[],
             help="public key to check the signatures with; repeat for several"),
         details="Signatures are checked against --pubkey or, with --config or --disk, the "
                 "keyring; otherwise their trust is not checked.")
def image_inspect(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    info = ops.image_inspect(g.options(), a.image, a.pubkey)
    if g.json or g.quiet:
        emit(g, info)
        return
    manifest = info.manifest
    print(f"{a.image}: version {manifest.version}, compatible {manifest.compatible}")
    print(table(("payload", "size", "compression", "sha256"),
                [(p.name, f"{p.size:,}", str(p.compression), p.sha256)
                 for p in manifest.payloads]))
    if manifest.security_floor is not None:
        print(f"security floor: {manifest.security_floor} (once committed, nothing older is "
              "accepted)")
    trust = {True: "trusted", False: "NOT trusted", None: "not checked (no --pubkey or keyring)"}
    for sig in info.signatures:
        said = "REVOKED (the keyring's revocation list names it)" if sig.revoked else \
            trust[sig.trusted]
        print(f"signature by key {sig.key_id}: {said}")


@command("image push", "Publish a signed image to an OCI registry",
         arg("image", metavar="IMAGE", type=Path, help="the signed image file"),
         arg("target", metavar="REFERENCE", help="oci://HOST[:PORT]/REPO:TAG"),
         arg("--pubkey", metavar="FILE", type=Path, action="append", default=[],
             help="verify the image with this key before pushing; repeat for several"),
         arg("--ca-file", metavar="FILE", type=Path, help="CA certificate(s) of the registry, PEM"),
         arg("--auth-file", metavar="FILE", type=Path,
             help="docker-style config.json with the registry's credentials"),
         arg("--insecure", help="allow plain HTTP to this registry"),
         details="Payloads the registry holds already are not uploaded again.")
def image_push(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    with progress_for(g) as progress:
        result = ops.image_push(a.image, a.target, pubkeys=a.pubkey, ca_file=a.ca_file,
                                auth_file=a.auth_file, insecure=a.insecure, progress=progress)
    emit(g, result, f"pushed {result.reference}")


# ------------------------------------------------------------------ disks

section("disks")
group("disk", "Lay out A/B disks.")

# The platform a disk is made for, from the registries in bootloader/base.py: a new member
# of Firmware or Arch is a new choice here.
PLATFORM_ARGS = (
    arg("--firmware", metavar="NAME", choices=tuple(Firmware),
        help=f"the machine's firmware: {' or '.join(Firmware)} (default: the bootloader's "
             f"own: {Firmware.UEFI} for systemd-boot and with --secure-boot, else "
             f"{Firmware.BIOS})"),
    arg("--arch", metavar="NAME", choices=tuple(Arch),
        help=f"the CPU the disk boots on (uboot): {' or '.join(Arch)} "
             f"(default: {Arch.AMD64})"),
    arg("--secure-boot", help="UEFI Secure Boot: Debian's signed shim and GRUB on the ESP; "
                              "images must then carry signed kernels"),
)


@command("disk init", "Lay out an A/B disk: partitions, bootloader, config, keyring",
         arg("target", metavar="TARGET", type=Path,
             help="disk image file (created) or unmounted block device"),
         arg("--bootloader", metavar="NAME", required=True, choices=tuple(BootloaderKind),
             help=" or ".join(BootloaderKind)),
         *PLATFORM_ARGS,
         arg("--size", metavar="SIZE", help="size of a new image file, e.g. 2G "
             "(default: what the layout needs)"),
         arg("--slot-size", metavar="SIZE", default="512M",
             help="size of each root slot (default: %(default)s)"),
         arg("--image", metavar="IMAGE", help="install this image in slot A and commit it"),
         arg("--pubkey", metavar="FILE", type=Path, action="append", default=[],
             help="trusted public key for the disk's keyring; repeat for several"),
         arg("--compatible", metavar="NAME",
             help="the machine's compatible string (default: the --image's)"),
         arg("--force", help="replace an existing partition table and everything on the disk"),
         details="TARGET is an image file (created) or an unmounted device. The boot "
                 "filesystem (and on UEFI the EFI system partition) gets the bootloader and "
                 "its boot-selection script, the configuration (/boot/abupgrade/system.toml) "
                 "and the keyring; the data partition the state. With --image, slot A gets a "
                 "first image, committed.")
def disk_init(g: Globals, a: argparse.Namespace) -> None:
    from abupgrade import ops

    kind = BootloaderKind(a.bootloader)
    platform = ops.platform_for(kind, firmware=a.firmware and Firmware(a.firmware),
                                arch=a.arch and Arch(a.arch), secure_boot=a.secure_boot)
    with progress_for(g) as progress:
        result = ops.disk_init(a.target, kind, size=parse_size(a.size) if a.size else None,
                               slot_size=parse_size(a.slot_size), image=a.image,
                               pubkeys=a.pubkey, compatible=a.compatible, force=a.force,
                               progress=progress, platform=platform)
    text = f"{a.target}: A/B disk with {kind} for {platform}, slots of {result.slot_size:,} bytes"
    if result.version:
        text += f"; slot A holds version {result.version} (committed)"
    emit(g, result, text)

