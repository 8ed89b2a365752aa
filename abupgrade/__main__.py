"""Entry point: signals, the app, one place where errors become exit codes."""

from __future__ import annotations

import sys

from abupgrade import interrupt
from abupgrade.errors import AbupgradeError

GLOBAL_FLAGS = {"--json", "--quiet", "-q", "--debug"}
GLOBAL_OPTIONS = {"--config", "--disk"}


def hoist_global_options(argv: list[str]) -> list[str]:
    """Let global options stand anywhere (`abupgrade status --json`), as users type them."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.split("=", 1)[0]
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        elif name in GLOBAL_OPTIONS and "=" in arg:
            front.append(arg)
        elif arg in GLOBAL_OPTIONS and i + 1 < len(argv):
            front += [arg, argv[i + 1]]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    from abupgrade import cli

    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    interrupt.install()
    try:
        cli.app(args=args, prog_name="abupgrade")
    except AbupgradeError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        cli.print_error(exc)
        return exc.exit_code
    except SystemExit as exc:  # typer's own exit: usage errors are 2, --help is 0
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except Exception as exc:  # a bug: say so in one line, the traceback with --debug
        if debug:
            raise
        cli.print_error(AbupgradeError(f"internal error: {type(exc).__name__}: {exc}",
                                       hint="run again with --debug and report the traceback"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
