"""Orbax checkpoints of the whole train state plus the config as JSON.

Layout: WORKDIR/checkpoints/<epoch>/{state, config}; orbax finalises a step atomically, so a
step directory that exists and is listed is complete. The latest step is resumed.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, config_json: str) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config_json))))

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored.state, step

    def restore_config(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` carrying the given shardings (the restore target)."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state, shardings)
