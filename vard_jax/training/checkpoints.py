"""Orbax checkpoints of the whole train state plus the config as JSON.

Layout: WORKDIR/checkpoints/<epoch>/{state, config[, replay][, host]} (``replay``: the host
arrays of the value's replayed epochs, ``value.replay_epochs`` > 1; ``host``: an algorithm's
host-side state as JSON, e.g. DDPO's per-prompt reward buffers); orbax finalises a step atomically (it
writes ``<epoch>.orbax-checkpoint-tmp-*`` and renames it), so a step directory that exists and is
listed is complete, and an unfinished one is never listed. The latest step is resumed, with
the config it was written with: fields that change the experiment may differ only when named in
``allow_changes`` (``check_config``). A step that cannot be restored (another config, damaged,
not a checkpoint) raises CheckpointError with one line and is left as it is; a save that fails
(disk full) raises ``SaveError`` with one line.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from vard_jax.training.workdir import SaveError


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message is one line for the user."""


# Config fields that do not change what is trained or measured: a resumed run may change them
# freely (where and how often it saves and logs, the device layout, the divergence guard).
FREE_FIELDS = ("logging.", "checkpoint.", "mesh.", "train.eval_every",
               "train.max_nonfinite_in_a_row")


def _os_reason(error: BaseException) -> str:
    """The operating system's reason inside a storage error ("No space left on device"), or ""."""
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return ""


def _reason(error: BaseException) -> str:
    """An exception as a short line: its first line, without object reprs (<...>)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = re.sub(r"<[^<>]*>", "", text).split("<")[0]  # an object repr, or the start of one
    text = text.split("See full TensorStore details")[0]
    text = re.sub(r"\s+", " ", text).strip(" :;,.")
    return (text or type(error).__name__)[:200]


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "config", "replay",
                                                             "host"))
            self._pending: Optional[int] = None  # the step of the latest save
        except OSError as error:
            raise CheckpointError(f"{self.directory} cannot hold checkpoints "
                                  f"({error.strerror or error}); use another --workdir") from None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, config_json: str,
             replay: Optional[list[dict]] = None, host: Optional[dict] = None) -> None:
        """Saves the state and the config; ``replay`` (a list of dicts of numpy arrays) and
        ``host`` (a JSON-ready dict) too when they are not empty; returns once the step is
        complete. Raises SaveError (one line, naming the step, the cause and the last complete
        checkpoint) when it cannot be written."""
        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave(json.loads(config_json))}
        if replay:
            items["replay"] = ocp.args.StandardSave({str(i): d for i, d in enumerate(replay)})
        if host:
            items["host"] = ocp.args.JsonSave(host)
        self._pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items))
            # Complete before training goes on: a save that fails stops the run at this step
            # (saves are seconds against epochs of minutes, so little overlap is lost).
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many types
            raise self._save_error(error) from None

    def _save_error(self, error: BaseException) -> SaveError:
        complete = [s for s in self._complete_steps() if s != self._pending]
        kept = (f"the last complete checkpoint is step {max(complete)}" if complete
                else "no complete checkpoint was written")
        return SaveError(f"saving checkpoint {self._pending} to {self.directory} failed "
                         f"({_os_reason(error) or _reason(error)}); {kept}; free space (or fix "
                         "the disk) and run the same command to resume")

    def _complete_steps(self) -> list[int]:
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        except OSError:
            return []

    def check_config(self, step: int, config_json: str,
                     allow_changes: tuple[str, ...] = ()) -> list[str]:
        """The changes of experiment fields since checkpoint ``step``'s config, as
        ``"a.b = 1 -> 2"``; raises CheckpointError (naming them) unless each is in
        ``allow_changes`` (``"all"``: any). Fields of ``FREE_FIELDS`` may always change. A config
        that cannot be read is left to ``restore`` to report."""
        try:
            saved = self.restore_config(step)
        except Exception:  # noqa: BLE001 - reported by restore(), which also names the cause
            return []
        from vard_jax.config import with_defaults  # keys added since it was written

        before = _flatten(with_defaults(saved).to_dict())
        now = _flatten(json.loads(config_json))
        absent = "(absent)"
        changed = [key for key in sorted(set(before) | set(now))
                   if before.get(key, absent) != now.get(key, absent)
                   and not key.startswith(FREE_FIELDS)]
        refused = [key for key in changed if "all" not in allow_changes
                   and key not in allow_changes]
        if refused:
            listed = ", ".join(f"{k} = {before.get(k, absent)!r} (now {now.get(k, absent)!r})"
                               for k in refused[:5])
            more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} was written with {listed}{more}: "
                "resuming would mix two experiments in one run; use another --workdir, or "
                f"resume with the change on purpose: --allow_changes={','.join(refused)}")
        return [f"{k} = {before.get(k, absent)!r} -> {now.get(k, absent)!r}" for k in changed]

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

    def restore_host(self, step: int) -> dict:
        """The ``host`` dict saved at ``step`` (empty when the step has none)."""
        if not (self.directory / str(step) / "host").is_dir():
            return {}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                host=ocp.args.JsonRestore()))
        except Exception as error:  # noqa: BLE001 - orbax raises many types; reported as one line
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: its host state "
                                  f"cannot be restored ({_reason(error)}; it was left as it is)"
                                  ) from error
        return dict(restored.host)

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
            where = self.directory / str(step)
            difference = self._config_difference(step, config_json)
            if difference is None and self._shapes_match(step, abstract_state):
                previous = [s for s in self._complete_steps() if s < step]
                then = (f"move that directory away to resume from step {max(previous)}"
                        if previous else "move that directory away to start over")
                raise CheckpointError(
                    f"checkpoint {where} is incomplete or damaged: its config and array shapes "
                    f"match this run but its data cannot be read ({_reason(error)}); {then}, or "
                    "use another --workdir (it was left as it is)") from None
            hint = ("" if config_json is None else "; resume it with the config it was written "
                    "with, or use another --workdir")
            if difference is None:
                difference = ("" if config_json is None else "; its config equals this one "
                              "(written by another version of vard_jax?)")
            raise CheckpointError(
                f"checkpoint {where} cannot be restored ({_reason(error)}){difference}{hint} "
                "(it was left as it is)") from None
        return restored.state, step

    def _shapes_match(self, step: int, abstract_state: Any) -> bool:
        """Whether the saved state's tree, shapes and dtypes are those of ``abstract_state``."""
        def signature(leaves: list) -> list[tuple]:  # the leaves' shapes and dtypes, sorted
            return sorted((tuple(a.shape), str(np.dtype(a.dtype))) for a in leaves)

        try:
            metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
            saved = jax.tree_util.tree_leaves(getattr(metadata, "item_metadata", metadata))
            return signature(saved) == signature(jax.tree_util.tree_leaves(abstract_state))
        except Exception:  # noqa: BLE001 - unreadable metadata: not a match
            return False

    def _config_difference(self, step: int, config_json: Optional[str]) -> Optional[str]:
        """The message's "; it was written with a.b = 1 (now 2), ..." (or why it cannot say);
        None when the configs are equal (or there is no config to compare)."""
        if config_json is None:
            return None
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
            return None
        more = f" and {len(differences) - 5} more" if len(differences) > 5 else ""
        return f"; it was written with {', '.join(differences[:5])}{more}"

    def restore_field(self, field: str, step: Optional[int] = None) -> Any:
        """One field of the saved train state (e.g. ``policy_params``) as host numpy arrays,
        read alone (a LoRA export does not read the optimiser state or build a trainer)."""
        step = self.latest_step() if step is None else step
        where = self.directory / str(step) / "state"
        try:
            metadata = ocp.PyTreeCheckpointer().metadata(where)
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            if field not in tree:
                raise KeyError(f"no field {field!r} in the saved state")
            target = {field: jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[field])}
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                  target)
            restored = ocp.PyTreeCheckpointer().restore(where, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
        except Exception as error:  # noqa: BLE001 - orbax raises many types; reported as one line
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: its {field} cannot "
                                  f"be restored ({_reason(error)}; it was left as it is)"
                                  ) from error
        return restored[field]

    def restore_config(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config

    def wait(self) -> None:
        """Waits for a save in flight (``save`` already waits for its own)."""
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
