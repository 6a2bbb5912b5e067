"""Shared start-up of the entry points: one-line errors with exit status 2, JAX settings."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import flags


def fail(message: str, status: int = 2) -> NoReturn:
    """Prints one line to stderr and exits (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags_or_fail(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (unknown flag, bad override, bad config file) are one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    except (KeyError, AttributeError, TypeError, ValueError, FileNotFoundError, ImportError,
            SyntaxError) as error:
        text = str(error).strip().strip("'\"") or type(error).__name__
        fail(f"bad configuration: {text.splitlines()[0]}")


def flags_parser(argv: list[str]) -> list[str]:
    return parse_flags_or_fail(argv)


def run(main: Callable[[list[str]], None]) -> None:
    from absl import app

    app.run(main, flags_parser=flags_parser)
