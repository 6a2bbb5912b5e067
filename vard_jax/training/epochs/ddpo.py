"""DDPO's epoch, as ddpo-pytorch runs it: roll out the policy storing transitions and
log-probs, score them on the host, per-prompt advantages, PPO-clip epochs over minibatches of
transitions with the gradient accumulated over their steps (``vard_jax.algorithms.ddpo``).

Flow-GRPO's epoch (``GRPOStage``) is the same with groups: each batch holds
``grpo.group_size`` samples of each of its prompts, advantages are normalised within the
groups, the loss adds ``grpo.beta`` times the KL to the reference model's kernels, and the
first ``grpo.train_fraction`` of the stochastic steps are trained.

Its steps share everything else with VARD's: the policy parametrisation (full or LoRA), the
sampler, the policy optimiser, the mesh shardings, state donation and the skipping of
non-finite updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax import prompts as prompts_lib
from vard_jax.algorithms import advantages as advantages_lib, ddpo
from vard_jax.diffusion import rollout as rollout_lib, sampler as sampler_lib
from vard_jax.parallel import mesh as mesh_lib
from vard_jax.training import faults, optimizers
from vard_jax.training.epochs.base import Stage
from vard_jax.training.optimizers import apply_policy_gradient
from vard_jax.training.state import TrainState


class Transitions(NamedTuple):
    """A sampled batch with what DDPO stores of it."""

    images: jax.Array  # [B, H, W, 3]
    x_t: jax.Array  # [B, T, ...] state entering each step
    x_prev: jax.Array  # [B, T, ...] state after each step
    log_prob: jax.Array  # [B, T] log p_old(x_prev | x_t), summed over dimensions
    context: jax.Array  # [B, L, D]


class DDPOSteps:
    """``sample(policy_params, ids, key) -> Transitions`` and the PPO ``update``."""

    def __init__(self, trainer):
        config = trainer.config
        self.trainer = trainer
        self.config = ddpo.DDPOConfig(
            clip_range=config.ddpo.clip_range, eta=config.sample.eta,
            guidance_scale=config.sample.guidance_scale,
            adv_clip=config.ddpo.adv_clip or None, reduce=config.ddpo.reduce,
            kl_beta=config.grpo.beta if config.algorithm == "grpo" else 0.0)
        self.steps = trainer.ddpo_steps  # ddpo.stochastic_steps of the schedule
        pipeline, policy, schedule = trainer.pipeline, trainer.policy, trainer.schedule
        loss_config = self.config
        sampler_spec = trainer.sampler_spec
        optimizer = trainer.policy_optimizer
        # The micro-batch loops of the update and of the old log-probs, unrolled alike.
        unroll = rollout_lib.resolve_unroll(config.policy.scan_unroll)

        def sample(policy_params, frozen, reference_params, ids, key):
            samples = sampler_lib.sample(pipeline, frozen,
                                         policy.unet(policy_params, reference_params), ids, key,
                                         sampler_spec, eps_fn=policy.eps_fn)
            trajectory = samples.trajectory
            return Transitions(images=samples.images, x_t=trajectory.x_t,
                               x_prev=trajectory.x_prev, log_prob=trajectory.log_prob,
                               context=samples.context)

        def update(state: TrainState, frozen, reference_params, batch: ddpo.DDPOBatch,
                   first: jax.Array):
            # batch: [A, M, ...] per transition (A micro-batches of M); one optimiser step on
            # the mean of the A micro-batches' gradients.
            def loss_fn(params, micro_batch):
                micro_batch = micro_batch._replace(null_context=batch.null_context)
                return ddpo.ddpo_loss(policy.eps_fn, policy.unet(params, reference_params),
                                      schedule, micro_batch, loss_config, first,
                                      (policy.eps_fn, policy.reference_unet(reference_params)))

            loss, metrics, grads = ddpo.accumulated_gradient(
                loss_fn, state.policy_params, batch._replace(null_context=None), unroll)
            return apply_policy_gradient(optimizer, state, grads, loss, metrics)

        def sampling_log_prob(params, frozen, reference_params, batch: ddpo.DDPOBatch):
            # What ``ddpo.ddpo_loss`` computes as the new log-probs: the same function in the
            # same scan over the same micro-batch shapes, here at fixed parameters.
            del frozen
            unet = policy.unet(params, reference_params)

            def micro_step(carry, micro_batch):
                return carry, ddpo.transition_log_prob(
                    policy.eps_fn, unet, schedule, micro_batch.x_t, micro_batch.step_index,
                    micro_batch.x_prev, micro_batch.context, batch.null_context,
                    loss_config.eta, loss_config.guidance_scale, reduce=loss_config.reduce)

            return jax.lax.scan(micro_step, None, batch._replace(null_context=None),
                                unroll=unroll)[1]

        shardings = trainer.step_shardings()
        batch, replicated = shardings.batch, shardings.replicated
        self._sample = jax.jit(sample, in_shardings=(
            shardings.state.policy_params, shardings.frozen, shardings.reference, batch,
            replicated), out_shardings=Transitions(batch, batch, batch, batch, batch))
        # Micro-batches [A, M, ...]: the M transitions of each are split over ``data``.
        micro = mesh_lib.microbatch_sharding(trainer.mesh)
        self._micro_sharding = micro
        batch_sharding = ddpo.DDPOBatch(micro, micro, micro, micro, micro, micro, replicated)
        self._update = jax.jit(update, in_shardings=(
            shardings.state, shardings.frozen, shardings.reference, batch_sharding, replicated),
            out_shardings=(shardings.state, replicated), donate_argnums=0)
        self._log_prob = jax.jit(sampling_log_prob, in_shardings=(
            shardings.state.policy_params, shardings.frozen, shardings.reference,
            batch_sharding), out_shardings=micro)
        ddpo_config = config.ddpo
        # Per-prompt reward statistics across epochs (saved with each checkpoint).
        self.tracker = advantages_lib.PromptStatTracker(ddpo_config.stat_buffer,
                                                        ddpo_config.stat_min_count)

    def sample(self, policy_params: Any, prompts: list[str], key: jax.Array) -> Transitions:
        trainer = self.trainer
        return self._sample(policy_params, trainer.frozen, trainer.reference_params,
                            trainer.put_ids(prompts), trainer.put_key(key))

    def transitions(self, samples: list[Transitions], rewards: np.ndarray,
                    prompts: list[str], advantages: Any = None) -> ddpo.DDPOBatch:
        """Every trained stochastic step of every chain, chain-major, with ``advantages``
        ([chains]; default: from the per-prompt statistics of ``self.tracker``, which takes in
        ``rewards``)."""
        if advantages is None:
            advantages = self.tracker.advantages(rewards, prompts)
        trajectory = rollout_lib.Trajectory(
            x_t=jnp.concatenate([s.x_t for s in samples]),
            x_prev=jnp.concatenate([s.x_prev for s in samples]),
            timesteps=None, noise=None,
            log_prob=jnp.concatenate([s.log_prob for s in samples]), x0=None)
        null_context = self.trainer.encode(self.trainer.null_ids)
        batch = ddpo.transitions_from_trajectory(
            trajectory, jnp.asarray(advantages), jnp.concatenate([s.context for s in samples]),
            null_context, steps=self.steps, reduce=self.config.reduce)
        return jax.tree_util.tree_map(np.asarray, jax.device_get(batch))  # minibatches on host

    def _place(self, batch: ddpo.DDPOBatch) -> ddpo.DDPOBatch:
        """Places a planned optimiser step's [A, M, ...] transitions (``transitions.take``)."""
        return batch._replace(**{name: mesh_lib.put(getattr(batch, name), self._micro_sharding)
                                 for name in batch._fields[:-1]})

    def sampling_log_probs(self, policy_params: Any, transitions: ddpo.DDPOBatch,
                           minibatches: list[np.ndarray]) -> tuple[ddpo.DDPOBatch, float]:
        """The transitions with ``old_log_prob`` recomputed at the sampling parameters.

        The rollout's log-probs come from another computation (the whole batch at one step,
        inside the scan) and differ from the training step's recomputation by float rounding
        that depends on the machine and the batch layout: up to 1e-5 relative, already ten
        times DDPO's clip range in a summed log-density. Each transition is therefore
        evaluated again with the update's own log-density function, on the first planned
        minibatch that holds it (same shapes and layout as its first update). The epoch's
        first optimiser step does not read these values: it uses its own log-probs
        (``ddpo.ddpo_loss``'s ``at_sampling_params``), so its ratio is 1 by construction.

        Args:
          policy_params: the parameters that sampled the transitions.
          transitions: the epoch's transitions, with the rollout's log-probs.
          minibatches: the planned optimiser steps, [A, M] index arrays, in update order
            (``ddpo.plan_updates``).

        Returns:
          (transitions with recomputed ``old_log_prob``, the largest |recomputed - rollout|).
        """
        trainer = self.trainer
        rollout = np.asarray(transitions.old_log_prob)
        old, done = rollout.copy(), np.zeros(rollout.shape, bool)
        for indices in minibatches:
            missing = ~done[indices]
            if not missing.any():
                continue
            values = self._log_prob(policy_params, trainer.frozen, trainer.reference_params,
                                    self._place(transitions.take(indices)))
            old[indices[missing]] = np.asarray(jax.device_get(values))[missing]
            done[indices] = True
        # Transitions in no minibatch (a dropped remainder) are never trained on.
        gap = float(np.max(np.abs(old - rollout))) if old.size else 0.0
        return transitions._replace(old_log_prob=old), gap

    def update(self, state: TrainState, batch: ddpo.DDPOBatch, first: bool = False):
        """One PPO optimiser step; ``first``: the state holds the sampling parameters (the
        epoch's first step), whose own log-probs are the old ones (``ddpo.ddpo_loss``)."""
        trainer = self.trainer
        return self._update(state, trainer.frozen, trainer.reference_params, self._place(batch),
                            mesh_lib.put(np.bool_(first), trainer.step_shardings().replicated))


class DDPOStage(Stage):
    def __init__(self, loop):
        super().__init__(loop)
        self.steps = DDPOSteps(loop.trainer)

    def host_state(self) -> dict:
        """The per-prompt reward buffers (``ddpo.stat_buffer``): a resumed run continues them."""
        return {"ddpo_reward_buffers": self.steps.tracker.state_dict()}

    def load_host_state(self, state: dict) -> None:
        self.steps.tracker.load_state_dict(state.get("ddpo_reward_buffers", {}))

    def draw_prompts(self, epoch: int, batch: int) -> list[str]:
        config = self.loop.config
        return prompts_lib.draw(self.loop.train_prompts, config.sample.batch_size,
                                config.train.seed, 0, epoch, batch)

    def advantages(self, rewards: np.ndarray, prompts: list[str]) -> Any:
        """None: the per-prompt statistics of ``DDPOSteps.tracker``."""
        del rewards, prompts
        return None

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        loop, config = self.loop, self.loop.config
        samples, rewards, prompts = [], [], []
        for b in range(config.sample.batches_per_epoch):
            batch_prompts = self.draw_prompts(epoch, b)
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
        transitions = self.steps.transitions(samples, rewards, prompts,
                                             self.advantages(rewards, prompts))
        steps = len(self.steps.steps)
        size = optimizers.ddpo_minibatch_size(config, steps, loop.trainer.mesh.shape["data"])
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


class GRPOStage(DDPOStage):
    """Flow-GRPO (module docstring): groups of ``grpo.group_size`` samples per prompt."""

    def draw_prompts(self, epoch: int, batch: int) -> list[str]:
        config = self.loop.config
        size = config.grpo.group_size
        drawn = prompts_lib.draw(self.loop.train_prompts, config.sample.batch_size // size,
                                 config.train.seed, 0, epoch, batch)
        return [prompt for prompt in drawn for _ in range(size)]

    def advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        grpo = self.loop.config.grpo
        return advantages_lib.group_advantages(rewards, grpo.group_size, grpo.global_std)

    def host_state(self) -> dict:
        return {}  # no reward buffers: a group's own rewards make its advantages

    def load_host_state(self, state: dict) -> None:
        del state
