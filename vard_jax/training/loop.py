"""The outer loop, the same for every algorithm: an epoch (``vard_jax.training.epochs``: for
VARD sample -> reward -> value update -> policy update) -> evaluate -> log -> checkpoint.

Every random draw is a function of the seed, the epoch and the state's key, so a run resumed
from a checkpoint continues exactly as an uninterrupted run would. SIGTERM stops the run after
the current epoch with a checkpoint; updates that keep failing stop it without one
(``vard_jax.training.faults``; the guarantees are listed in docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging

from vard_jax import prompts as prompts_lib
from vard_jax.training import epochs, evaluation, faults
from vard_jax.training.checkpoints import Checkpointer, abstract_with_shardings
from vard_jax.training import loggers as loggers_lib
from vard_jax.training.images import save_grid
from vard_jax.training.metrics import MetricWriter
from vard_jax.training.state import TrainState
from vard_jax.training.trainer import Trainer
from vard_jax.training.workdir import open_append, record_command


class Loop:
    def __init__(self, config, workdir: str | pathlib.Path, trainer: Optional[Trainer] = None,
                 allow_changes: Sequence[str] = (), command: Optional[Sequence[str]] = None):
        self.config = config
        # The command line (sys.argv) recorded in WORKDIR/commands.txt when training starts.
        self.command = list(command) if command else None
        # Config fields that may differ from the resumed checkpoint's ("all": any).
        self.allow_changes = tuple(allow_changes)
        self.workdir = pathlib.Path(workdir)
        self.trainer = trainer or Trainer(config)
        self.train_prompts = prompts_lib.load_prompts(config.sample.train_prompts)
        eval_set = prompts_lib.load_prompts(config.sample.eval_prompts)
        for spec, prompts in ((config.sample.train_prompts, self.train_prompts),
                              (config.sample.eval_prompts, eval_set)):
            prompts_lib.warn_if_truncated(prompts, self.trainer.pipeline, spec)
        count = config.sample.eval_batch_size * config.sample.eval_batches
        self.eval_prompts = prompts_lib.fixed(eval_set, count, config.train.seed)
        self.grid_train_prompts = prompts_lib.fixed(self.train_prompts,
                                                    config.sample.eval_batch_size,
                                                    config.train.seed)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", config.checkpoint.keep)
        self.last_checkpoint: Optional[int] = None  # the latest step saved or restored
        self.stage = epochs.make(self)  # what an epoch does: config.algorithm
        # The step-0 evaluation (held-out, training prompts), for compare_final.png.
        self.base_evaluation: Optional[tuple] = None

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, state: TrainState, step: int) -> tuple[dict, dict, dict]:
        """Samples the held-out prompts and the fixed training prompts with the evaluation
        noise; returns (metrics, images, histograms): the sample grid (also written to
        WORKDIR/samples/step_<N>.png) and the held-out rewards, for the loggers."""
        cfg = self.config.sample
        seed = self.config.train.seed + prompts_lib.EVAL_NOISE_SEED_OFFSET
        held, train = self._evaluate_prompt_sets(state.policy_params)
        metrics = evaluation.summary(held, "eval")
        metrics["eval_reward_mean"] = metrics[f"eval_{self.trainer.reward.name}_mean"]
        metrics.update(evaluation.summary(train, "eval_train"))
        repeats = cfg.diversity_samples
        if repeats > 1:
            varied = evaluation.evaluate(
                self.trainer, state.policy_params,
                evaluation.diversity_prompts(self.eval_prompts, cfg.eval_batch_size, repeats),
                cfg.eval_batch_size, seed, scored=False)
            metrics["eval_diversity"] = evaluation.diversity(varied.images, repeats)
        if step == 0:
            self.base_evaluation = (held, train)
        images, histograms = {}, {}
        if step == self.config.train.epochs:
            if self.base_evaluation is None:  # resumed after step 0: every process samples
                self.base_evaluation = self._evaluate_prompt_sets(
                    self.trainer.pretrained_policy_params())
            if jax.process_index() == 0:
                self.write_comparison(held, train)
        if jax.process_index() == 0:
            name = self.trainer.reward.name
            count = min(cfg.eval_batch_size, len(held.prompts))
            samples = np.concatenate([held.images[:count], train.images])
            prompts = held.prompts[:count] + train.prompts
            scores = np.concatenate([held.scores[name][:count], train.scores[name]])
            picture = save_grid(self.workdir / "samples" / f"step_{step:05d}.png", samples,
                                ["[held-out] " + p for p in prompts[:count]] + prompts[count:],
                                scores, columns=self.config.logging.grid_columns)
            images["samples"] = np.asarray(picture)
            histograms[f"eval_{name}"] = np.asarray(held.scores[name])
        return metrics, images, histograms

    def _evaluate_prompt_sets(self, policy_params) -> tuple:
        """(held-out, training-prompt) evaluations of ``policy_params``, evaluation noise."""
        seed = self.config.train.seed + prompts_lib.EVAL_NOISE_SEED_OFFSET
        return tuple(evaluation.evaluate(self.trainer, policy_params, prompts,
                                         self.config.sample.eval_batch_size, seed)
                     for prompts in (self.eval_prompts, self.grid_train_prompts))

    def write_comparison(self, held: evaluation.EvalResult,
                         train: evaluation.EvalResult) -> None:
        """WORKDIR/samples/compare_final.png: the pretrained model's samples (upper row of each
        pair) above the tuned model's (lower), same prompts and noise, held-out prompts first;
        under each image the gold metric (the first evaluation extra) and the trained reward."""
        columns = min(self.config.logging.grid_columns, len(held.prompts), len(train.prompts))
        reward = self.trainer.reward.name
        gold = next(iter(self.trainer.eval_evaluators), None)
        rows, captions = [], []
        for (base, tuned), label in zip(zip(self.base_evaluation, (held, train)),
                                        ("[held-out] ", "")):
            for name, result in (("base", base), ("tuned", tuned)):  # one row each
                rows.append(result.images[:columns])
                for i, prompt in enumerate(result.prompts[:columns]):
                    gold_text = f"{gold}={result.scores[gold][i]:.2f} " if gold else ""
                    captions.append(f"{name}: {gold_text}r={result.scores[reward][i]:.1f} "
                                    f"{label}{prompt}")
        save_grid(self.workdir / "samples" / "compare_final.png", np.concatenate(rows), captions,
                  columns=columns, text_lines=6)

    # --- the run -------------------------------------------------------------------------------------
    def restore_or_init(self) -> tuple[TrainState, int]:
        """The latest checkpoint's state and step, or the initial state and 0.

        A checkpoint that cannot be restored raises CheckpointError and is left as it is.
        """
        trainer = self.trainer
        if self.checkpointer.latest_step() is None:
            return trainer.init_state(), 0
        step = self.checkpointer.latest_step()
        changes = self.checkpointer.check_config(step, self.config.to_json(), self.allow_changes)
        if changes and jax.process_index() == 0:
            logging.warning("resuming step %d with changed settings (--allow_changes): %s",
                            step, ", ".join(changes))
            with open_append(self.workdir / "config_changes.jsonl") as f:
                f.write(json.dumps({"step": int(step), "changes": changes}) + "\n")
        abstract = abstract_with_shardings(trainer.abstract_state,
                                           trainer.state_shardings(trainer.abstract_state))
        state, step = self.checkpointer.restore(abstract, step,
                                                config_json=self.config.to_json())
        self.last_checkpoint = int(step)
        self.stage.load_replay(lambda: self.checkpointer.restore_replay(step))
        self.stage.load_host_state(self.checkpointer.restore_host(step))
        return state, int(step)

    def _save(self, step: int, state: TrainState) -> None:
        self.checkpointer.save(step, state, self.config.to_json(), self.stage.replay(),
                               self.stage.host_state())
        self.last_checkpoint = step

    def run(self, until: Optional[int] = None) -> list[dict]:
        """Trains to ``train.epochs`` (or stops after step ``until``, checkpointing there).

        On SIGTERM or SIGINT it stops after the current epoch and saves it (``self.preempted``
        is then true); when updates keep being skipped (``train.max_nonfinite_in_a_row``) or
        the samples are not finite it raises NonFiniteError and saves nothing more; a save that
        fails (disk full) raises ``SaveError`` at the save.
        """
        with faults.Preemption() as preemption:
            return self._run(until, preemption)

    def _run(self, until: Optional[int], preemption: faults.Preemption) -> list[dict]:
        config = self.config
        state, start = self.restore_or_init()
        is_main = jax.process_index() == 0
        resume_step = start if start else None
        if is_main and self.command:
            record_command(self.workdir, self.command)
        writer = MetricWriter(self.workdir, resume_step=resume_step, enabled=is_main,
                              loggers=loggers_lib.make(config, self.workdir, resume_step)
                              if is_main else ())
        rows = []
        began = time.time()
        self.preempted = False
        progress = None
        step = start

        def wall() -> float:
            return writer.wall_offset + time.time() - began

        try:
            if start == 0:
                state, pre = self.stage.pretrain(state)
                evaluated, images, histograms = self.evaluate(state, 0)
                row = {"reward_queries": int(state.reward_queries), "wall_s": wall(),
                       **{f"pretrain_{k}": v for k, v in pre.items()}, **evaluated}
                rows.append(writer.write(0, row, images, histograms))
            progress = _progress(config, start)
            last = config.train.epochs if until is None else min(until, config.train.epochs)
            for epoch in range(start, last):
                if preemption.stop_now():
                    self.preempted = True
                    break
                epoch_start = time.time()
                state, key = epochs.split_key(state)
                state, metrics = self.stage.epoch(state, epoch, key)
                state = state.replace(epoch=state.epoch + 1)
                step = epoch + 1
                drawn = metrics.pop("images")
                histograms = {"train_reward": metrics.pop("rewards")} if "rewards" in metrics else {}
                images = {}
                updates = int(state.policy_updates)
                value_updates = int(state.value_updates)
                row = {**metrics,
                       "policy_learning_rate": float(
                           self.trainer.policy_learning_rate(max(updates - 1, 0))),
                       "value_learning_rate": float(
                           self.trainer.value_learning_rate(max(value_updates - 1, 0))),
                       "nonfinite_skips": int(state.nonfinite_skips),
                       "reward_queries": int(state.reward_queries),
                       "images_per_s": drawn / max(time.time() - epoch_start, 1e-9)}
                if step % config.train.eval_every == 0 or step == config.train.epochs:
                    evaluated, images, eval_histograms = self.evaluate(state, step)
                    row.update(evaluated)
                    histograms.update(eval_histograms)
                row["wall_s"] = wall()
                rows.append(writer.write(step, row, images, histograms))
                if step % config.checkpoint.every == 0 or step == last:
                    self._save(step, state)
                if progress is not None:
                    progress.set_postfix(reward=f"{row['reward_mean']:.3f}",
                                         eval=_fmt(row.get("eval_reward_mean")))
                    progress.update(1)
            if self.preempted:
                if step > 0 and step != self.last_checkpoint:
                    self._save(step, state)
                logging.warning("%s: stopped after step %d%s; run the same command to resume",
                                preemption.signal_name, step, " with a checkpoint" if step > 0
                                else " (before the first epoch: nothing to save)")
        finally:
            if progress is not None:
                progress.close()
            writer.close()
        self.final_state = state
        return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _progress(config, start: int):
    if not config.logging.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    devices = f"{jax.device_count()} {jax.default_backend()} device(s)"  # e.g. "2 cpu device(s)"
    return tqdm(total=config.train.epochs, initial=start, desc=f"{config.algorithm} on {devices}",
                unit="epoch")
