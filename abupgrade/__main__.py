"""Entry point: signals, the command line, one place where errors become exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _flag(args: Sequence[str], flag: str) -> bool:
    """Whether `flag` stands among the options (before a `--`), known before parsing."""
    words = args[: list(args).index("--")] if "--" in args else args
    return flag in words


def main(argv: list[str] | None = None) -> int:
    from abupgrade import cli, interrupt
    from abupgrade.errors import AbupgradeError

    args = list(sys.argv[1:] if argv is None else argv)
    debug, as_json = _flag(args, "--debug"), _flag(args, "--json")
    interrupt.install()
    try:
        cli.run(args)
    except AbupgradeError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        cli.print_error(exc, as_json=as_json)
        return exc.exit_code
    except SystemExit as exc:  # --help and --version end here, with 0
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BrokenPipeError:  # `abupgrade history | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second complaint
        return 0
    except Exception as exc:  # a bug: say so in one line, the traceback with --debug
        if debug:
            raise
        cli.print_error(AbupgradeError(f"internal error: {type(exc).__name__}: {exc}",
                                       hint="run again with --debug and report the traceback"),
                        as_json=as_json)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
