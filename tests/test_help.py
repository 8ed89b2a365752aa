"""Every --help as the user reads it: metavars that mean something, defaults shown, the global
options on every command, no markup eating text; usage errors one line, exit 2."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from abupgrade import __version__, cli
from fixtures.machine import run_cli

COMMANDS = [c.name for c in cli.REGISTRY.commands]
GROUPS = list(cli.REGISTRY.groups)
GLOBAL_FLAGS = [flags[-1] for flags, _ in cli.GLOBAL_OPTIONS]
# Defects seen before: rich markup eating "[default: ...]", typer's type names as metavars,
# lower-case placeholders, tables drawn with box characters.
DEFECTS = re.compile(r"<(bool|str|int|path|list\[[^>]*\])>|\{[a-z_]+\}|[╭╮╰╯│─]|\[required\]")


def help_text(*words: str) -> str:
    proc = run_cli(*words, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Every command's --help, the groups' and the top-level one, rendered by the real CLI."""
    return {name: help_text(*name.split()) for name in ["", *GROUPS, *COMMANDS]}


def options_of(text: str) -> list[tuple[str, str]]:
    """(option line, its help text) of every option in a --help: the line that names it and
    the lines that continue its description."""
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        if re.match(r"  -", line):
            head, _, rest = line.strip().partition("  ")
            found.append((head, rest.strip()))
        elif found and re.match(r" {8,}\S", line):
            head, rest = found[-1]
            found[-1] = (head, f"{rest} {line.strip()}")
        elif not line.startswith(" "):
            found.append(("", ""))  # a heading ends the option before it
    return [(head, rest) for head, rest in found if head]


def test_every_help_is_free_of_the_old_defects(helps: dict[str, str]) -> None:
    for name, text in helps.items():
        assert text.startswith(f"usage: abupgrade {name}".rstrip() + " "), (name, text[:80])
        assert not DEFECTS.search(text), (name, DEFECTS.search(text))
        assert max(len(line) for line in text.splitlines()) <= 120, name


def test_metavars_are_upper_case_words(helps: dict[str, str]) -> None:
    for name, text in helps.items():
        usage = text.split("\n\n", 1)[0].split(f"abupgrade {name}")[-1]
        for word in re.findall(r"\b[A-Za-z][A-Za-z_]*\b", re.sub(r"--?[a-z-]+", "", usage)):
            if word not in ("options", "ARGS"):
                assert word.isupper(), (name, word, usage)
        for head, _ in options_of(text):
            for part in head.split(", "):
                flag, _, metavar = part.partition(" ")
                assert flag.startswith("-"), (name, head)
                assert metavar == "" or re.fullmatch(r"[A-Z][A-Z0-9_]*", metavar), (name, head)


def test_every_command_shows_the_global_options(helps: dict[str, str]) -> None:
    for name, text in helps.items():
        assert "global options:" in text, name
        flags = {part.split()[0] for head, _ in options_of(text) for part in head.split(", ")}
        assert set(GLOBAL_FLAGS) <= flags, (name, set(GLOBAL_FLAGS) - flags)


def test_defaults_are_shown(helps: dict[str, str]) -> None:
    """Every option with a value that has a default says which; switches do not."""
    parser = cli.build_parser()
    for name in COMMANDS:
        sub: argparse.ArgumentParser = parser
        for word in name.split():
            choices = next(a for a in sub._actions if a.dest.endswith(" command")).choices
            assert isinstance(choices, dict)
            sub = choices[word]
        described = dict(options_of(helps[name]))
        for action in sub._actions:
            if (not action.option_strings or action.nargs == 0
                    or action.default in (None, [], argparse.SUPPRESS)):
                continue
            head = next(h for h in described if action.option_strings[-1] in h.split(", ")[-1])
            assert f"(default: {action.default}" in described[head], (name, head)


def test_the_top_level_help_lists_every_command_with_a_summary(helps: dict[str, str]) -> None:
    text = helps[""]
    for command in cli.REGISTRY.commands:
        line = next((x for x in text.splitlines() if x.strip().startswith(command.name + "  ")),
                    None)
        assert line is not None, command.name
        assert command.summary in line and len(line) <= 80, line
    assert "Run `abupgrade COMMAND --help`" in text


def test_help_through_h_and_version() -> None:
    assert run_cli("status", "-h").stdout == help_text("status")
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"abupgrade {__version__}\n"


@pytest.mark.parametrize("argv, says", [
    ([], "no command given"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["stauts"], "did you mean `abupgrade status`?"),
    (["image"], "image: which command? build, verify, inspect or push"),
    (["image", "verfy", "x.tar"], "did you mean `abupgrade image verify`?"),
    (["apply", "--bogus", "x.tar"], "apply: unknown option --bogus"),
    (["status", "extra"], "status: unexpected argument 'extra'"),
    (["history", "-n", "x"], "history: -n: 'x' is not a whole number"),
    (["history", "-n", "0"], "history: -n: '0' must be 1 or more"),
    (["apply"], "apply: the following arguments are required: IMAGE"),
    (["disk", "init", "d.img", "--bootloader", "lilo"], "--bootloader: invalid choice: 'lilo'"),
    (["apply", "--dry", "x.tar"], "unknown option --dry"),  # no abbreviations: stable scripts
])
def test_usage_errors_are_one_line_exit_2(argv: list[str], says: str) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("abupgrade: "), proc.stderr
    assert says in proc.stderr and "(hint: " in proc.stderr, proc.stderr


def test_usage_error_under_json_is_json_on_both_streams() -> None:
    proc = run_cli("history", "-n", "x", "--json")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)
    assert error == json.loads(proc.stderr)
    assert set(error) == {"error", "hint", "exit"} and error["exit"] == 2
    assert "is not a whole number" in error["error"]
