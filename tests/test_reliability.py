"""The guarantees of docs/RELIABILITY.md: crash-safe training, bad inputs, numerical faults.

Real training processes (``python -m vard_jax.main``) are started once for the module by the
``runs`` fixture and driven by a background thread; the session's compilation cache
(tests/conftest.py) serves the later ones, and this process, the programs the first compiled:

* ``killed``: SIGKILLed at a random moment after its first checkpoint (step 3); then the same
  command resumes it in the same workdir and is sent SIGINT (Ctrl-C) after its first new epoch;
* two start-up failures (an unwritable workdir, a directory that is not a checkpoint).

The in-process tests use a copy of the killed run's workdir; they run while the resumed process
is still training. The uninterrupted reference run that the resumed one must equal is trained
in this process, with the session's compiled trainer. The config is ``tests/tiny_runs.py``'s, as ``tests/test_training.py``'s (the
same compiled programs), with more epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.tiny_runs import fidelity_config
from vard_jax import prompts as prompts_lib
from vard_jax.training import faults
from vard_jax.training.checkpoints import CheckpointError, Checkpointer
from vard_jax.training.loop import Loop
from vard_jax.training.metrics import read_rows
from vard_jax.training.state import TrainState
from vard_jax.training.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 6
EVERY = 3  # checkpoint interval: the SIGTERM checkpoint (step 4 or 5) is not a regular one
ARGS = ("--config=configs/shapes_fidelity.py:tiny", f"--config.train.epochs={EPOCHS}",
        "--config.train.eval_every=100", "--config.reward.eval_extra=",
        "--config.logging.tensorboard=False", f"--config.checkpoint.every={EVERY}",
        # tests/tiny_runs.py's config as flags: the conv value on x_t (faults and checkpoints
        # do not depend on the value network; its compiles are the smallest).
        "--config.value.arch=conv")
PLANTED_TMP = "99.orbax-checkpoint-tmp-1700000000"  # an unfinished save, as orbax names one
TIMEOUT_S = 900  # generous: a loaded 2-core machine compiles slowly


def tiny_config():
    """The config of ``ARGS``, built in this process: ``tests/tiny_runs.py``'s, whose compiled
    programs the session's trainer holds (the processes load them from the cache)."""
    config = fidelity_config()
    config.train.epochs = EPOCHS
    config.train.eval_every = 100
    config.logging.tensorboard = False
    config.checkpoint.every = EVERY
    return config


class Process:
    """``python -m vard_jax.main ARGS --workdir=WORKDIR``, its output in LOGS/NAME.out/.err."""

    def __init__(self, logs: pathlib.Path, name: str, workdir: pathlib.Path, env: dict,
                 *args: str):
        self.name, self.workdir = name, workdir
        self.stdout_path, self.stderr_path = logs / f"{name}.out", logs / f"{name}.err"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "vard_jax.main", *args, f"--workdir={workdir}"],
                cwd=REPO, env=env, stdout=out, stderr=err)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        return self.popen.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stderr_lines(self) -> list[str]:
        """stderr without absl/orbax log lines (I/W + date)."""
        return [line for line in self.stderr.splitlines()
                if line.strip() and not re.match(r"[IW]\d{4} ", line)]

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.time() + TIMEOUT_S
        while not condition():
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before "
                                     f"{what}:\n{self.stderr[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"{self.name}: no {what} after {TIMEOUT_S} s")
            time.sleep(0.05)


def step_dirs(checkpoints: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def tree_digest(directory: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def checkpoint_state(checkpoints: pathlib.Path, step: int) -> dict:
    """The saved train state as a flat {path: numpy array} (no trainer needed)."""
    manager = ocp.CheckpointManager(checkpoints, item_names=("state", "config"))
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
    manager.close()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


class Runs:
    """The module's training processes, driven by one background thread, and what it saw.

    Phase one: ``killed`` starts (with the two start-up failures) and gets SIGKILL at a random
    moment after its checkpoint 3. Phase two:
    the same command resumes it, and gets SIGINT shortly after it writes its first new epoch.
    """

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.env = dict(os.environ)  # with the compilation cache's variables (conftest.py)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                               self.env.get("PYTHONPATH")]))
        self.rng = random.Random()
        self.processes: list[Process] = []
        self.killed_event = threading.Event()
        self.sigint_sent = False
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._drive, daemon=True)

    def start(self, name: str, workdir: pathlib.Path, *args: str) -> Process:
        process = Process(self.root, name, workdir, self.env, *args)
        self.processes.append(process)
        return process

    def _drive(self) -> None:
        try:
            self._phase_one()
            self.killed_event.set()
            self._phase_two()
        except BaseException as error:  # noqa: BLE001 - re-raised by the waiting test
            self.error = error
            self.killed_event.set()

    def _phase_one(self) -> None:
        checkpoints = self.killed.workdir / "checkpoints"
        self.killed.wait_until(lambda: (checkpoints / str(EVERY)).is_dir(), "checkpoint 3")
        self.kill_delay = self.rng.uniform(0.0, 1.5)
        time.sleep(self.kill_delay)
        assert self.killed.popen.poll() is None, "the run ended before it could be killed"
        self.killed.popen.send_signal(signal.SIGKILL)
        self.killed.wait()
        # What the kill left, before anything reads it; then an unfinished save of a later step
        # (a copy of a complete one) and a torn last metrics line, which must both be ignored.
        self.steps_after_kill = step_dirs(checkpoints)
        self.rows_after_kill = read_rows(self.killed.workdir / "metrics.jsonl")
        shutil.copytree(checkpoints / str(max(self.steps_after_kill)), checkpoints / PLANTED_TMP)
        with (self.killed.workdir / "metrics.jsonl").open("a") as f:
            f.write('{"step": 5, "reward_me')
        shutil.copytree(self.killed.workdir, self.after_kill)

    def _phase_two(self) -> None:
        metrics = self.killed.workdir / "metrics.jsonl"
        stale_inode = metrics.stat().st_ino  # the resumed run rewrites the file, then appends
        self.resumed = self.start("resumed", self.killed.workdir, *ARGS)
        first_new = max(self.steps_after_kill) + 1

        def first_new_row() -> bool:
            try:
                return (metrics.stat().st_ino != stale_inode
                        and any(r["step"] == first_new for r in read_rows(metrics)))
            except FileNotFoundError:
                return False

        self.resumed.wait_until(first_new_row, f"row {first_new}")
        time.sleep(self.rng.uniform(0.0, 0.3))
        # Ctrl-C, handled as SIGTERM is (tests/test_workdir.py sends both to the handler).
        self.resumed.popen.send_signal(signal.SIGINT)
        self.sigint_sent = True

    def begin(self) -> None:
        self.unwritable_parent = self.root / "a_file"
        self.unwritable_parent.write_text("not a directory")
        self.unwritable = self.start("unwritable", self.unwritable_parent / "run", *ARGS)
        self.not_checkpoint = self.root / "not_checkpoint"
        (self.not_checkpoint / "checkpoints" / "7").mkdir(parents=True)
        (self.not_checkpoint / "checkpoints" / "7" / "notes.txt").write_text("my notes")
        self.not_checkpoint_before = tree_digest(self.not_checkpoint)
        self.refused = self.start("refused", self.not_checkpoint, *ARGS)
        self.killed = self.start("killed", self.root / "killed", *ARGS)
        self.after_kill = self.root / "after_kill"  # a copy, for the in-process tests
        self.thread.start()

    def wait_killed(self) -> None:
        self.killed_event.wait(TIMEOUT_S)
        if self.error is not None:
            raise self.error
        assert self.killed_event.is_set(), "the killed run never reached its checkpoint 3"

    def wait_resumed(self) -> int:
        self.thread.join(TIMEOUT_S)
        if self.error is not None:
            raise self.error
        return self.resumed.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = Runs(tmp_path_factory.mktemp("reliability"))
    try:
        runs.begin()
        yield runs
    finally:
        runs.stop_all()
        runs.thread.join(30)


@pytest.fixture(scope="module")
def trainer(runs, fidelity_trainer):
    runs.wait_killed()  # the processes have compiled by then (the two cores are free)
    return fidelity_trainer


def copy_of(source: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    return workdir


# --- start-up failures (these requests start all the module's processes) -------------------------
def test_startup_failures_are_one_line_and_touch_nothing(runs):
    assert runs.unwritable.wait() == 2, runs.unwritable.stderr
    lines = runs.unwritable.stderr_lines()
    assert lines == [f"error: workdir {runs.unwritable_parent / 'run'} is not writable "
                     "(Not a directory); choose another --workdir"], lines

    assert runs.refused.wait() == 2, runs.refused.stderr
    lines = runs.refused.stderr_lines()
    assert len(lines) == 1 and "Traceback" not in runs.refused.stderr, lines
    assert lines[0].startswith(f"error: checkpoint {runs.not_checkpoint.resolve()}/checkpoints/7 "
                               "cannot be restored ("), lines
    assert lines[0].endswith("it holds no readable config (not a checkpoint of this program?); "
                             "resume it with the config it was written with, or use another "
                             "--workdir (it was left as it is)"), lines
    assert tree_digest(runs.not_checkpoint) == runs.not_checkpoint_before


# --- no process needed (these run while the processes compile) -----------------------------------
def test_keep_finite_keeps_the_old_state_and_counts():
    @dataclasses.dataclass
    class Counters:
        nonfinite_skips: jax.Array
        nonfinite_streak: jax.Array

        def replace(self, **changes):
            return dataclasses.replace(self, **changes)

    jax.tree_util.register_dataclass(Counters, ["nonfinite_skips", "nonfinite_streak"], [])

    @jax.jit
    def step(old, new, loss, norm):
        return faults.keep_finite(old, new, "policy", loss, norm)

    old = Counters(jnp.array(4), jnp.array([0, 2]))
    new = Counters(jnp.array(100), jnp.array([7, 7]))
    kept, flags = step(old, new, jnp.nan, 1.0)
    assert int(kept.nonfinite_skips) == 5 and kept.nonfinite_streak.tolist() == [0, 3]
    assert float(flags["policy_nonfinite_loss"]) == 1 and float(flags["policy_nonfinite_grad"]) == 0
    kept, flags = step(old, new, 1.0, jnp.inf)
    assert int(kept.nonfinite_skips) == 5 and kept.nonfinite_streak.tolist() == [0, 3]
    assert float(flags["policy_nonfinite_loss"]) == 0 and float(flags["policy_nonfinite_grad"]) == 1
    kept, flags = step(old, new, 1.0, 2.0)  # applied: the new state, but counted from the old
    assert int(kept.nonfinite_skips) == 4 and kept.nonfinite_streak.tolist() == [0, 0]

    summary = faults.aggregate([{"policy_loss": 1.0, **flags},
                                {"policy_loss": np.nan, "policy_nonfinite_loss": 1.0,
                                 "policy_nonfinite_grad": 0.0},
                                {"policy_loss": 3.0, **flags}])
    assert summary == {"policy_loss": 2.0, "policy_nonfinite_loss": 1, "policy_nonfinite_grad": 0}


def test_nonfinite_images_stop_with_the_step():
    images = np.zeros((2, 4, 4, 3), np.float32)
    faults.check_images(images, 3, 2)
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(faults.NonFiniteError, match="step 3: the policy's sampled images are not "
                       "finite.*the last good checkpoint is step 2"):
        faults.check_images(images, 3, 2)


def test_over_long_prompts_are_reported(tmp_path, caplog):
    from vard_jax.models import shapes as shapes_model
    from vard_jax.worlds import tokenizer_files

    # The shapes model's tokenizer and length, without loading its weights.
    pipeline = types.SimpleNamespace(
        tokenizer=tokenizer_files.load_tokenizer(shapes_model.ASSET_DIR / "tokenizer"),
        max_length=tokenizer_files.MAX_LENGTH)
    for split in ("train", "heldout"):
        assert prompts_lib.warn_if_truncated(prompts_lib.load_prompts(split), pipeline, split) == 0
    path = write_long_prompts(tmp_path)
    with caplog.at_level("WARNING"):
        count = prompts_lib.warn_if_truncated(prompts_lib.load_prompts(str(path)), pipeline,
                                              str(path))
    assert count == 1
    assert long_prompt_warning(path, pipeline.max_length) in caplog.text


def write_long_prompts(directory: pathlib.Path) -> pathlib.Path:
    path = directory / "prompts.txt"
    path.write_text("a red circle\n" + "two blue squares on a white background " * 4 + "\n",
                    encoding="utf-8")
    return path


def long_prompt_warning(path: pathlib.Path, max_length: int) -> str:
    return (f"prompt set {path}: 1 of 2 prompts are longer than the tokenizer's {max_length} "
            "tokens and are truncated")


def test_only_safe_formats_are_loaded():
    """No pickle from users' paths, no remote code: checked over the package's source."""
    sources = {p: p.read_text() for p in (REPO / "vard_jax").rglob("*.py")}
    for path, text in sources.items():
        assert not re.search(r"^\s*(import|from)\s+(pickle|cloudpickle|dill|joblib)\b", text,
                             re.M), path
        assert "trust_remote_code" not in text, path
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    # The one reader of pickled weights, and only after require_torch (the ``pt`` extra).
    readers = [p.name for p, text in sources.items() if re.search(r"^\s*import torch\b", text,
                                                                  re.M)]
    assert readers == ["weights.py"], readers
    code = "".join(sources.values())
    assert not re.search(r"^\s*(import|from)\s+(transformers|diffusers)\b", code, re.M)


# --- the killed run ------------------------------------------------------------------------------
def test_sigkill_leaves_the_last_complete_checkpoint(runs):
    runs.wait_killed()
    assert runs.killed.popen.returncode == -signal.SIGKILL
    assert runs.steps_after_kill == [EVERY], (runs.steps_after_kill, runs.kill_delay)
    steps = [row["step"] for row in runs.rows_after_kill]
    assert steps[: EVERY + 1] == list(range(EVERY + 1)), steps  # rows may run ahead of it
    # An unfinished save is never listed, even a later one holding complete-looking files.
    checkpointer = Checkpointer(runs.after_kill / "checkpoints", keep=3)
    assert checkpointer.latest_step() == EVERY
    checkpointer.close()


# --- in this process, while the resumed run trains -----------------------------------------------
def _fields_that_differ(a: TrainState, b: TrainState) -> set[str]:
    differ = set()
    for field in dataclasses.fields(TrainState):
        x, y = jax.tree_util.tree_leaves(getattr(a, field.name)), jax.tree_util.tree_leaves(
            getattr(b, field.name))
        if any(not np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True)
               for u, v in zip(x, y)):
            differ.add(field.name)
    return differ


def test_loop_warns_about_over_long_prompts(trainer, tmp_path, caplog):
    config = tiny_config()
    config.sample.train_prompts = str(write_long_prompts(tmp_path))
    with caplog.at_level("WARNING"):
        Loop(config, tmp_path / "run", trainer=trainer)
    assert long_prompt_warning(tmp_path / "prompts.txt", trainer.pipeline.max_length) in caplog.text


def test_collect_scores_the_drawn_prompts_and_stops_on_nonfinite_images(trainer, tmp_path,
                                                                          monkeypatch):
    """Loop.collect: one reward per drawn prompt, the reward's own values; a policy whose
    images are not finite stops with the step before the reward sees them."""
    loop = Loop(trainer.config, tmp_path / "run", trainer=trainer)
    state = trainer.init_state()
    key = jax.random.PRNGKey(3)
    rollouts, rewards, prompts = loop.stage.collect(state, (5, 0), key, step=4)
    sample = trainer.config.sample
    assert prompts == [prompts_lib.draw(loop.train_prompts, sample.batch_size,
                                        trainer.config.train.seed, 5, 0, b)
                       for b in range(sample.batches_per_epoch)]
    assert rewards.shape == (sample.batch_size * sample.batches_per_epoch,)
    expected, _ = trainer.reward_evaluator(np.asarray(jax.device_get(rollouts[0].images)),
                                           prompts[0])
    np.testing.assert_allclose(rewards[:sample.batch_size], expected, rtol=1e-6)

    scored = []
    monkeypatch.setattr(trainer, "reward_evaluator",
                        lambda images, batch_prompts: scored.append(images) or (None, None))
    poisoned = state.replace(policy_params=jax.tree_util.tree_map(lambda x: x * jnp.nan,
                                                                  state.policy_params))
    with pytest.raises(faults.NonFiniteError, match="step 4: the policy's sampled images"):
        loop.stage.collect(poisoned, (5, 0), key, step=4)
    assert scored == []


def test_nonfinite_updates_are_skipped_and_counted(trainer):
    config = trainer.config
    prompts = ["a red circle on a white background"] * config.sample.batch_size
    state = trainer.init_state()
    rollout = trainer.rollout_batch(state.policy_params, prompts, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    updates = config.value.updates_per_epoch

    nan_rewards = np.full(len(prompts), np.nan, np.float32)
    dataset = trainer.value_dataset([rollout], nan_rewards, state.reward_stats, prompts)
    before = jax.device_get(state)
    state, metrics = trainer.value_updates(state, dataset, rng)
    after = jax.device_get(state)
    assert _fields_that_differ(before, after) == {"nonfinite_skips", "nonfinite_streak"}
    assert int(after.nonfinite_skips) == updates and after.nonfinite_streak.tolist() == [updates, 0]
    assert metrics["value_nonfinite_loss"] == updates and np.isnan(metrics["value_loss"])

    rewards = np.linspace(0.0, 1.0, len(prompts), dtype=np.float32)
    dataset = trainer.value_dataset([rollout], rewards, state.reward_stats, prompts)
    state, metrics = trainer.value_updates(state, dataset, rng)
    applied = jax.device_get(state)
    assert {"value_params", "value_opt_state", "value_updates"} <= _fields_that_differ(after,
                                                                                        applied)
    assert int(applied.nonfinite_skips) == updates and applied.nonfinite_streak.tolist() == [0, 0]
    assert metrics["value_nonfinite_loss"] == 0 and np.isfinite(metrics["value_loss"])

    # Inputs are built from step outputs only: a host copy put back would be placed differently
    # and lower to another program (compiled anew instead of loaded from the cache).
    good_value = state.value_params
    poisoned = state.replace(value_params=jax.tree_util.tree_map(
        lambda x: jnp.full_like(x, jnp.nan), good_value))
    before = jax.device_get(poisoned)
    state, metrics = trainer.policy_update(poisoned, prompts, jax.random.PRNGKey(1))
    after = jax.device_get(state)
    assert _fields_that_differ(before, after) == {"nonfinite_skips", "nonfinite_streak"}
    assert after.nonfinite_streak.tolist() == [0, 1] and int(after.nonfinite_skips) == updates + 1
    assert float(metrics["policy_nonfinite_loss"]) == 1

    state, metrics = trainer.policy_update(state.replace(value_params=good_value), prompts,
                                           jax.random.PRNGKey(1))
    applied = jax.device_get(state)
    assert {"policy_params", "policy_updates"} <= _fields_that_differ(after, applied)
    assert applied.nonfinite_streak.tolist() == [0, 0]
    assert float(metrics["policy_nonfinite_loss"]) == 0


def test_repeated_nonfinite_updates_stop_and_keep_the_last_good_checkpoint(trainer, runs,
                                                                            tmp_path):
    workdir = copy_of(runs.after_kill, tmp_path)
    config = tiny_config()
    config.train.max_nonfinite_in_a_row = 2  # = value.updates_per_epoch: one bad epoch
    loop = Loop(config, workdir, trainer=trainer)
    restore = loop.restore_or_init

    def restore_diverged():
        state, step = restore()
        return state.replace(value_params=jax.tree_util.tree_map(
            lambda x: jnp.full_like(x, jnp.inf), state.value_params)), step

    loop.restore_or_init = restore_diverged
    saved = tree_digest(workdir / "checkpoints")
    with pytest.raises(faults.NonFiniteError) as error:
        loop.run()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"step {EVERY + 1}: 2 value updates in a row had a non-finite value "
                              "loss and were skipped"), message
    assert f"the last good checkpoint is step {EVERY}" in message
    assert tree_digest(workdir / "checkpoints") == saved  # nothing saved, nothing deleted
    assert [r["step"] for r in read_rows(workdir / "metrics.jsonl")] == list(range(EVERY + 1))


def test_checkpoint_of_another_config_is_refused_and_kept(runs, tmp_path):
    runs.wait_killed()
    workdir = copy_of(runs.after_kill, tmp_path)
    config = tiny_config()
    config.value.width = 16
    saved = tree_digest(workdir / "checkpoints")
    where = f"{(workdir / 'checkpoints').resolve()}/{EVERY}"
    loop = Loop(config, workdir, trainer=Trainer(config))
    with pytest.raises(CheckpointError) as error:
        loop.restore_or_init()
    assert str(error.value) == (
        f"checkpoint {where} was written with value.width = 32 (now 16): resuming would mix two "
        "experiments in one run; use another --workdir, or resume with the change on purpose: "
        "--allow_changes=value.width")
    # Allowed on purpose, the shapes still differ: restore names the difference.
    loop = Loop(config, workdir, trainer=loop.trainer, allow_changes=["value.width"])
    with pytest.raises(CheckpointError) as error:
        loop.restore_or_init()
    message = str(error.value)
    assert "\n" not in message and "<" not in message
    assert message.startswith(f"checkpoint {where} cannot be restored ("), message
    assert "; it was written with value.width = 32 (now 16); resume it with" in message, message
    assert tree_digest(workdir / "checkpoints") == saved


def test_resuming_with_changed_settings_is_refused_unless_allowed(trainer, runs, tmp_path):
    workdir = copy_of(runs.after_kill, tmp_path)
    config = tiny_config()
    config.sample.batch_size *= 2
    config.policy.learning_rate = 0.01
    config.checkpoint.keep = 7  # where and how often it saves: always free
    config.train.eval_every = 5
    saved = tree_digest(workdir)
    with pytest.raises(CheckpointError) as error:
        Loop(config, workdir, trainer=trainer).restore_or_init()
    message = str(error.value)
    assert "\n" not in message
    assert (f"was written with policy.learning_rate = 0.0001 (now 0.01), sample.batch_size = "
            f"{config.sample.batch_size // 2} (now {config.sample.batch_size}): resuming would "
            "mix two experiments") in message, message
    assert message.endswith("--allow_changes=policy.learning_rate,sample.batch_size")
    assert tree_digest(workdir) == saved

    config = tiny_config()
    config.train.epochs = EPOCHS + 2  # more epochs, on purpose
    loop = Loop(config, workdir, trainer=trainer, allow_changes=["train.epochs"])
    _, step = loop.restore_or_init()
    assert step == EVERY
    assert [json.loads(line) for line in (workdir / "config_changes.jsonl").read_text()
            .splitlines()] == [{"step": EVERY, "changes": [f"train.epochs = {EPOCHS} -> "
                                                           f"{EPOCHS + 2}"]}]
    loop.checkpointer.close()


def test_a_save_that_fails_is_one_line_at_that_save(runs, tmp_path):
    """A full disk (here: a file-size limit, so the checkpoint's array files cannot be written)
    stops the run at the save that failed with one line, exit status 4; the checkpoint before
    it is untouched."""
    runs.wait_killed()  # the programs are compiled and cached by then
    import resource

    workdir = copy_of(runs.after_kill, tmp_path)
    before = tree_digest(workdir / "checkpoints" / str(EVERY))

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run(
        [sys.executable, "-m", "vard_jax.main", *ARGS, "--config.checkpoint.every=1",
         f"--workdir={workdir}"], cwd=REPO, env=runs.env, capture_output=True, text=True,
        preexec_fn=small_files_only, timeout=TIMEOUT_S)
    assert result.returncode == 4, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not re.match(r"[IW]\d{4} ", line)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"error: saving checkpoint {EVERY + 1} to "
                               f"{(workdir / 'checkpoints').resolve()} failed ("), lines
    assert lines[0].endswith(f"the last complete checkpoint is step {EVERY}; free space (or fix "
                             "the disk) and run the same command to resume"), lines
    assert tree_digest(workdir / "checkpoints" / str(EVERY)) == before
    assert step_dirs(workdir / "checkpoints") == [EVERY]
    assert [r["step"] for r in read_rows(workdir / "metrics.jsonl")] == list(range(EVERY + 2))


def test_truncated_checkpoint_is_refused_and_kept(trainer, runs, tmp_path):
    workdir = copy_of(runs.after_kill, tmp_path)
    data = workdir / "checkpoints" / str(EVERY) / "state" / "ocdbt.process_0" / "d"
    for file in data.iterdir():
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    saved = tree_digest(workdir / "checkpoints")
    loop = Loop(tiny_config(), workdir, trainer=trainer)
    with pytest.raises(CheckpointError) as error:
        loop.restore_or_init()
    message = str(error.value)
    assert "\n" not in message and "<" not in message and "TensorStore" not in message
    assert message.startswith(f"checkpoint {(workdir / 'checkpoints').resolve()}/{EVERY} is "
                              "incomplete or damaged: its config and array shapes match this run "
                              "but its data cannot be read ("), message
    assert message.endswith("); move that directory away to start over, or use another "
                            "--workdir (it was left as it is)"), message
    assert tree_digest(workdir / "checkpoints") == saved
    # vard_jax.evaluate says the same in one line (no traceback from orbax or asyncio).
    result = subprocess.run([sys.executable, "-m", "vard_jax.evaluate", f"--workdir={workdir}"],
                            cwd=REPO, env=runs.env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not re.match(r"[IW]\d{4} ", line)]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "is incomplete or damaged" in lines[0], lines
    assert tree_digest(workdir / "checkpoints") == saved


# --- the resumed and the reference run -----------------------------------------------------------
def test_resumed_run_matches_the_uninterrupted_run(runs, trainer, tmp_path):
    # The same run uninterrupted, with a checkpoint at every step, trained here (the same
    # compiled programs as the processes: theirs come from the session's compilation cache)
    # while the resumed process trains; it stops at step 4 or 5, so 5 steps are enough.
    config = tiny_config()
    config.checkpoint.every, config.checkpoint.keep = 1, 100
    reference = tmp_path / "reference"
    Loop(config, reference, trainer=trainer).run(until=EPOCHS - 1)
    assert runs.wait_resumed() == 0, runs.resumed.stderr
    checkpoints = runs.killed.workdir / "checkpoints"
    stopped = max(step_dirs(checkpoints))
    expected = checkpoint_state(reference / "checkpoints", stopped)
    actual = checkpoint_state(checkpoints, stopped)
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)

    # metrics.jsonl: every step once, and the same numbers as the uninterrupted run
    rows = read_rows(runs.killed.workdir / "metrics.jsonl")
    reference_rows = read_rows(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(stopped + 1))
    for row, ref in zip(rows, reference_rows):
        keys = set(ref) - {"wall_s", "images_per_s"}
        assert set(row) - {"wall_s", "images_per_s"} == keys
        assert {k: row[k] for k in keys} == {k: ref[k] for k in keys}, row["step"]


def test_sigint_saves_the_last_epoch_and_exits_0(runs):
    assert runs.wait_resumed() == 0, runs.resumed.stderr
    assert runs.sigint_sent
    assert "Traceback" not in runs.resumed.stderr and "KeyboardInterrupt" not in runs.resumed.stderr
    checkpoints = runs.killed.workdir / "checkpoints"
    steps = step_dirs(checkpoints)
    stopped = max(steps)
    # Resumed from step 3, stopped after step 4 or 5: a checkpoint only the SIGTERM path writes.
    assert EVERY < stopped < EPOCHS and stopped % EVERY != 0, steps
    assert read_rows(runs.killed.workdir / "metrics.jsonl")[-1]["step"] == stopped
    assert f"SIGINT: stopped after step {stopped} with a checkpoint" in runs.resumed.stderr
    assert not list(checkpoints.glob(f"{stopped}.orbax-checkpoint-tmp*"))
    assert json.loads(runs.resumed.stdout_path.read_text().splitlines()[-1])["step"] == stopped
    # Both processes recorded their command line (the model card of an export quotes them).
    command = " ".join(["python -m vard_jax.main", *ARGS, f"--workdir={runs.killed.workdir}"])
    assert (runs.killed.workdir / "commands.txt").read_text().splitlines() == [command] * 2
    # The checkpoint it resumed from and the planted unfinished save are still there.
    assert EVERY in steps and (checkpoints / PLANTED_TMP).is_dir()
