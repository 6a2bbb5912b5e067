"""The interface of an algorithm's epoch; the loop (``vard_jax.training.loop``) drives it."""

from __future__ import annotations

from typing import Callable

import jax

from vard_jax.training.state import TrainState


class Stage:
    """An algorithm's epoch; ``loop`` is the ``vard_jax.training.loop.Loop`` that drives it."""

    def __init__(self, loop):
        self.loop = loop

    def pretrain(self, state: TrainState) -> tuple[TrainState, dict]:
        """Work before the first epoch (none by default)."""
        return state, {}

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        raise NotImplementedError

    def host_state(self) -> dict:
        """Host-side state of the algorithm that a checkpoint carries (JSON-ready)."""
        return {}

    def load_host_state(self, state: dict) -> None:
        """Restores what ``host_state`` returned (an empty dict for a checkpoint without it)."""
        del state

    def replay(self) -> list[dict]:
        """Host arrays a checkpoint carries (its ``replay`` item): VARD's value datasets of the
        last epochs."""
        return []

    def load_replay(self, restore: Callable[[], list[dict]]) -> None:
        """Takes back what ``replay`` returned; ``restore()`` reads it from the checkpoint."""
        del restore


def split_key(state: TrainState) -> tuple[TrainState, jax.Array]:
    """(state with its key advanced, a fresh key): every draw of a run comes from the state's
    key, so a resumed run continues as an uninterrupted one would."""
    key, sub = jax.random.split(state.key)
    return state.replace(key=key), sub
