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
    except Exception as error:  # noqa: BLE001 - user input: reported as one line
        fail(_one_line(error))


def _one_line(error: BaseException) -> str:
    """The useful part of an error message as one line (escaped newlines included)."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("Attempted")]
    if not lines:
        return type(error).__name__
    if isinstance(error, KeyError) or "Did you mean" in text:  # override of a key not in config
        key = lines[0].strip("'\"")
        return f"unknown config key {key!r}" + (f"; {' '.join(lines[1:])}" if lines[1:] else "")
    errno_lines = [line for line in lines if line.startswith("[Errno")]
    if errno_lines:  # config_flags: a config file that cannot be read
        return errno_lines[-1]
    if any(line.startswith("Traceback") for line in lines):  # an error inside get_config()
        return f"{lines[0].split(':')[0]}: {lines[-1]}"
    return " ".join(lines)


def config_or_fail(holder):
    """The config of a ``config_flags`` holder; a file that failed to load gives one line."""
    try:
        config = holder.value
        config.keys()  # config_flags defers load errors to the first access
        return config
    except Exception as error:  # noqa: BLE001 - user input: reported as one line
        fail(f"cannot load --config: {_one_line(error)}")


def flags_parser(argv: list[str]) -> list[str]:
    rest = parse_flags_or_fail(argv)
    from absl import logging

    if not flags.FLAGS["verbosity"].present:  # orbax and jax log every save at INFO
        logging.set_verbosity(logging.WARNING)
    return rest


def run(main: Callable[[list[str]], None]) -> None:
    from absl import app

    app.run(main, flags_parser=flags_parser)
