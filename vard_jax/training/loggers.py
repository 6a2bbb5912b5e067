"""Where a run's metrics go besides WORKDIR/metrics.jsonl: TensorBoard, Weights & Biases.

metrics.jsonl is the source of truth (``metrics.MetricWriter`` writes it, rewrites it on resume
and hands each row to the loggers). A logger receives three kinds of data:

* ``scalars(step, row)``: every number of the row (the same keys as metrics.jsonl);
* ``images(step, images)``: ``{name: uint8 [H, W, 3]}``, the evaluation's sample grid;
* ``histograms(step, values)``: ``{name: 1-d array}``, e.g. the rewards of the epoch's samples.

Adding a destination is one subclass of ``Logger`` and a line in ``make``. Loggers run on
process 0 only (``MetricWriter(enabled=...)``).
"""

from __future__ import annotations

import pathlib
import secrets
from typing import Any, Mapping, Optional

import numpy as np

#: The W&B run id of a workdir: a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id"


class Logger:
    """A destination of metrics; each method may be left as a no-op."""

    def scalars(self, step: int, row: Mapping[str, float]) -> None:
        pass

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(Logger):
    """Event files under WORKDIR/tensorboard; a resumed run purges the events after its step."""

    def __init__(self, workdir: str | pathlib.Path, resume_step: Optional[int]):
        from tensorboardX import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=purge)

    def scalars(self, step: int, row: Mapping[str, float]) -> None:
        for key, value in row.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for name, image in images.items():
            self._writer.add_image(name, image, step, dataformats="HWC")
        self._writer.flush()

    def histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        for name, array in values.items():
            self._writer.add_histogram(name, np.asarray(array, np.float64), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger(Logger):
    """A Weights & Biases run (``pip install wandb``, the ``wandb`` extra).

    The run's id is kept in WORKDIR/wandb_run_id, so resuming the training run continues the
    same W&B run (``resume="allow"``). W&B cannot drop the rows a resumed run repeats (those
    after the checkpoint it resumes from): it keeps the first ones it received and ignores the
    repeated steps, while metrics.jsonl keeps the resumed run's. ``WANDB_MODE=offline`` (or
    ``logging.wandb_mode = "offline"``) writes the run under WORKDIR/wandb without a network;
    ``wandb sync`` uploads it later.
    """

    def __init__(self, workdir: str | pathlib.Path, config: Any):
        try:
            import wandb
        except ImportError:
            raise ValueError("config.logging.wandb = True needs the wandb package: pip install "
                             "'vard_jax[wandb]' (or set logging.wandb = False)") from None
        from vard_jax.training.workdir import write_atomic

        self._wandb = wandb
        workdir = pathlib.Path(workdir)
        id_file = workdir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B ids: 8 lowercase letters and digits
            write_atomic(id_file, run_id + "\n")
        settings = config.logging
        self._run = wandb.init(
            project=settings.wandb_project or None, entity=settings.wandb_entity or None,
            name=settings.wandb_name or workdir.resolve().name, id=run_id, resume="allow",
            dir=str(workdir), config=config.to_dict(), mode=settings.wandb_mode or None)

    def scalars(self, step: int, row: Mapping[str, float]) -> None:
        self._run.log(dict(row), step=step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        self._run.log({name: self._wandb.Image(image) for name, image in images.items()},
                      step=step)

    def histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        self._run.log({name: self._wandb.Histogram(np.asarray(array, np.float64))
                       for name, array in values.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


def make(config: Any, workdir: str | pathlib.Path, resume_step: Optional[int]) -> list[Logger]:
    """The loggers that ``config.logging`` asks for."""
    loggers: list[Logger] = []
    if config.logging.tensorboard:
        loggers.append(TensorBoardLogger(workdir, resume_step))
    if config.logging.wandb:
        loggers.append(WandbLogger(workdir, config))
    return loggers
