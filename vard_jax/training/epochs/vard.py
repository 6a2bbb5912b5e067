"""VARD's epoch: roll out the policy, score the chains on the host, fit the value to every
state, then update the policy densely through the value; and ``value``, the same without the
policy update (a value for sampling-time steering of the base model)."""

from __future__ import annotations

import collections
from typing import Callable

import jax
import numpy as np

from vard_jax import prompts as prompts_lib
from vard_jax.training import faults
from vard_jax.training.epochs.base import Stage, split_key
from vard_jax.training.state import TrainState


class VardStage(Stage):
    """Roll out the policy -> rewards (host) -> value update(s) on the fresh states (and the
    replayed ones of earlier epochs) -> dense policy update(s) through the value."""

    def __init__(self, loop):
        super().__init__(loop)
        # The value datasets of the value.replay_epochs - 1 epochs before this one (host
        # arrays; saved with each checkpoint, so a resumed run replays the same states).
        self.replay_data: collections.deque = collections.deque(
            maxlen=loop.config.value.replay_epochs - 1)

    def replay(self) -> list[dict]:
        return list(self.replay_data)

    def load_replay(self, restore: Callable[[], list[dict]]) -> None:
        if self.replay_data.maxlen:
            self.replay_data.extend(restore())

    def collect(self, state: TrainState, salt: tuple[int, int], key: jax.Array, step: int = 0):
        """Rollouts of the current policy and their rewards (host); ``salt`` seeds prompts.

        Raises NonFiniteError when the images are not finite (before the reward sees them).
        """
        loop, cfg = self.loop, self.loop.config.sample
        prompts = [prompts_lib.draw(loop.train_prompts, cfg.batch_size, loop.config.train.seed,
                                    *salt, b) for b in range(cfg.batches_per_epoch)]
        rollouts, rewards = loop.trainer.rollouts_with_rewards(
            state.policy_params, prompts, key,
            check_images=lambda images: faults.check_images(images, step, loop.last_checkpoint))
        return rollouts, rewards, prompts

    def value_update(self, state: TrainState, rollouts, rewards: np.ndarray, prompts,
                     salt: tuple[int, int]):
        """The reward statistics, then ``value.updates_per_epoch`` value steps on the epoch's
        labelled states (with the replayed ones); returns (state, V's fit before the update
        and the update's metrics)."""
        trainer, config = self.loop.trainer, self.loop.config
        state = state.replace(
            reward_stats=state.reward_stats.update(trainer.put_batch(rewards),
                                                   config.value.stats_decay),
            reward_queries=state.reward_queries + rewards.size)
        flat_prompts = [p for batch_prompts in prompts for p in batch_prompts]
        dataset = trainer.value_dataset(rollouts, rewards, state.reward_stats, flat_prompts)
        diagnostics = trainer.value_diagnostics(state, dataset)
        if config.value.log_grad_alignment:
            diagnostics.update(trainer.value_gradient_alignment(state, dataset, flat_prompts))
        rng = np.random.default_rng([config.train.seed, *salt, 7])
        training_data = dataset
        if self.replay_data.maxlen:
            training_data = trainer.replay_dataset([*self.replay_data, dataset],
                                                   state.reward_stats)
            self.replay_data.append(dataset)
        state, metrics = trainer.value_updates(state, training_data, rng)
        return state, {**diagnostics, **metrics}

    def policy_update(self, state: TrainState, prompts: list[list[str]], key: jax.Array):
        """``policy.updates_per_epoch`` VARD policy steps on each batch of prompts."""
        metrics = []
        for b, batch_prompts in enumerate(prompts):
            for u in range(self.loop.config.policy.updates_per_epoch):
                step_key = jax.random.fold_in(jax.random.fold_in(key, b), u)
                state, m = self.loop.trainer.policy_update(state, batch_prompts, step_key)
                metrics.append(m)
        return state, faults.aggregate(metrics)

    def pretrain(self, state: TrainState) -> tuple[TrainState, dict]:
        """``value.pretrain_epochs`` value-only epochs on the pretrained policy's samples."""
        loop, pre = self.loop, {}
        for p in range(loop.config.value.pretrain_epochs):
            state, key = split_key(state)
            rollouts, rewards, prompts = self.collect(state, (1, p), key)
            state, pre = self.value_update(state, rollouts, rewards, prompts, (1, p))
            faults.check_streak(state, loop.config.train.max_nonfinite_in_a_row, 0, pre,
                                loop.last_checkpoint)
        return state, pre

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        loop, limit = self.loop, self.loop.config.train.max_nonfinite_in_a_row
        key_sample, key_policy = jax.random.split(key)
        rollouts, rewards, prompts = self.collect(state, (0, epoch), key_sample, step=epoch + 1)
        state, value_metrics = self.value_update(state, rollouts, rewards, prompts, (0, epoch))
        faults.check_streak(state, limit, epoch + 1, value_metrics, loop.last_checkpoint)
        state, policy_metrics = self.policy_update(state, prompts, key_policy)
        faults.check_streak(state, limit, epoch + 1, policy_metrics, loop.last_checkpoint)
        images = rewards.size * (1 + loop.config.policy.updates_per_epoch)
        return state, {"reward_mean": float(np.mean(rewards)),
                       "reward_std": float(np.std(rewards)), **value_metrics, **policy_metrics,
                       "images": images, "rewards": rewards}


class ValueStage(VardStage):
    """VARD without its policy stage: every epoch trains the value on fresh samples of the
    (unchanged) pretrained policy."""

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        loop = self.loop
        rollouts, rewards, prompts = self.collect(state, (0, epoch), key, step=epoch + 1)
        state, value_metrics = self.value_update(state, rollouts, rewards, prompts, (0, epoch))
        faults.check_streak(state, loop.config.train.max_nonfinite_in_a_row, epoch + 1,
                            value_metrics, loop.last_checkpoint)
        return state, {"reward_mean": float(np.mean(rewards)),
                       "reward_std": float(np.std(rewards)), **value_metrics,
                       "images": rewards.size, "rewards": rewards}
