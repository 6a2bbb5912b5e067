"""Orbax checkpoints of the whole train state plus the config as JSON.

Layout: WORKDIR/checkpoints/<epoch>/{state, config[, replay]} (``replay``: the host arrays of
the value's replayed epochs, ``value.replay_epochs`` > 1); orbax finalises a step atomically (it
writes ``<epoch>.orbax-checkpoint-tmp-*`` and renames it), so a step directory that exists and is
listed is complete, and an unfinished one is never listed. The latest step is resumed; one that
cannot be restored (another config, truncated, not a checkpoint) raises CheckpointError with one
line and is left as it is.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message is one line for the user."""


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "config", "replay"))
        except OSError as error:
            raise CheckpointError(f"{self.directory} cannot hold checkpoints "
                                  f"({error.strerror or error}); use another --workdir") from None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, config_json: str,
             replay: Optional[list[dict]] = None) -> None:
        """Saves the state and the config; ``replay`` (a list of dicts of numpy arrays) too
        when it is not empty."""
        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave(json.loads(config_json))}
        if replay:
            items["replay"] = ocp.args.StandardSave({str(i): d for i, d in enumerate(replay)})
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore_replay(self, step: int) -> list[dict]:
        """The ``replay`` list saved at ``step`` (empty when the step has none)."""
        if not (self.directory / str(step) / "replay").is_dir():
            return []
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                replay=ocp.args.StandardRestore()))
        except Exception as error:  # noqa: BLE001 - orbax raises many types; reported as one line
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: its value replay "
                                  f"cannot be restored ({reason[:300]}; it was left as it is)"
                                  ) from error
        saved = restored.replay
        return [{k: np.asarray(v) for k, v in saved[str(i)].items()} for i in range(len(saved))]

    def restore(self, abstract_state: Any, step: Optional[int] = None,
                config_json: Optional[str] = None) -> tuple[Any, int]:
        """The state saved at ``step`` (default: the latest), shaped like ``abstract_state``.

        Raises CheckpointError (one line) when it cannot be restored; with ``config_json`` (the
        current config) the message names the fields in which the checkpoint's config differs.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except Exception as error:  # noqa: BLE001 - orbax raises many types; reported as one line
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            hint = ("" if config_json is None else "; resume it with the config it was written "
                    "with, or use another --workdir")
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({reason[:300]})"
                f"{self._config_difference(step, config_json)}{hint} (it was left as it is)"
            ) from error
        return restored.state, step

    def _config_difference(self, step: int, config_json: Optional[str]) -> str:
        """The message's "; it was written with a.b = 1 (now 2), ..." (or why it cannot say)."""
        if config_json is None:
            return ""
        try:
            saved = _flatten(self.restore_config(step))
        except Exception:  # noqa: BLE001 - a checkpoint without a readable config
            return "; it holds no readable config (not a checkpoint of this program?)"
        current = _flatten(json.loads(config_json))
        absent = "(absent)"
        differences = [f"{key} = {saved.get(key, absent)!r} (now {current.get(key, absent)!r})"
                       for key in sorted(set(saved) | set(current))
                       if saved.get(key, absent) != current.get(key, absent)]
        if not differences:
            return "; its config equals this one (written by another version of vard_jax?)"
        more = f" and {len(differences) - 5} more" if len(differences) > 5 else ""
        return f"; it was written with {', '.join(differences[:5])}{more}"

    def restore_config(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` carrying the given shardings (the restore target)."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state, shardings)
