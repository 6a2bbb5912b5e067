"""The run's journal: one JSON object a line in WORKDIR/metrics.jsonl, handed on to the loggers
(TensorBoard, Weights & Biases: ``vard_jax/training/loggers.py``).

metrics.jsonl is the run's journal. On resume from step S it is read back and rewritten
(``workdir.write_atomic``) with the rows of steps <= S (later rows belong to work that the
checkpoint does not contain), so the series has no duplicated or missing steps. Every valid row
is kept: a line that cannot be read (garbled, not UTF-8) is dropped with a warning naming its line
number, and the file as it was is first copied to ``metrics.jsonl.unreadable-N``; only a torn last
line (no newline: a process killed while writing) is dropped without a copy.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from absl import logging

from vard_jax.training.loggers import Logger
from vard_jax.training.workdir import open_append, write_atomic


def _clean(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, str)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Journal(NamedTuple):
    rows: list[dict]  # the valid rows, in file order
    unreadable: list[int]  # 1-based numbers of the lines that could not be read
    torn: bool  # the last line has no newline and could not be read


def read_journal(path: pathlib.Path) -> Journal:
    """The rows of a metrics.jsonl and what could not be read (an absent file has no rows)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        return Journal([], [], False)
    lines = data.split(b"\n")
    rows, unreadable, torn = [], [], False
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise ValueError("not a metrics row")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines):  # after the last newline: a torn write
                torn = True
            else:
                unreadable.append(number)
            continue
        rows.append(row)
    return Journal(rows, unreadable, torn)


def read_rows(path: pathlib.Path) -> list[dict]:
    """The valid rows of a metrics.jsonl (see ``read_journal``)."""
    return read_journal(path).rows


def _keep_a_copy(path: pathlib.Path) -> pathlib.Path:
    """Copies ``path`` to the first free ``<name>.unreadable-N``; returns the copy's path."""
    for n in range(1, 10_000):
        copy = path.with_name(f"{path.name}.unreadable-{n}")
        if not copy.exists() and not copy.is_symlink():
            shutil.copyfile(path, copy, follow_symlinks=False)
            return copy
    raise OSError(f"too many copies of {path}")


class MetricWriter:
    """Writes each row to metrics.jsonl, then to ``loggers`` (process 0: ``enabled``)."""

    def __init__(self, workdir: str | pathlib.Path, resume_step: Optional[int],
                 loggers: Sequence[Logger] = (), enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.wall_offset = 0.0
        rows = []
        if resume_step is not None:
            journal = read_journal(self.path)
            by_step = {row["step"]: row for row in journal.rows}  # a repeated step: the last
            repeated = len(journal.rows) - len(by_step)
            if (journal.unreadable or repeated) and enabled:
                copy = _keep_a_copy(self.path)
                shown = ", ".join(map(str, journal.unreadable[:10]))
                more = "..." if len(journal.unreadable) > 10 else ""
                logging.warning("%s: %d unreadable line(s) dropped%s, %d row(s) of a repeated "
                                "step dropped (the last row of a step is kept); the file as it "
                                "was is kept in %s", self.path, len(journal.unreadable),
                                f" (line {shown}{more})" if shown else "", repeated, copy)
            if journal.torn:
                logging.warning("%s: dropped a torn last line (a process ended while writing "
                                "it)", self.path)
            rows = [by_step[step] for step in sorted(by_step) if step <= resume_step]
            if rows:
                self.wall_offset = float(rows[-1].get("wall_s") or 0.0)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.loggers = list(loggers) if enabled else []

    def write(self, step: int, metrics: dict, images: Optional[Mapping[str, np.ndarray]] = None,
              histograms: Optional[Mapping[str, np.ndarray]] = None) -> dict:
        """Appends the row of ``step`` (its numbers; None for a non-finite one) and hands it,
        the ``images`` ({name: uint8 [H, W, 3]}) and ``histograms`` ({name: values}) to the
        loggers. Returns the row."""
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with open_append(self.path) as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        scalars = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float))}
        for logger in self.loggers:
            logger.scalars(int(step), scalars)
            if images:
                logger.images(int(step), images)
            if histograms:
                logger.histograms(int(step), histograms)
        return row

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
