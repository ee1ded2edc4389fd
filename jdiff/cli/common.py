"""What both command lines share: one-line errors and an argparse parser that uses them."""

import argparse
import difflib
import sys
from typing import NoReturn, Optional, Sequence


def run_script(main) -> NoReturn:
    """The entry point of train.py / sample.py: runs `main()` as this process, with orbax's after-the-fact
    failed-read tracebacks dropped for the rest of the process (see `jdiff._logs.filter_failed_read_noise`)."""
    from jdiff._logs import filter_failed_read_noise

    filter_failed_read_noise()
    sys.exit(main())


def fail(prog: str, message: object, code: int) -> NoReturn:
    """Prints `prog: error: message` as one line on stderr and exits with `code`."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message, 2)


def both(flag: str) -> tuple[str, ...]:
    """A flag in hyphen and underscore spelling: --batch-size, --batch_size (one spelling if they agree)."""
    hyphen, under = "--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")
    return (hyphen,) if hyphen == under else (hyphen, under)


def unknown_flag(prog: str, token: str, known: Sequence[str], hint: Optional[str] = None) -> NoReturn:
    """Exits 2 with `unrecognized argument 'TOKEN' (did you mean --X?)`: X is `hint`, else the closest of
    `known`."""
    if token.startswith("--") and not hint:
        close = difflib.get_close_matches(token.split("=")[0], list(known), n=1)
        hint = close[0] if close else None
    hint = f" (did you mean {hint}?)" if hint else ""
    fail(prog, f"unrecognized argument {token!r}{hint}; see --help", 2)
