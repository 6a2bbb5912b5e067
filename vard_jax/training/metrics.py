"""Metric writers: one JSON object a line in WORKDIR/metrics.jsonl, and TensorBoard events.

On resume from step S, rows with step > S are dropped from metrics.jsonl (they belong to work
that the checkpoint does not contain), so the series has no duplicated or missing steps.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Optional


def _clean(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, str)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_rows(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a killed process: everything after it is dropped
    return rows


class MetricWriter:
    def __init__(self, workdir: str | pathlib.Path, resume_step: Optional[int],
                 tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.wall_offset = 0.0
        rows = read_rows(self.path)
        if resume_step is None:
            rows = []
        else:
            rows = [r for r in rows if r.get("step", -1) <= resume_step]
            if rows:
                self.wall_offset = float(rows[-1].get("wall_s") or 0.0)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(self.path)
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
