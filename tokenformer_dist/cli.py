"""What every command line of the project shares: a user's mistake is ONE line on stderr and exit 2.

argparse reports a bad flag with its whole usage block first (several lines); `ArgumentParser` here prints
only `error: <what is wrong>`, as every CLI prints its own checks (`--help` still shows the usage).
tests/test_cli_errors.py runs every entry point with bad inputs and holds them to it.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def user_error(message: object) -> int:
    """Print `error: <message>` (its first line: one line whatever the exception says) and return exit code 2."""
    text = str(message).strip().splitlines()
    print(f"error: {text[0] if text else type(message).__name__}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    """argparse `type=` for a count that must be >= 1 (a bad value is the parser's one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
