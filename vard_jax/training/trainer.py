"""What a run does on the host around its compiled steps: roll out batches of prompts and
score them, make the value's data and update the value on it, update the policy.

A ``Trainer`` is the run's ``Components`` (built from the config: model family, policy,
reward, value model, optimisers, mesh) with its jitted ``Steps`` attached
(``vard_jax.training.steps``: ``sample``, ``value_step``, ``policy_step``, ...). The epoch
loop (``vard_jax.training.loop``) and the algorithms' epochs (``vard_jax.training.epochs``)
call it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.parallel import mesh as mesh_lib
from vard_jax.training import faults, steps as steps_lib, value_data
from vard_jax.training.components import Components
from vard_jax.training.state import RewardStats, TrainState
from vard_jax.training.steps import Rollout, StepShardings

__all__ = ["Rollout", "StepShardings", "Trainer"]


class Trainer(Components):
    """A run's components with its compiled steps attached (``sample``, ``value_step``,
    ``policy_step``, ``value_predict``, ``value_gradient_cosines``: ``steps.Steps``)."""

    def __init__(self, config, devices=None):
        super().__init__(config, devices)
        steps = steps_lib.build(self)
        self.sample = steps.sample
        self.value_predict = steps.value_predict
        self.value_gradient_cosines = steps.value_gradient_cosines
        self.value_step = steps.value_step
        self.policy_step = steps.policy_step
        self.abstract_state = steps.abstract_state
        self._step_shardings = steps.shardings

    def step_shardings(self) -> StepShardings:
        """The shardings of the update steps' inputs (for steps built elsewhere, e.g. the
        baselines in ``vard_jax.training.epochs``)."""
        return self._step_shardings

    # --- rollouts and the policy ---------------------------------------------------------------
    def rollout_batch(self, policy_params, prompts: list[str], key) -> Rollout:
        return self.sample(policy_params, self.frozen, self.reference_params,
                           self.put_ids(prompts), self.put_key(key))

    def rollouts_with_rewards(self, policy_params, prompt_batches: list[list[str]], key,
                              check_images=None) -> tuple[list[Rollout], np.ndarray]:
        """Rollouts of the policy for each batch of prompts (batch b with key fold_in(key, b))
        and their rewards, scored on the host: (rollouts, rewards [sum of batch sizes]).
        ``check_images(images)`` sees each batch's host images before the reward does."""
        rollouts, rewards = [], []
        for b, prompts in enumerate(prompt_batches):
            rollout = self.rollout_batch(policy_params, prompts, jax.random.fold_in(key, b))
            images = mesh_lib.to_host(rollout.images)  # the whole batch, on every process
            if check_images is not None:
                check_images(images)
            values, _ = self.reward_evaluator(images, prompts)
            rollouts.append(rollout)
            rewards.append(values)
        return rollouts, np.concatenate(rewards)

    def policy_update(self, state: TrainState, prompts: list[str], key):
        batch = {"ids": jnp.asarray(self.pipeline.tokenize(prompts))}
        if self.config.reward.direct_last_step or self.value_needs_reward_ids:
            batch["reward_input"] = jnp.asarray(self.reward.prepare(prompts))
        return self.policy_step(state, self.frozen, self.reference_params, self.put_batch(batch),
                                self.put_key(key))

    # --- the value's data ---------------------------------------------------------------------
    def value_dataset(self, rollouts: list[Rollout], rewards: np.ndarray, stats: RewardStats,
                      prompts: list[str]) -> dict:
        """Every state after a step, labelled with its chain's standardised reward (numpy)."""
        states = np.concatenate([mesh_lib.to_host(r.states) for r in rollouts])  # [N, T, ...]
        context = np.concatenate([mesh_lib.to_host(r.context) for r in rollouts])  # [N, L, D]
        reward_ids = (np.asarray(self.reward.prepare(prompts)) if self.value_needs_reward_ids
                      else None)
        return value_data.dataset(states, context, rewards, stats, self.schedule.prev_timesteps,
                                  reward_ids)

    replay_dataset = staticmethod(value_data.replay)

    def _per_state(self, function, state: TrainState, dataset: dict,
                   extra: Optional[dict] = None) -> np.ndarray:
        """``function(value_params, reward_stats, frozen, reference_params, batch) -> [B]`` over
        every state of ``dataset`` (``value_data.per_state``, batches of ``value.batch_size``
        split over the data axis). Host values [N]."""
        def on_batch(inputs: dict) -> np.ndarray:
            return mesh_lib.to_host(function(state.value_params, state.reward_stats, self.frozen,
                                             self.reference_params, self.put_batch(inputs)))

        return value_data.per_state(on_batch, dataset, self.config.value.batch_size,
                                    self.mesh.shape[mesh_lib.DATA], extra)

    def value_diagnostics(self, state: TrainState, dataset: dict) -> dict:
        """Explained variance of V on (fresh) labelled states, overall and per step quarter."""
        predictions = self._per_state(self.value_predict, state, dataset)
        return value_data.fit_metrics(dataset["targets"], predictions,
                                      value_data.quarters(dataset, self.num_steps))

    def value_gradient_alignment(self, state: TrainState, dataset: dict,
                                 prompts: list[str]) -> dict:
        """Where V's gradient points, against the reward's (differentiable rewards only).

        For every state x_t of ``dataset`` (``value_dataset`` of the chains of ``prompts``):
        the cosine between d V(x_t) / d x_t, the direction VARD's policy step pushes x_t, and
        d r_std(decode(x0_hat(x_t))) / d x_t, the standardised reward's gradient through the
        frozen reference model's one-step prediction (the reward itself at the final state).
        Returns the mean cosine overall and per quarter of the steps (``_q1``: the noisiest),
        with the fraction of states whose cosine is positive.
        """
        if not self.reward.differentiable:
            raise ValueError(f"the gradient alignment needs a differentiable reward; "
                             f"{self.reward.name!r} is not")
        reward_input = np.asarray(self.reward.prepare(prompts))[dataset["chain"]]
        cosines = self._per_state(self.value_gradient_cosines, state, dataset,
                                  {"reward_input": reward_input})
        return value_data.cosine_metrics(cosines, value_data.quarters(dataset, self.num_steps))

    def value_updates(self, state: TrainState, dataset: dict, rng: np.random.Generator,
                      updates: int | None = None):
        """``updates`` (default ``value.updates_per_epoch``) minibatch steps on the dataset;
        returns (state, metrics): means over the applied updates and counts of the skipped
        ones (``faults.aggregate``)."""
        size = min(self.config.value.batch_size, dataset["states"].shape[0])
        size -= size % self.mesh.shape[mesh_lib.DATA] or 0
        per_update = []
        count = self.config.value.updates_per_epoch if updates is None else updates
        for _ in range(count):
            idx = rng.choice(dataset["states"].shape[0], size=size, replace=False)
            batch = self.put_batch(value_data.batch(dataset, idx))
            state, metrics = self.value_step(state, self.frozen, self.reference_params, batch)
            per_update.append(metrics)
        return state, faults.aggregate(per_update)
