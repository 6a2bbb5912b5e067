"""What one epoch does, per algorithm (``config.algorithm``); the loop around it is shared.

* ``vard``: roll out the policy -> rewards (host) -> value update(s) on the fresh states ->
  dense policy update(s) through the value. Value pre-training epochs come first.
* ``ddpo``: roll out the policy storing transitions and log-probs -> rewards (host) ->
  per-prompt advantages -> PPO-clip epochs over minibatches of transitions.
* ``value``: VARD's value stage alone on the pretrained model's samples (the policy is never
  updated): a value for sampling-time steering of the base model (``vard_jax.sample``).
* ``draft``: per batch, one update that samples with gradients and backpropagates the
  (differentiable, in-graph) reward through the last K steps (AlignProp: random K).

Each stage returns the epoch's metrics, with ``reward_mean``/``reward_std`` of the samples
it trained on, ``images`` (samples drawn, for the throughput figure) and, where the rewards
are computed on the host, ``rewards`` (their values, for the loggers' histograms; DRaFT's are
computed inside its update). The state's ``reward_queries`` counts every reward evaluated for
training.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vard_jax import prompts as prompts_lib
from vard_jax.algorithms import ddpo
from vard_jax.training import faults
from vard_jax.training.state import TrainState


def ddpo_minibatch_size(config, stochastic_steps: int, data_shards: int) -> int:
    """Transitions per PPO micro-batch: ``ddpo.minibatch_size``, at most what an epoch holds
    (its chains when ``ddpo.accumulate_timesteps``, else its transitions), rounded down to a
    multiple of the data shards (and at least one per shard)."""
    units = config.sample.batches_per_epoch * config.sample.batch_size
    if not config.ddpo.accumulate_timesteps:
        units *= stochastic_steps
    size = min(config.ddpo.minibatch_size, units)
    return max(size - size % data_shards, data_shards)


def ddpo_updates_per_pass(config, stochastic_steps: int, data_shards: int) -> int:
    """PPO optimiser steps in one pass over an epoch's transitions (``ddpo.plan_updates``);
    raises ConfigError when ``ddpo.gradient_accumulation`` leaves none."""
    from vard_jax.config import ConfigError

    chains = config.sample.batches_per_epoch * config.sample.batch_size
    size = ddpo_minibatch_size(config, stochastic_steps, data_shards)
    updates = ddpo.updates_per_pass(chains, stochastic_steps, size,
                                    config.ddpo.gradient_accumulation,
                                    config.ddpo.accumulate_timesteps)
    if updates < 1:
        unit = "chains" if config.ddpo.accumulate_timesteps else "transitions"
        raise ConfigError(f"config.ddpo.gradient_accumulation = "
                          f"{config.ddpo.gradient_accumulation}: an epoch holds fewer minibatches "
                          f"of {size} {unit}; lower it or sample more per epoch")
    return updates


def policy_updates_per_epoch(config, stochastic_steps: int, data_shards: int) -> int:
    """Policy optimiser steps in one epoch of ``config.algorithm``: the learning-rate schedule
    spans this times ``train.epochs``. ``stochastic_steps``: the denoising steps DDPO trains
    (``ddpo.stochastic_steps``)."""
    batches = config.sample.batches_per_epoch
    if config.algorithm == "ddpo":  # PPO steps over the epoch's transitions (DDPOStage.epoch)
        return config.ddpo.inner_epochs * ddpo_updates_per_pass(config, stochastic_steps,
                                                                data_shards)
    if config.algorithm == "draft":  # one step per batch (DraftStage.epoch)
        return batches
    return batches * config.policy.updates_per_epoch  # VardStage.epoch -> Loop.policy_stage


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


class VardStage(Stage):

    def pretrain(self, state: TrainState) -> tuple[TrainState, dict]:
        """``value.pretrain_epochs`` value-only epochs on the pretrained policy's samples."""
        loop, pre = self.loop, {}
        for p in range(loop.config.value.pretrain_epochs):
            state, key = loop._split_key(state)
            rollouts, rewards, prompts = loop.collect(state, (1, p), key)
            state, pre = loop.value_stage(state, rollouts, rewards, prompts, (1, p))
            faults.check_streak(state, loop.config.train.max_nonfinite_in_a_row, 0, pre,
                                loop.last_checkpoint)
        return state, pre

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        loop, limit = self.loop, self.loop.config.train.max_nonfinite_in_a_row
        key_sample, key_policy = jax.random.split(key)
        rollouts, rewards, prompts = loop.collect(state, (0, epoch), key_sample, step=epoch + 1)
        state, value_metrics = loop.value_stage(state, rollouts, rewards, prompts, (0, epoch))
        faults.check_streak(state, limit, epoch + 1, value_metrics, loop.last_checkpoint)
        state, policy_metrics = loop.policy_stage(state, prompts, key_policy)
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
        rollouts, rewards, prompts = loop.collect(state, (0, epoch), key, step=epoch + 1)
        state, value_metrics = loop.value_stage(state, rollouts, rewards, prompts, (0, epoch))
        faults.check_streak(state, loop.config.train.max_nonfinite_in_a_row, epoch + 1,
                            value_metrics, loop.last_checkpoint)
        return state, {"reward_mean": float(np.mean(rewards)),
                       "reward_std": float(np.std(rewards)), **value_metrics,
                       "images": rewards.size, "rewards": rewards}


class DDPOStage(Stage):
    def __init__(self, loop):
        from vard_jax.training.baselines import DDPOSteps

        super().__init__(loop)
        self.steps = DDPOSteps(loop.trainer)

    def host_state(self) -> dict:
        """The per-prompt reward buffers (``ddpo.stat_buffer``): a resumed run continues them."""
        return {"ddpo_reward_buffers": self.steps.tracker.state_dict()}

    def load_host_state(self, state: dict) -> None:
        self.steps.tracker.load_state_dict(state.get("ddpo_reward_buffers", {}))

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        loop, config = self.loop, self.loop.config
        samples, rewards, prompts = [], [], []
        for b in range(config.sample.batches_per_epoch):
            batch_prompts = prompts_lib.draw(loop.train_prompts, config.sample.batch_size,
                                             config.train.seed, 0, epoch, b)
            sampled = self.steps.sample(state.policy_params, batch_prompts,
                                        jax.random.fold_in(key, b))
            images = np.asarray(jax.device_get(sampled.images))
            faults.check_images(images, epoch + 1, loop.last_checkpoint)
            values, _ = loop.trainer.reward_evaluator(images, batch_prompts)
            samples.append(sampled)
            rewards.append(values)
            prompts.extend(batch_prompts)
        rewards = np.concatenate(rewards)
        state = state.replace(reward_queries=state.reward_queries + rewards.size)
        transitions = self.steps.transitions(samples, rewards, prompts)
        steps = len(self.steps.steps)
        size = ddpo_minibatch_size(config, steps, loop.trainer.mesh.shape["data"])
        rng = np.random.default_rng([config.train.seed, 0, epoch, 11])
        minibatches = []  # one [A, M] index array per optimiser step
        for _ in range(config.ddpo.inner_epochs):
            minibatches += ddpo.plan_updates(rng, rewards.size, steps, size,
                                             config.ddpo.gradient_accumulation,
                                             config.ddpo.accumulate_timesteps)
        transitions, gap = self.steps.sampling_log_probs(state.policy_params, transitions,
                                                         minibatches)
        metrics = []
        for number, indices in enumerate(minibatches):
            state, m = self.steps.update(state, transitions.take(indices), first=number == 0)
            metrics.append(m)
        summary = faults.aggregate(metrics)
        # The first optimiser step trains at the sampling parameters: every ratio of its
        # micro-batches must be exactly 1.
        summary["first_log_ratio_max"] = float(metrics[0]["log_ratio_max"])
        summary["first_clipfrac"] = float(metrics[0]["clipfrac"])
        summary["rollout_log_prob_gap"] = gap
        faults.check_streak(state, config.train.max_nonfinite_in_a_row, epoch + 1, summary,
                            loop.last_checkpoint)
        return state, {"reward_mean": float(np.mean(rewards)),
                       "reward_std": float(np.std(rewards)), **summary,
                       "images": int(rewards.size), "rewards": rewards}


class DraftStage(Stage):
    def __init__(self, loop):
        from vard_jax.training.baselines import DraftSteps

        super().__init__(loop)
        self.steps = DraftSteps(loop.trainer)

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        loop, config = self.loop, self.loop.config
        metrics = []
        for b in range(config.sample.batches_per_epoch):
            batch_prompts = prompts_lib.draw(loop.train_prompts, config.sample.batch_size,
                                             config.train.seed, 0, epoch, b)
            state, m = self.steps.update(state, batch_prompts, jax.random.fold_in(key, b))
            metrics.append(m)
        summary = faults.aggregate(metrics)
        faults.check_streak(state, config.train.max_nonfinite_in_a_row, epoch + 1, summary,
                            loop.last_checkpoint)
        summary["images"] = config.sample.batches_per_epoch * config.sample.batch_size
        return state, summary


STAGES: dict[str, type[Stage]] = {"vard": VardStage, "value": ValueStage, "ddpo": DDPOStage,
                                  "draft": DraftStage}


def make(loop) -> Any:
    """The stage of ``loop.config.algorithm``."""
    return STAGES[loop.config.algorithm](loop)
