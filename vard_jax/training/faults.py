"""What keeps a run recoverable: skipped non-finite updates, and stopping cleanly on SIGTERM.

* ``keep_finite`` (inside the jitted update steps): when the loss or the gradient norm of an
  update is not finite, the new state is discarded and the old one kept, except for the counters
  ``nonfinite_skips`` and ``nonfinite_streak``; no host synchronisation is needed.
* ``aggregate`` (host): an epoch's per-update metrics as means over the updates that were applied,
  plus how many had a non-finite loss or (finite loss but) non-finite gradient.
* ``check_streak`` (host, once per stage): raises ``NonFiniteError`` when one kind of update was
  skipped ``train.max_nonfinite_in_a_row`` times in a row; the loop then stops without saving.
* ``Preemption``: while active, SIGTERM or SIGINT only sets a flag that the loop reads between
  epochs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("value", "policy")  # index into TrainState.nonfinite_streak
_FLAGS = ("_nonfinite_loss", "_nonfinite_grad")


class NonFiniteError(RuntimeError):
    """Training cannot go on: updates kept failing, or the sampled images are not finite."""


def keep_finite(old: Any, new: Any, kind: str, loss: jax.Array,
                grad_norm: jax.Array) -> tuple[Any, dict]:
    """``new`` if ``loss`` and ``grad_norm`` are finite, else ``old`` with the skip counted.

    Returns (state, flags): ``{kind}_nonfinite_loss`` and ``{kind}_nonfinite_grad`` are 1.0
    for a skipped update (by the first quantity that was not finite), else 0.0.
    """
    loss_ok = jnp.isfinite(loss)
    grad_ok = jnp.isfinite(grad_norm)
    ok = loss_ok & grad_ok
    index = KINDS.index(kind)
    kept = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
    streak = old.nonfinite_streak.at[index].set(jnp.where(ok, 0, old.nonfinite_streak[index] + 1))
    kept = kept.replace(nonfinite_skips=old.nonfinite_skips + jnp.where(ok, 0, 1),
                        nonfinite_streak=streak)
    flags = {f"{kind}_nonfinite_loss": jnp.where(loss_ok, 0.0, 1.0),
             f"{kind}_nonfinite_grad": jnp.where(loss_ok & ~grad_ok, 1.0, 0.0)}
    return kept, flags


def aggregate(per_update: Sequence[dict]) -> dict:
    """Means over the applied updates (NaN when none was), and the counts of skipped ones."""
    per_update = jax.device_get(list(per_update))
    flags = [k for k in per_update[0] if k.endswith(_FLAGS)]
    applied = [m for m in per_update if not any(m[k] for k in flags)]
    summary = {k: float(np.mean([m[k] for m in applied])) if applied else float("nan")
               for k in per_update[0] if k not in flags}
    summary.update({k: int(sum(m[k] for m in per_update)) for k in flags})
    return summary


def check_streak(state: Any, limit: int, step: int, metrics: dict,
                 last_checkpoint: Any) -> None:
    """Raises NonFiniteError (one line) when an update kind was skipped ``limit`` times in a row."""
    streak = np.asarray(jax.device_get(state.nonfinite_streak))
    for index, kind in enumerate(KINDS):
        if streak[index] >= limit:
            quantity = "loss" if metrics.get(f"{kind}_nonfinite_loss") else "gradient"
            raise NonFiniteError(
                f"step {step}: {int(streak[index])} {kind} updates in a row had a non-finite "
                f"{kind} {quantity} and were skipped (train.max_nonfinite_in_a_row = {limit}); "
                f"stopped without saving, {_kept(last_checkpoint)}; lower {kind}.learning_rate "
                "or check the reward's scale")


def check_images(images: np.ndarray, step: int, last_checkpoint: Any) -> None:
    """Raises NonFiniteError when sampled images hold NaN or inf (the policy has diverged)."""
    if not np.all(np.isfinite(images)):
        raise NonFiniteError(
            f"step {step}: the policy's sampled images are not finite (its parameters have "
            f"diverged); stopped without saving, {_kept(last_checkpoint)}; lower "
            "policy.learning_rate")


def _kept(last_checkpoint: Any) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint is step {last_checkpoint}"


def _write_stderr(line: str) -> None:
    """One line straight to file descriptor 2 (safe inside a signal handler)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


class Preemption:
    """Context manager: while active, SIGTERM and SIGINT (Ctrl-C) set ``requested`` instead of
    ending the process; the loop reads it between epochs, checkpoints and exits 0.

    A second signal ends the process at once: one line on stderr and exit status 128 + the
    signal's number (130 for SIGINT, 143 for SIGTERM), without running Python's clean-up (a save
    in progress is left unfinished, which is never read as a checkpoint). Signals can only be
    caught on the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            sys.stdout.flush()
            _write_stderr(f"error: second {name}: stopped at once, without saving this epoch; "
                          "run the same command to resume from the latest checkpoint")
            os._exit(128 + signum)
        self.requested = True
        self.signal_name = name
        _write_stderr(f"{name}: stopping after this epoch with a checkpoint (send it again to "
                      "stop at once)")

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def stop_now(self) -> bool:
        """Whether to stop; with several processes, true when any of them got SIGTERM."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
        return bool(np.any(flags))
